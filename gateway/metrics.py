"""Prometheus metrics: what operations teams graph and alert on, with bounded labels only.

Every label value comes from a closed set the gateway itself defines — a route template, a
served resource type, an interaction name, an HTTP status, a connection or message type from
the mappings, an error class — never an id, a search value or anything a client typed, so no
series is ever created per patient or per request (and no PHI reaches Prometheus).

With several worker processes (``serve --workers N``) the values live in files under
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, chosen when that variable
is set before this module is imported) and ``/metrics`` adds up every worker's. The exposition
is served on the gateway's own port at ``/metrics`` (outside FHIR authentication), or, with
``CCG_METRICS_PORT``, on a separate port/interface only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# Request latency: from a cached read (~1 ms) to a backend at its timeout (10-30 s).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)

REQUESTS = Counter(
    "ccg_http_requests", "HTTP requests served, by route template, resource type, "
    "interaction and status", ["route", "resource_type", "interaction", "method", "status"])
LATENCY = Histogram(
    "ccg_http_request_duration_seconds", "Time to serve a request (to the last body byte)",
    ["route", "resource_type", "interaction"], buckets=_LATENCY_BUCKETS)
ADAPTER_SECONDS = Histogram(
    "ccg_adapter_call_duration_seconds", "Time in one backend call (SQL or HL7 v2 adapter)",
    ["connection", "adapter", "operation"], buckets=_LATENCY_BUCKETS)
ADAPTER_ERRORS = Counter(
    "ccg_adapter_errors", "Backend calls that failed, by error class",
    ["connection", "adapter", "operation", "error"])
POOL_WAIT = Histogram(
    "ccg_adapter_pool_wait_seconds", "Time a backend call waited for a free connection",
    ["connection"], buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
                             10.0))
MLLP_EXCHANGES = Histogram(
    "ccg_mllp_exchange_duration_seconds", "One MLLP request/reply exchange (including retries)",
    ["connection", "message_type", "outcome"], buckets=_LATENCY_BUCKETS)
MLLP_EVENTS = Counter(
    "ccg_mllp_events", "MLLP retries, timeouts, rejections (NAK), unreachable PAS and "
    "unusable replies", ["connection", "event"])
REFUSALS = Counter(
    "ccg_refusals", "Requests refused to protect the service (rate limit, load shedding)",
    ["reason"])
AUDIT_FAILURES = Counter(
    "ccg_audit_write_failures", "Audit records that could not be written")
UNMAPPED_DROPPED = Counter(
    "ccg_mapping_values_dropped", "Source values left out by a code map's unmapped policy "
    "(omit), by code map", ["codemap"])
DROPPED_VALUES = Counter(
    "ccg_dropped_values", "Source values read but left out of a resource because they could "
    "not be mapped (adapters.dropped), by where (a storage type, a mapping field or segment "
    "from the configuration) and why", ["where", "reason"])
SHARED_STATE_FALLBACKS = Counter(
    "ccg_shared_state_fallbacks", "Shared-state operations that could not reach Redis, by "
    "store and what happened instead (local: served from process memory; refused: failed "
    "closed)", ["store", "action"])
SQL_SECONDS = Histogram(
    "ccg_sql_statement_duration_seconds", "Time of one SQL statement, by connection and "
    "statement shape (an id of its text with placeholders, logged once as sql_shape)",
    ["connection", "shape"], buckets=_LATENCY_BUCKETS)
ADT_MESSAGES = Counter(
    "ccg_adt_messages", "ADT messages received on the MLLP feed, by trigger event (the "
    "configured events; any other is 'other') and the acknowledgement code sent",
    ["event", "ack_code"])
PROCESSED_MESSAGES = Counter(
    "ccg_messages_processed", "$process-message messages processed, by event (the declared "
    "events; any other is 'other') and response code", ["event", "outcome"])
MESSAGE_WORKER_ERRORS = Counter(
    "ccg_message_worker_errors", "Unexpected errors (a bug, an unforeseen failure) of the "
    "$process-message worker on an accepted message, by what followed: retry (later, with "
    "backoff), dead_letter (the worker's bound reached) or skipped (another process or an "
    "answer took it meanwhile); outbox: its delivery loop met one and went on", ["outcome"])
DELIVERIES = Counter(
    "ccg_deliveries", "Delivery attempts of Subscription notifications (channel "
    "'subscription') and $process-message responses ('message_response'), by outcome "
    "(delivered, retry, dead_letter; interrupted: stopped by our own shutdown, sent again "
    "after the restart)", ["channel", "outcome"])
WORKER_START_FAILURES = Counter(
    "ccg_worker_start_failures", "Worker processes (serve --workers) that exited before they "
    "were ready to serve; the supervisor starts another after a backoff while the others "
    "keep serving")
WORKERS = Gauge(
    "ccg_workers", "Worker processes (serve --workers) by state: serving, starting, "
    "restart_pending (failed to start; started again after a backoff)", ["state"],
    multiprocess_mode="max")
SHUTTING_DOWN = Gauge(
    "ccg_draining", "1 while this process drains before shutdown (readiness is false)",
    multiprocess_mode="max")

KNOWN_RESOURCE_TYPES: frozenset[str] = frozenset()
"""Set by the app builder from the registry: any other ``{type}`` is labelled ``other``."""

_recording = True
_request_children: dict[tuple[Any, ...], tuple[Any, Any]] = {}
_adapter_children: dict[tuple[str, str, str], Any] = {}


def set_resource_types(types: Iterable[str]) -> None:
    global KNOWN_RESOURCE_TYPES
    KNOWN_RESOURCE_TYPES = frozenset(types)


def set_recording(on: bool) -> None:
    """``CCG_METRICS=false``: requests and adapter calls are not counted (nor served)."""
    global _recording
    _recording = on


def _interaction(path_format: str, method: str, params: dict[str, Any]) -> str:
    if path_format.endswith("/{id}"):
        if params.get("id") == "_search":
            return "search"
        return {"GET": "read", "HEAD": "read", "PUT": "update"}.get(method, "other")
    if path_format.endswith("/{type}"):
        return {"GET": "search", "HEAD": "search", "POST": "create"}.get(method, "other")
    if path_format.endswith("/_search"):
        return "search"
    if path_format.endswith("/metadata"):
        return "capabilities"
    if "$" in path_format:
        return "operation"
    return "other"


def classify(scope: Scope) -> tuple[str, str, str]:
    """(route template, resource type, interaction) of a routed request: bounded labels."""
    route = scope.get("route")
    path_format = getattr(route, "path_format", None) or "unmatched"
    params = scope.get("path_params") or {}
    rtype = params.get("type")
    if rtype is not None and rtype not in KNOWN_RESOURCE_TYPES:
        rtype = "other"
    method = scope["method"]
    interaction = _interaction(path_format, method, params) if route else "none"
    return path_format, rtype or "none", interaction


def would_route(scope: Scope) -> Scope:
    """A request answered before routing (authentication, the limits): the route it would
    have been served by, matched as the router would (no endpoint runs), so a 401 or a 429
    is counted under its route template; unchanged when no route matches."""
    from starlette.routing import Match

    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        try:
            match, child = route.matches(scope)
        except Exception:  # a malformed scope: counted as unmatched
            return scope
        if match is Match.FULL and getattr(route, "path_format", None):
            return {**scope, **child, "route": route}
    return scope


def observe_request(scope: Scope, status: int, seconds: float) -> None:
    """Count one finished request (called once per request by ``RequestContext``)."""
    if not _recording:
        return
    if scope.get("route") is None:
        scope = would_route(scope)
    params = scope.get("path_params") or {}
    method = scope["method"]
    key = (getattr(scope.get("route"), "path_format", None), params.get("type"), method,
           status, params.get("id") == "_search")
    children = _request_children.get(key)
    if children is None:
        path_format, rtype, interaction = classify(scope)
        if method not in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            method = "other"
        children = (REQUESTS.labels(path_format, rtype, interaction, method, str(status)),
                    LATENCY.labels(path_format, rtype, interaction))
        if len(_request_children) < 4096:  # bounded by construction; the cap is a backstop
            _request_children[key] = children
    children[0].inc()
    children[1].observe(seconds)


def observe_adapter(connection: str, adapter: str, operation: str, seconds: float,
                    error: BaseException | None) -> None:
    if not _recording:
        return
    key = (connection, adapter, operation)
    child = _adapter_children.get(key)
    if child is None:
        child = _adapter_children[key] = ADAPTER_SECONDS.labels(connection, adapter, operation)
    child.observe(seconds)
    if error is not None:
        ADAPTER_ERRORS.labels(connection, adapter, operation, type(error).__name__).inc()


MAX_SQL_SHAPES = 200
"""Distinct statement shapes given their own label value; later ones are labelled 'other'."""
_sql_shapes: dict[str, str] = {}


def sql_shape(connection: str, sql: str) -> str:
    """A statement's shape id: the same text (placeholders, never values) gets the same id in
    every process and replica; at most ``MAX_SQL_SHAPES`` of them, then 'other'."""
    found = _sql_shapes.get(sql)
    if found is not None:
        return found
    if len(_sql_shapes) >= MAX_SQL_SHAPES:
        return "other"
    shape = "q" + hashlib.blake2b(sql.encode(), digest_size=5).hexdigest()
    _sql_shapes[sql] = shape
    # once per shape: how an operator finds the statement behind a label value
    structlog.get_logger("gateway.metrics").info("sql_shape", connection=connection,
                                                 shape=shape, statement=sql)
    return shape


def statement_timer(connection: str, dialect: str, sql: str) -> Any:
    """``adapters.observe.statement_timer``: the observer of one statement's time (the
    adapter asks once per statement object and keeps it)."""
    return SQL_SECONDS.labels(connection, sql_shape(connection, sql)).observe


_ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


def adt_message(event: str, known: Iterable[str], ack_code: str | None) -> None:
    """One ADT message answered (``ack_code`` None: the sender asked for no ACK)."""
    ADT_MESSAGES.labels(event if event in known else "other",
                        "none" if ack_code is None
                        else ack_code if ack_code in _ACK_CODES else "other").inc()


_MESSAGE_OUTCOMES = frozenset({"ok", "transient-error", "fatal-error"})


def message_processed(event: str | None, known: Iterable[str], outcome: str) -> None:
    PROCESSED_MESSAGES.labels(event if event is not None and event in known else "other",
                              outcome if outcome in _MESSAGE_OUTCOMES else "other").inc()


def message_worker_error(outcome: str) -> None:
    MESSAGE_WORKER_ERRORS.labels(outcome).inc()


def delivery(channel: str, outcome: str) -> None:
    DELIVERIES.labels(channel, outcome).inc()


def refused(reason: str) -> None:
    REFUSALS.labels(reason).inc()


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric (all workers' in multiprocess mode), in the
    0.0.4 text format every Prometheus version reads."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4


async def metrics_endpoint(request: Request) -> Response:
    body, ctype = exposition()
    return Response(body, media_type=None, headers={"content-type": ctype,
                                                    "cache-control": "no-store"})


def serve_separately(host: str, port: int) -> Any:
    """The exposition on its own port (a thread in this process): for Prometheus only,
    typically on an interface the FHIR clients cannot reach."""
    from prometheus_client import REGISTRY, start_http_server

    registry = REGISTRY
    if MULTIPROCESS:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def worker_exited(pid: int) -> None:
    """Multiprocess mode: a worker's live gauges go with it (its counters stay summed)."""
    if MULTIPROCESS:
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
