"""ADT feed and notification settings (``CCG_ADT_*``, ``CCG_SUBSCRIPTION_*``).

Kept beside, not inside, gateway/settings.py: only the listener and the Subscription API
read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.settings import PACKAGE_DIR, Settings

MODES = ("off", "api", "serve")


def default_adt_mappings() -> Path:
    for candidate in (PACKAGE_DIR.parent / "mappings" / "demo-hl7v2",
                      PACKAGE_DIR / "_bundled" / "mappings" / "demo-hl7v2"):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR.parent / "mappings" / "demo-hl7v2"


@dataclass(frozen=True)
class Endpoint:
    """One allowed rest-hook destination: scheme, host, port (None: any), path prefix."""

    scheme: str
    host: str
    port: int | None
    path: str = "/"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        text = text.strip()
        any_port = text.split("://", 1)[-1].split("/", 1)[0].endswith(":*")
        parts = urlsplit(text.replace(":*", "", 1) if any_port else text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {text!r}")
        port = None if any_port else (parts.port or (443 if parts.scheme == "https" else 80))
        return cls(parts.scheme, parts.hostname.lower(), port, parts.path or "/")

    def allows(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        if parts.scheme != self.scheme or (parts.hostname or "").lower() != self.host:
            return False
        if parts.username or parts.password:
            return False
        if self.port is not None and port != self.port:
            return False
        return (parts.path or "/").startswith(self.path)


@dataclass(frozen=True)
class AdtSettings:
    mode: str = "off"
    """off; api: serve offers Subscription and merges (a separate adt-listener feeds the
    store); serve: serve also runs the listener and the delivery worker."""
    listen_host: str = "127.0.0.1"
    listen_port: int = 2576
    tls_cert_file: str = ""
    """With a key: the listener speaks MLLP over TLS (1.2+)."""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    """With TLS: the PAS must present a certificate from this CA (mutual TLS)."""
    store_url: str = ""
    """SQLAlchemy URL of the durable store; unset: SQLite ``adt.sqlite`` in the data dir."""
    sqlite_synchronous: str = "FULL"
    """FULL (an fsync per commit: ACKed messages survive power loss) or NORMAL (they survive
    the process dying, not the machine); SQLite store only."""
    mappings_dir: Path = field(default_factory=default_adt_mappings)
    allowed_endpoints: tuple[Endpoint, ...] = ()
    max_attempts: int = 10
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    delivery_timeout: float = 10.0
    delivery_concurrency: int = 8
    max_subscriptions_per_client: int = 50
    retention_days: float = 7.0
    """Delivered notifications and their messages are forgotten after this (dead letters are
    kept); also how long a resent message is recognised as one."""
    processing_ids: frozenset[str] = frozenset({"P", "T"})

    @classmethod
    def from_env(cls, settings: Settings, **overrides: object) -> AdtSettings:
        env = os.environ
        values: dict[str, object] = {}
        if "CCG_ADT_MODE" in env:
            values["mode"] = env["CCG_ADT_MODE"]
        if "CCG_ADT_LISTEN" in env:
            host, _, port = env["CCG_ADT_LISTEN"].rpartition(":")
            values["listen_host"], values["listen_port"] = host or "127.0.0.1", int(port)
        if "CCG_ADT_STORE_URL" in env:
            values["store_url"] = env["CCG_ADT_STORE_URL"]
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            if f"CCG_ADT_{name.upper()}" in env:
                values[name] = env[f"CCG_ADT_{name.upper()}"]
        if "CCG_ADT_RETENTION_DAYS" in env:
            values["retention_days"] = float(env["CCG_ADT_RETENTION_DAYS"])
        if "CCG_ADT_SQLITE_SYNCHRONOUS" in env:
            values["sqlite_synchronous"] = env["CCG_ADT_SQLITE_SYNCHRONOUS"].upper()
        if "CCG_ADT_MAPPINGS" in env:
            values["mappings_dir"] = Path(env["CCG_ADT_MAPPINGS"])
        if "CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS" in env:
            values["allowed_endpoints"] = tuple(
                Endpoint.parse(e) for e in env["CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS"].split(",")
                if e.strip())
        for name, conv in (("max_attempts", int), ("backoff_seconds", float),
                           ("backoff_max_seconds", float), ("delivery_timeout", float),
                           ("delivery_concurrency", int),
                           ("max_subscriptions_per_client", int)):
            env_name = "MAX_PER_CLIENT" if name == "max_subscriptions_per_client" \
                else name.upper()
            raw = env.get(f"CCG_SUBSCRIPTION_{env_name}")
            if raw is not None:
                values[name] = conv(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        out = cls(**values)  # type: ignore[arg-type]
        if out.mode not in MODES:
            raise ValueError(f"CCG_ADT_MODE must be one of {', '.join(MODES)}")
        if not out.store_url:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            out = cls(**{**out.__dict__, "store_url":
                         f"sqlite:///{settings.data_dir / 'adt.sqlite'}"})
        return out

    def ssl_context(self) -> Any:
        """The listener's TLS context, or None for plain MLLP."""
        if not (self.tls_cert_file or self.tls_key_file):
            return None
        from adapters.hl7v2.mllp_server import server_ssl_context

        if not (self.tls_cert_file and self.tls_key_file):
            raise ValueError("CCG_ADT_TLS_CERT_FILE and CCG_ADT_TLS_KEY_FILE go together")
        return server_ssl_context(cert_file=self.tls_cert_file, key_file=self.tls_key_file,
                                  client_ca_file=self.tls_client_ca_file or None)

    def endpoint_allowed(self, url: str) -> bool:
        return any(e.allows(url) for e in self.allowed_endpoints)
