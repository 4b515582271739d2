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
    for root in bundled_mappings_roots():
        if (root / "demo-pas").is_dir():
            return root / "demo-pas"
    return PACKAGE_DIR.parent / "mappings" / "demo-pas"


def bundled_mappings_roots() -> tuple[Path, ...]:
    """Where the demo mapping directories live: the checkout's, or the wheel's copy."""
    return (PACKAGE_DIR.parent / "mappings", PACKAGE_DIR / "_bundled" / "mappings")


def mappings_path(text: str | Path) -> Path:
    """A mapping directory as given; a bare name that is not a directory here but is one of the
    bundled ones (``demo-pas``, ``demo-hl7v2``) means that one — so the demos work by name
    from an installed wheel as from a checkout."""
    path = Path(text)
    if path.exists() or len(path.parts) != 1:
        return path
    for root in bundled_mappings_roots():
        if (root / path).is_dir() and path.name != "codemaps":
            return root / path
    return path


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the setting."""


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
    strict_search: bool = True
    """Default for unknown search parameters when the client sends no Prefer: handling:
    strict (400 naming them), as a misspelt parameter must not widen a clinical search."""
    paging_secret: str = ""
    connection_urls: dict[str, str] = field(default_factory=dict)
    """Per-connection URL overrides (tests, tooling); deployments use each url_env instead."""
    log_level: str = "info"
    progress: bool = True
    validate_responses: bool = False
    """Validate every outgoing resource against its profile and log issues (no values)."""
    document_dir: Path | None = None
    """Root of the document store's files (Binary content); unset: beside a SQLite demo
    database (``<file>.documents``). Paths from the database never leave it."""
    binary_fhir_max_bytes: int = 8 * 1024 * 1024
    """Largest content returned base64 inside a FHIR Binary (406 beyond; the native media type
    is streamed at any size)."""
    # -- audit and limits (gateway/audit.py, gateway/limits.py, docs/security.md)
    audit_log: str = ""
    """Audit trail destination: a file path, or stdout / stderr; unset: ``audit.jsonl`` in the
    data directory on the bundled demo, refused anywhere else (gateway.audit). Never the
    application log."""
    audit_fhir_log: str = ""
    """Optionally also FHIR STU3 AuditEvent JSON lines to this file."""
    audit_fail_closed: bool = True
    """A request whose audit record cannot be written fails (503) instead of being served."""
    max_body_bytes: int = 1024 * 1024
    """Largest request body accepted (413 beyond it), checked before anything reads it."""
    max_search_parameters: int = 50
    """Most search parameters in one request (400 TOO_MANY_PARAMETERS); 0 = no cap."""
    max_values_per_parameter: int = 100
    """Most comma-separated values in one search parameter (400 TOO_MANY_VALUES); 0 = no cap."""
    search_cost_budget: int = 5000
    """Largest estimated search cost (gateway/cost.py) sent to a backend (400
    SEARCH_TOO_COSTLY beyond it); 0 = no budget."""
    max_in_flight: int = 256
    """Most requests served at once (503 + Retry-After beyond it); 0 = no limit."""
    rate_limit_per_minute: int = 1200
    """Sustained requests per minute per client (client_id, else source IP); 0 = no limit."""
    rate_limit_burst: int = 300
    """Requests a client may send at once before the per-minute rate applies."""
    max_in_flight_per_client: int = 32
    """Most requests one client may have in flight (429 TOO_MANY_CONCURRENT_REQUESTS beyond
    it), so one client cannot hold every slot of max_in_flight; 0 = no limit."""
    max_backend_calls_per_client: int | None = None
    """Backend calls of one client that run at once; its others wait in turn; 0 = no limit.
    Unset: one less than the smallest connection ``pool_size`` (4 with the demo's 5), at least
    2 (``backend_calls_per_client``): a lone busy client keeps most of the workers, one is
    always left for the others. Reads by key are not queued (``Adapter.shares``): they share
    one statement at a time per mapping."""
    source_rate_limit_per_minute: int = 6000
    """Before authentication, per source address: requests a minute (429 beyond); 0 = off."""
    source_rate_limit_burst: int = 1000
    auth_failures_per_minute: int = 30
    """Before authentication, per source address: failed authentications (401) a minute;
    once used up, the address is 429 before its credentials are checked; 0 = off."""
    auth_failures_burst: int = 60
    audit_denial_window_seconds: int = 60
    """Repeated denials without effect (401, 429) of one source are written once, then as one
    count per window (a flood cannot fill the audit disk); 0 = one line each."""
    body_timeout_seconds: int = 10
    """Seconds from the start of a request until its body must have arrived (408 beyond)."""
    header_timeout_seconds: int = 10
    """Seconds a connection may take to send a request's headers before it is closed."""
    # -- scale-out and observability (gateway/state, gateway/metrics.py, gateway/tracing.py)
    redis_url: str = ""
    """Redis for the state workers and replicas share (rate limits, in-flight caps,
    per-address limits, jti replay cache);
    unset: process memory, correct for a single process only."""
    redis_timeout_ms: int = 250
    """How long one Redis call may take before the declared fallback applies."""
    concurrency_lease_seconds: int = 30
    """With Redis: how long a client's in-flight slot outlives a process that stopped
    renewing it (died); renewed every third of that while its request runs."""
    workers: int = 1
    """Worker processes (``serve --workers``); more than 1 needs CCG_REDIS_URL to share
    limits and the replay cache, and CCG_PAGING_SECRET to share paging links."""
    worker_restart_seconds: float = 1.0
    """With workers: the first delay before a worker that failed to start is started again
    (the others keep serving); doubled after each failure (±20 % jitter) up to
    ``worker_restart_max_seconds``."""
    worker_restart_max_seconds: float = 60.0
    """The longest delay between two starts of a worker that keeps failing to start."""
    metrics: bool = True
    """Prometheus metrics (``/metrics``, outside FHIR authentication)."""
    metrics_port: int = 0
    """Serve ``/metrics`` only on this separate port (0: at ``/metrics`` on the main port)."""
    metrics_host: str = "127.0.0.1"
    """Interface of the separate metrics port."""
    otel_traces: str = ""
    """OpenTelemetry traces: ``otlp`` (OTEL_EXPORTER_OTLP_* configure it), ``console``, or
    unset (off). Needs the ``[otel]`` extra."""
    shutdown_drain_seconds: int = 0
    """On SIGTERM: seconds of readiness false (503) while still serving, before stopping."""
    shutdown_timeout: int = 30
    """Then at most this long for the requests in flight to finish. ``adt-listener`` and
    ``pas-simulator``: how long a stop waits for the messages (and notification deliveries)
    in flight (gateway.lifecycle.run_until_stopped)."""
    messaging_response_urls: str = ""
    """Where asynchronous $process-message responses may be delivered: comma-separated
    origins (``https://ehr.trust.nhs.uk``; without a port: any port of that host)."""
    messaging_retry_seconds: int = 2
    """First delay before an asynchronous response (or a message that met a transient
    error) is tried again; doubled each time, at most 300 s."""
    messaging_max_attempts: int = 12
    """Delivery attempts of one response before it is kept as dead (never deleted)."""
    messaging_retry_max_seconds: int = 300
    """The longest delay between two attempts (a delivery, or a message's processing)."""
    messaging_process_max_attempts: int = 12
    """Attempts at an asynchronous message that meets transient errors (the PAS unreachable,
    a write not acknowledged) before the worker gives up: a dead letter, and a final
    transient-error response to the response-url (0: no limit by count)."""
    messaging_process_max_age_seconds: int = 3600
    """Nor is a message retried longer than this after its first attempt (0: no limit)."""
    messaging_retention_days: int = 30
    """Answered messages (their stored responses: idempotency) and delivered responses are
    forgotten after this many days; a resend after that is processed as a new message."""
    # -- authentication and authorisation (gateway/auth, docs/security.md)
    env: str = ""
    """``production`` refuses the demo fallbacks even on the bundled demo mappings."""
    auth_mode: str = ""
    """jwt | api-key | mtls | insecure-demo; unset: jwt with the dev key on the demo only."""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    """This gateway's name(s) in the token ``aud`` (comma-separated)."""
    jwt_jwks_url: str = ""
    jwt_jwks_file: str = ""
    jwt_algorithms: str = "RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,ES512"
    jwt_leeway: int = 30
    jwt_accept_typ_jwt: bool = False
    jwt_jti_replay: bool = False
    jwt_max_lifetime: int = 86_400
    jwt_jwks_refresh_interval: int = 60
    jwt_jwks_max_age: int = 3600
    api_keys_file: str = ""
    mtls_clients_file: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_ca_certs: str = ""
    oauth_authorize_url: str = ""
    oauth_token_url: str = ""
    admin_roles: str = "gateway-admin"
    """Roles (a token's ``role`` claim, an API key's or mTLS client's ``role:``) that may ask
    for diagnostics (``X-Explain: plan``), comma-separated; empty: nobody."""

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"CCG_{f.name.upper()}")
            if raw is None or f.name == "connection_urls":
                continue
            name = f"CCG_{f.name.upper()}"
            if f.type in ("int", int, "int | None"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise SettingsError(f"{name} must be a whole number, not {raw!r}") from None
            elif f.type in ("float", float):
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise SettingsError(f"{name} must be a number, not {raw!r}") from None
            elif f.type in ("bool", bool):
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif f.name == "mappings_dir":
                values[f.name] = mappings_path(raw)
            elif f.name.endswith("_dir"):
                values[f.name] = Path(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        port = values.get("port", cls.port)
        if not 0 <= port <= 65535:
            raise SettingsError(f"the port must be between 0 and 65535, not {port}")
        return cls(**values)

    def backend_calls_per_client(self, pool_sizes: list[int]) -> int:
        """``max_backend_calls_per_client``, or, unset, what the connection pools allow:
        one less than the smallest (its workers are what the queue shares out), at least 2."""
        if self.max_backend_calls_per_client is not None:
            return self.max_backend_calls_per_client
        return max(2, min(pool_sizes) - 1) if pool_sizes else 2

    def with_secret(self) -> tuple[Settings, bool]:
        """Fill in a random paging secret if none is configured; report whether it was."""
        if self.paging_secret:
            return self, False
        return replace(self, paging_secret=secrets.token_urlsafe(32)), True
