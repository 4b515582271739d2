"""Authentication settings → a checked ``AuthConfig``, or ``AuthConfigError`` (no start).

Deny by default starts here: a production configuration must name an authentication mode,
and the insecure demo mode is refused outside the bundled demo.

*Production configuration*: ``CCG_ENV=production``, or a mapping directory that is not one of
the bundled demo directories (``mappings/demo-*`` in a checkout, or the copies bundled in the
wheel). A copy of the demo mappings elsewhere is production.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway.auth.errors import AuthConfigError
from gateway.auth.principal import AuthMode, Scope, parse_scope
from gateway.settings import PACKAGE_DIR, Settings

MODES: tuple[AuthMode, ...] = ("jwt", "api-key", "mtls", "insecure-demo")
ENVIRONMENTS = ("", "development", "production")
ASYMMETRIC_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
})
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class JwtConfig:
    issuer: str
    audiences: tuple[str, ...]
    jwks_url: str | None
    jwks_file: Path | None
    algorithms: tuple[str, ...]
    leeway: int = 30
    accept_typ_jwt: bool = False
    jti_replay: bool = False
    max_lifetime: int = 86_400
    jwks_refresh_interval: int = 60
    jwks_max_age: int = 3600
    dev: bool = False
    """True when this is the local development key (``careconnect-gateway dev-token``)."""


@dataclass(frozen=True)
class Credential:
    """An API key (by its SHA-256) or an mTLS certificate subject, and what it may do."""

    client_id: str
    scopes: tuple[Scope, ...]
    role: str | None = None
    secret_sha256: str = ""
    subject: str = ""


@dataclass(frozen=True)
class AuthConfig:
    mode: AuthMode
    production: bool
    jwt: JwtConfig | None = None
    api_keys: tuple[Credential, ...] = ()
    mtls_clients: dict[str, Credential] = field(default_factory=dict)


def bundled_demo_roots() -> tuple[Path, ...]:
    return (PACKAGE_DIR.parent / "mappings", PACKAGE_DIR / "_bundled" / "mappings")


def is_demo_mappings(directory: Path) -> bool:
    """True only for a bundled demo mapping directory (``mappings/demo-*``) itself."""
    try:
        resolved = directory.resolve(strict=True)
    except OSError:
        return False
    for root in bundled_demo_roots():
        try:
            root_resolved = root.resolve(strict=True)
        except OSError:
            continue
        if resolved.parent == root_resolved and resolved.name.startswith("demo-"):
            return True
    return False


def is_production(settings: Settings) -> bool:
    env = settings_env(settings)
    return env == "production" or not is_demo_mappings(settings.mappings_dir)


def settings_env(settings: Settings) -> str:
    env = settings.env.strip().lower()
    if env not in ENVIRONMENTS:
        raise AuthConfigError(f"CCG_ENV must be 'production', 'development' or unset, not {env!r}")
    return env


def _scopes(text: Any, where: str, allow_patient: bool = False) -> tuple[Scope, ...]:
    if isinstance(text, list):
        text = " ".join(str(t) for t in text)
    if not isinstance(text, str) or not text.split():
        raise AuthConfigError(f"{where}: 'scopes' must be a non-empty scope string")
    out: list[Scope] = []
    for item in text.split():
        scope = parse_scope(item)
        if scope is None:
            raise AuthConfigError(f"{where}: {item!r} is not a valid SMART resource scope "
                                  "(v2 '?query' scopes are not supported)")
        if scope.context == "patient" and not allow_patient:
            raise AuthConfigError(f"{where}: {item!r}: patient/ scopes need a patient launch "
                                  "context, which only a token carries; use system/ scopes")
        out.append(scope)
    return tuple(dict.fromkeys(out))


def _load_yaml(path_text: str, setting: str) -> Any:
    if not path_text:
        raise AuthConfigError(f"{setting} must be set for this authentication mode")
    path = Path(path_text)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuthConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AuthConfigError(f"{setting}: {path} is not valid YAML: {exc}") from None


def _entries(data: Any, key: str, setting: str) -> list[dict[str, Any]]:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise AuthConfigError(f"{setting}: expected a top-level '{key}:' list of mappings")
    return items


def load_api_keys(path_text: str) -> tuple[Credential, ...]:
    """``keys: [{client_id, sha256, scopes, role?}]`` — the file holds hashes, never keys."""
    setting = "CCG_API_KEYS_FILE"
    out: list[Credential] = []
    seen: set[str] = set()
    for n, item in enumerate(_entries(_load_yaml(path_text, setting), "keys", setting), 1):
        where = f"{setting}: key #{n}"
        client_id, digest = item.get("client_id"), str(item.get("sha256", "")).lower()
        if not isinstance(client_id, str) or not client_id:
            raise AuthConfigError(f"{where}: 'client_id' is required")
        if not _SHA256_HEX.match(digest):
            raise AuthConfigError(f"{where}: 'sha256' must be the 64-hex-digit SHA-256 of the key")
        if digest in seen:
            raise AuthConfigError(f"{where}: duplicate key hash")
        seen.add(digest)
        role = item.get("role")
        out.append(Credential(client_id, _scopes(item.get("scopes"), where),
                              role if isinstance(role, str) else None, secret_sha256=digest))
    if not out:
        raise AuthConfigError(f"{setting}: no keys configured")
    return tuple(out)


def load_mtls_clients(path_text: str) -> dict[str, Credential]:
    """``clients: [{subject, client_id?, scopes, role?}]``; subjects in RFC 4514 form."""
    from cryptography.x509 import Name

    setting = "CCG_MTLS_CLIENTS_FILE"
    out: dict[str, Credential] = {}
    for n, item in enumerate(_entries(_load_yaml(path_text, setting), "clients", setting), 1):
        where = f"{setting}: client #{n}"
        subject = item.get("subject")
        if not isinstance(subject, str) or not subject.strip():
            raise AuthConfigError(f"{where}: 'subject' (RFC 4514, e.g. 'CN=app,O=Trust,C=GB') "
                                  "is required")
        try:
            spaced = re.sub(r"(?<!\\)\s*,\s*", ",", subject.strip())  # "CN=a, O=b" too
            normal = Name.from_rfc4514_string(spaced).rfc4514_string()
        except ValueError as exc:
            raise AuthConfigError(f"{where}: 'subject' is not an RFC 4514 name: {exc}") from None
        if normal in out:
            raise AuthConfigError(f"{where}: duplicate subject {normal!r}")
        client_id = item.get("client_id") or normal
        role = item.get("role")
        out[normal] = Credential(str(client_id), _scopes(item.get("scopes"), where),
                                 role if isinstance(role, str) else None, subject=normal)
    if not out:
        raise AuthConfigError(f"{setting}: no clients configured")
    return out


def _check_jwks_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return url
    raise AuthConfigError("CCG_JWT_JWKS_URL must be an https:// URL (http:// only on loopback)")


def _algorithms(text: str) -> tuple[str, ...]:
    algs = tuple(a.strip() for a in text.split(",") if a.strip())
    for alg in algs:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise AuthConfigError(f"CCG_JWT_ALGORITHMS: {alg} is refused: only asymmetric "
                                  "signatures are accepted (RFC 8725)")
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise AuthConfigError(f"CCG_JWT_ALGORITHMS: unknown algorithm {alg!r} (use "
                                  + ", ".join(sorted(ASYMMETRIC_ALGORITHMS)) + ")")
    if not algs:
        raise AuthConfigError("CCG_JWT_ALGORITHMS is empty")
    return algs


def _jwt_config(settings: Settings, production: bool) -> JwtConfig:
    s = settings
    common: dict[str, Any] = {
        "leeway": int(s.jwt_leeway), "accept_typ_jwt": bool(s.jwt_accept_typ_jwt),
        "jti_replay": bool(s.jwt_jti_replay), "max_lifetime": int(s.jwt_max_lifetime),
        "jwks_refresh_interval": int(s.jwt_jwks_refresh_interval),
        "jwks_max_age": int(s.jwt_jwks_max_age),
    }
    if not 0 <= common["leeway"] <= 300:
        raise AuthConfigError("CCG_JWT_LEEWAY must be between 0 and 300 seconds")
    identity = (s.jwt_issuer, s.jwt_audience, s.jwt_jwks_url, s.jwt_jwks_file)
    if not any(identity) and not production:
        from gateway.auth.devkeys import DEV_ALGORITHM, DEV_AUDIENCE, DEV_ISSUER, ensure_dev_key

        key = ensure_dev_key(settings.data_dir)
        return JwtConfig(DEV_ISSUER, (DEV_AUDIENCE,), None, key.jwks_path, (DEV_ALGORITHM,),
                         dev=True, **common)
    missing = [name for name, value in (("CCG_JWT_ISSUER", s.jwt_issuer),
                                        ("CCG_JWT_AUDIENCE", s.jwt_audience)) if not value]
    if not (s.jwt_jwks_url or s.jwt_jwks_file):
        missing.append("CCG_JWT_JWKS_URL or CCG_JWT_JWKS_FILE")
    if missing:
        raise AuthConfigError("JWT authentication needs " + ", ".join(missing))
    if s.jwt_jwks_url and s.jwt_jwks_file:
        raise AuthConfigError("set CCG_JWT_JWKS_URL or CCG_JWT_JWKS_FILE, not both")
    audiences = tuple(a.strip() for a in s.jwt_audience.split(",") if a.strip())
    jwks_file = Path(s.jwt_jwks_file) if s.jwt_jwks_file else None
    if jwks_file is not None and not jwks_file.is_file():
        raise AuthConfigError(f"CCG_JWT_JWKS_FILE: {jwks_file} is not a file")
    return JwtConfig(
        issuer=s.jwt_issuer, audiences=audiences,
        jwks_url=_check_jwks_url(s.jwt_jwks_url) if s.jwt_jwks_url else None,
        jwks_file=jwks_file, algorithms=_algorithms(s.jwt_algorithms), **common,
    )


def resolve_auth(settings: Settings) -> AuthConfig:
    """Check the authentication settings; raise AuthConfigError with a clear message."""
    s = settings
    production = is_production(settings)
    mode = str(s.auth_mode or "").strip().lower()
    if not mode:
        if production:
            raise AuthConfigError(
                "no authentication configured: set CCG_AUTH_MODE to jwt, api-key or mtls "
                "(this is a production configuration: "
                + ("CCG_ENV=production" if settings_env(settings) == "production"
                   else f"the mapping directory {settings.mappings_dir} is not a bundled demo")
                + ")")
        mode = "jwt"
    if mode not in MODES:
        raise AuthConfigError(f"CCG_AUTH_MODE must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "insecure-demo":
        if production:
            raise AuthConfigError(
                "CCG_AUTH_MODE=insecure-demo is refused: it is only allowed when serving a "
                "bundled demo mapping directory without CCG_ENV=production")
        return AuthConfig("insecure-demo", production=False)
    if mode == "jwt":
        return AuthConfig("jwt", production, jwt=_jwt_config(settings, production))
    if mode == "api-key":
        return AuthConfig("api-key", production, api_keys=load_api_keys(s.api_keys_file))
    missing = [n for n, v in (("CCG_SSL_CERTFILE", s.ssl_certfile),
                              ("CCG_SSL_KEYFILE", s.ssl_keyfile),
                              ("CCG_SSL_CA_CERTS", s.ssl_ca_certs)) if not v]
    if missing:
        raise AuthConfigError("mTLS authentication needs the gateway to terminate TLS: set "
                              + ", ".join(missing))
    return AuthConfig("mtls", production, mtls_clients=load_mtls_clients(s.mtls_clients_file))
