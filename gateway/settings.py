"""Gateway settings: defaults, overridden by ``CCG_*`` environment variables, then CLI flags."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def default_mappings_dir() -> Path:
    """The demo mappings: in a source checkout, ``mappings/demo-pas``; in a wheel, bundled."""
    for candidate in (PACKAGE_DIR.parent / "mappings" / "demo-pas",
                      PACKAGE_DIR / "_bundled" / "mappings" / "demo-pas"):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR.parent / "mappings" / "demo-pas"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "careconnect-gateway"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    base_path: str = "/STU3"
    public_base_url: str | None = None
    """The externally visible FHIR base (behind a proxy); otherwise taken from each request."""
    mappings_dir: Path = field(default_factory=default_mappings_dir)
    data_dir: Path = field(default_factory=default_data_dir)
    demo_patients: int = 10_000
    default_count: int = 20
    max_count: int = 500
    include_limit: int = 500
    """Most resources one _include or _revinclude may add to a page."""
    strict_search: bool = False
    """Default for unknown search parameters when the client sends no Prefer: handling."""
    paging_secret: str = ""
    connection_urls: dict[str, str] = field(default_factory=dict)
    """Per-connection URL overrides (tests, tooling); deployments use each url_env instead."""
    log_level: str = "info"
    progress: bool = True
    validate_responses: bool = False
    """Validate every outgoing resource against its profile and log issues (no values)."""

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"CCG_{f.name.upper()}")
            if raw is None or f.name == "connection_urls":
                continue
            if f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("bool", bool):
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif f.name.endswith("_dir"):
                values[f.name] = Path(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_secret(self) -> tuple[Settings, bool]:
        """Fill in a random paging secret if none is configured; report whether it was."""
        if self.paging_secret:
            return self, False
        return replace(self, paging_secret=secrets.token_urlsafe(32)), True
