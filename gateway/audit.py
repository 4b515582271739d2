"""The audit trail: one record per patient touched, for every access and every denial.

The trail is a stream of its own, separate from the application log: its own JSON lines
(``"logger": "gateway.audit"``), its own destination (setting ``audit_log``: a file path, or
``stdout`` / ``stderr``; unset, ``audit.jsonl`` in the data directory on the bundled demo,
and required anywhere else), and optionally a second
stream of FHIR STU3 ``AuditEvent`` resources (IHE Basic Audit Log Patterns shape) as JSON
lines (setting ``audit_fhir_log``: a file path).

Unlike the application log, the audit trail DOES contain identifiers — resource ids, patient
ids, the search parameters with their values, the user — because that is its purpose. It is
the protected audit log: send it to a store with access controls and retention fit for it.
Resource content and bodies are never written.

What a record holds: ``timestamp``, ``client_id``, ``user`` (sub), ``role``, ``auth_mode``,
``interaction`` (read, search-type, create, update, capabilities, operation, ...),
``resource_type``, ``entities`` (the ``Type/id`` of every resource served or written, for this
record's patient), ``query`` (the search as normalised ``[name, value]`` pairs, as planned),
``patient`` (this record's patient; null for a record about no patient), ``patient_count``,
``context_patient`` (the token's patient claim), ``operation`` (for a record operation such
as ``$everything``: its name and every resource type it touched), ``outcome``
(``status``, gateway ``code``, ``result`` success/denied/failure), ``request_id``,
``source_ip``, ``method``, ``path`` and ``backend`` (what was sent: HL7 MSH-10 control ids;
for every query the adapter, connection and a value-free shape of the statement with its
hash).

Records are written before the response is released. When a record cannot be written and
``audit_fail_closed`` is true (the default), the client gets 503 ``AUDIT_UNAVAILABLE``
instead of the response: an access is never served unaudited. Writes (create, update) also
get an ``attempt`` record BEFORE anything reaches the backend, so a broken sink stops a write
before it happens rather than after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast, get_args
from urllib.parse import parse_qsl

import orjson
import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.base import (
    And,
    Chain,
    Compare,
    Count,
    Criterion,
    In,
    IsNull,
    Not,
    Nothing,
    Or,
    Query,
    Text,
    backend_correlations,
    request_started,
)
from gateway import compartment, metrics, tracing
from gateway import logging as gateway_logging
from gateway.auth.errors import AuthConfigError
from gateway.auth.principal import get_principal
from gateway.errors import ERROR_CODE_SYSTEM, GatewayError
from gateway.middleware import outcome_response

if TYPE_CHECKING:
    from gateway.compartment import Source as Provider
    from gateway.settings import Settings

app_log = structlog.get_logger("gateway.audit.sink")

EXEMPT_PATHS = frozenset({"/_health", "/_ready", "/metrics"})
MAX_QUERY_PAIRS = 50
MAX_VALUE_CHARS = 256
_XML_CODE = re.compile(
    rb'gateway-error-code"\s*/>\s*<code value="([A-Za-z0-9_.\-]{1,64})"')


class AuditConfigError(AuthConfigError):
    """The audit settings are missing or wrong: the gateway refuses to start."""


class AuditUnavailable(GatewayError):
    status = 503
    issue_code = "transient"
    error_code = "AUDIT_UNAVAILABLE"


# --- sinks ------------------------------------------------------------------------------------


class JsonLinesSink:
    """Appends one line per record to a file, or to the process's stdout / stderr.

    Every write is flushed; any failure (closed stream, full disk, read-only path) raises.
    ``stdout`` / ``stderr`` are looked up at each write, so a replaced stream is followed.
    """

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._stream = destination in ("stdout", "stderr")
        # Opened now: a destination that cannot be written stops the server starting.
        self.open()

    def open(self) -> None:
        """(Re)open the file after a ``close``: an app may serve more than once (a lifespan
        each time); a no-op for an open file or a stream."""
        with self._lock:
            if not self._stream and self._file is None:
                # Unbuffered: a failed write raises now and leaves nothing behind to be
                # retried into the next record.
                self._file = Path(self.destination).open("ab", buffering=0)  # noqa: SIM115
                # An app that never ran its lifespan (built, then dropped) closes it too.
                weakref.finalize(self, self._file.close)

    def write_lines(self, lines: list[bytes]) -> None:
        """All of a request's records in one write: one system call, not one per record."""
        data = b"\n".join(lines) + b"\n"
        with self._lock:
            if not self._stream:
                if self._file is None:  # closed: never fall through to stderr (the app log)
                    raise ValueError("the audit log is closed")
                view: bytes | memoryview = data
                while view:
                    written = self._file.write(view)
                    if not written:
                        raise OSError("the audit log accepted no bytes")
                    view = memoryview(view)[written:] if written < len(view) else b""
                return
            stream: Any = sys.stdout if self.destination == "stdout" else sys.stderr
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                buffer.write(data)
                buffer.flush()
            else:
                stream.write(data.decode("utf-8"))
                stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class DenialCounter:
    """Repeated denials that did nothing (401, 429), counted instead of written one by one.

    Per (source address, client, status, code): the first denial of a window is written in
    full; the others in that window are counted, and the count is written as one
    ``denied_repeated`` record (the first record's fields, plus ``count``, ``window_start``,
    ``window_end``) once the window is over — at the next denial or sweep after it, or when
    the trail closes. Every denial is in the trail, as a line or in a count; a flood of
    invalid tokens writes a line or two a minute instead of ~500 bytes each.
    """

    def __init__(self, window: float, emit: Any, max_keys: int = 4096,
                 clock: Any = time.monotonic) -> None:
        self.window = window
        self.emit = emit
        self.max_keys = max_keys
        self.clock = clock
        self._open: dict[tuple[Any, ...], list[Any]] = {}
        self._next_sweep = clock() + window

    def first(self, key: tuple[Any, ...], record: dict[str, Any]) -> bool:
        """Note one denial: True if it opens a window (write it), False if it was counted."""
        now = self.clock()
        if now >= self._next_sweep:
            self.sweep(now)
        if key not in self._open and len(self._open) >= self.max_keys:
            key = ("(other sources)", *key[1:])  # still counted, under one shared key
            record = {**record, "source_ip": None, "client_id": None}
        entry = self._open.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return False
        if entry is not None:
            self._close(entry, now)
        self._open[key] = [now, 0, {k: v for k, v in record.items() if k != "timestamp"},
                           record.get("timestamp")]
        return True

    def sweep(self, now: float | None = None, everything: bool = False) -> None:
        now = self.clock() if now is None else now
        self._next_sweep = now + self.window
        for key, entry in list(self._open.items()):
            if everything or now - entry[0] >= self.window:
                del self._open[key]
                self._close(entry, now)

    def _close(self, entry: list[Any], now: float) -> None:
        started, count, record, first_stamp = entry
        if not count:
            return
        summary = {**record, "event": "denied_repeated", "request_id": None, "count": count,
                   "window_start": first_stamp,
                   "window_seconds": round(min(now - started, self.window), 3)}
        try:
            self.emit([summary])
        except Exception as exc:  # the requests were answered long ago: log, never raise
            app_log.error("audit_write_failed", error=type(exc).__name__,
                          records="denied_repeated", count=count)


class AuditTrail:
    def __init__(self, destination: str = "stderr", *, fhir_destination: str = "",
                 fail_closed: bool = True, source_id: str = "careconnect-gateway",
                 denial_window: float = 0.0) -> None:
        self.sink = JsonLinesSink(destination)
        self.fhir_sink = JsonLinesSink(fhir_destination) if fhir_destination else None
        self.fail_closed = fail_closed
        self.source_id = source_id
        self.denials = DenialCounter(denial_window, self.emit) if denial_window > 0 else None

    def emit(self, records: Iterable[dict[str, Any]]) -> None:
        """Write each record, or raise. The application's log level never filters these."""
        lines: list[bytes] = []
        events: list[bytes] = []
        # One instant for the records written together (a search's, one per patient).
        text, us = gateway_logging.utc_now()  # as datetime.now(UTC).isoformat("ms")
        stamp = f"{text}.{us // 1000:03d}+00:00"
        for record in records:
            record["timestamp"] = stamp
            # The line the trail's structlog logger used to make (the record's keys, then event
            # and logger; the same JSON), without building a logger per record.
            record["event"] = record.pop("event")
            record["logger"] = "gateway.audit"
            lines.append(gateway_logging.render_json(None, "info", record))
            del record["logger"]
            if self.fhir_sink is not None:
                events.append(orjson.dumps(audit_event(record, self.source_id)))
        if lines:
            self.sink.write_lines(lines)
        if events and self.fhir_sink is not None:
            self.fhir_sink.write_lines(events)

    def open(self) -> None:
        for sink in (self.sink, self.fhir_sink):
            reopen = getattr(sink, "open", None)  # any object with write_lines may be a sink
            if reopen is not None:
                reopen()

    def close(self) -> None:
        if self.denials is not None:
            self.denials.sweep(everything=True)
        self.sink.close()
        if self.fhir_sink is not None:
            self.fhir_sink.close()


DEMO_AUDIT_FILE = "audit.jsonl"


def destination(settings: Settings) -> str:
    """Where the audit trail goes: the setting; unset, a file in the data directory on the
    bundled demo.

    Anywhere else it must be set (the gateway refuses to start otherwise): a production trail
    belongs in a protected store, and stderr — a container's usually ends up in the general
    log pipeline — is used only when chosen explicitly. On the demo a file keeps the trail
    (identifiers on every line) out of the terminal ``serve`` runs in.
    """
    from gateway.auth.config import is_production

    chosen = settings.audit_log.strip()
    if chosen:
        return chosen
    if is_production(settings):
        raise AuditConfigError(
            "CCG_AUDIT_LOG is not set: outside the bundled demo choose where the audit trail "
            "goes (a file on a protected volume, or stdout/stderr when a collector keeps it "
            "apart from the application log)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return str(settings.data_dir / DEMO_AUDIT_FILE)


# --- what the request touched (filled in by providers and the planner) -----------------------


class AuditContext:
    """What the request touched; one per request (plain slots: made on every request)."""

    __slots__ = ("attempt", "backend", "correlations", "entities", "operation", "outcome",
                 "query", "query_type")

    def __init__(self) -> None:
        self.attempt: Any = None
        """Writes the request's ``attempt`` record (True if written); set by AuditLayer."""
        self.entities: dict[tuple[str, str], set[str]] = {}
        """(type, id) → the patients the resource belongs to (empty: not patient data)."""
        self.query: list[tuple[str, str]] | None = None
        self.query_type: str | None = None
        self.backend: list[Any] = []
        self.correlations: list[str] = []
        self.operation: tuple[str, str, list[str]] | None = None
        """(operation, its patient, the types it touched): a record access, one record."""
        self.outcome: tuple[str | None, bool, int] | None = None
        """(code, ok, equivalent status) of an answer whose HTTP status does not tell it (a
        ``$process-message`` response message): see :func:`note_outcome`."""


_ctx: ContextVar[AuditContext | None] = ContextVar("audit_context", default=None)


def note_resource(provider: Provider, record: Any, resource: dict[str, Any]
                  ) -> None:
    ctx = _ctx.get()
    if ctx is not None:
        _note(ctx, compartment.link(provider), provider, record, resource)


def note_resources(provider: Provider, records: Sequence[Any],
                   resources: Sequence[dict[str, Any]]) -> None:
    """:func:`note_resource` for each (record, resource), the context looked up once."""
    ctx = _ctx.get()
    if ctx is None:
        return
    lk = compartment.link(provider)
    for record, resource in zip(records, resources, strict=True):
        _note(ctx, lk, provider, record, resource)


def _note(ctx: AuditContext, lk: compartment.Link, provider: Provider, record: Any,
          resource: dict[str, Any]) -> None:
    key = (resource["resourceType"], str(resource.get("id")))
    patients = ctx.entities.setdefault(key, set())
    if lk.kind == "self":
        patients.add(key[1])
    elif lk.paths:
        for path in lk.paths:
            for value in compartment._values(resource, path):
                if isinstance(value, str) and value.startswith("Patient/"):
                    patients.add(value.removeprefix("Patient/"))
    elif lk.refs:
        for ref in lk.refs:
            patients.update(provider.reference_values(record, ref))


def record_patients(provider: Provider, record: Any, rid: str,
                    resource: dict[str, Any] | None = None) -> set[str]:
    """The patients a record belongs to, as :func:`_note` finds them for a resource served:
    itself (a Patient, ``rid``), or its Patient references (held in a column; for a type
    whose only Patient references are elements of the resource, ``resource`` built)."""
    lk = compartment.link(provider)
    if lk.kind == "self":
        return {rid}
    if lk.refs:
        return {v for ref in lk.refs for v in provider.reference_values(record, ref)}
    if resource is None:
        return set()
    return {v.removeprefix("Patient/") for path in lk.paths
            for v in compartment._values(resource, path)
            if isinstance(v, str) and v.startswith("Patient/")}


def note_disclosed(rtype: str, rid: str, patients: Iterable[str]) -> None:
    """``rtype/rid`` named to the client without being served: a ``_has`` answered by
    searching the other type first puts the ids its records refer to in the links
    (gateway.chain). Noted as an entity with the patients of the records that named it:
    the other type's records themselves are read, not served."""
    ctx = _ctx.get()
    if ctx is not None:
        ctx.entities.setdefault((rtype, rid), set()).update(patients)


@contextlib.contextmanager
def unserved() -> Iterator[None]:
    """Resources built within are not noted as served (built only to be compared, as a
    ``_has``'s ``:exact`` does): what they disclose is noted by the caller."""
    token = _ctx.set(None)
    try:
        yield
    finally:
        _ctx.reset(token)


def note_written(provider: Provider, rid: str, record: Any = None) -> None:
    """A resource written; its patient is itself (a Patient) or the one the written record
    refers to (an Encounter's subject)."""
    ctx = _ctx.get()
    if ctx is not None:
        patients = ctx.entities.setdefault((provider.resource_type, str(rid)), set())
        lk = compartment.link(provider)
        if lk.kind == "self":
            patients.add(str(rid))
        elif record is not None:
            for ref in lk.refs:
                patients.update(provider.reference_values(record, ref))


def note_alias(rtype: str, rid: str, alias_type: str, alias_id: str) -> None:
    """A second name for a resource already served (Binary/[id] for its DocumentReference):
    recorded with the same patients."""
    ctx = _ctx.get()
    if ctx is not None:
        patients = ctx.entities.get((rtype, str(rid)), set())
        ctx.entities.setdefault((alias_type, str(alias_id)), set()).update(patients)


def before_write() -> None:
    """Immediately before a write reaches a backend: the ``attempt`` record, naming the
    authenticated caller; when it cannot be written (fail closed), the write never starts."""
    ctx = _ctx.get()
    if ctx is None or ctx.attempt is None:
        return
    attempt, ctx.attempt = ctx.attempt, None  # once per request
    if not attempt():
        raise AuditUnavailable("the audit trail cannot be written; the request was not served")


def note_search(resource_type: str, used: list[tuple[str, str]]) -> None:
    ctx = _ctx.get()
    if ctx is not None and ctx.query is None:
        ctx.query = _normalise(used)
        ctx.query_type = resource_type


def note_operation(name: str, patient: str, types: list[str]) -> None:
    """An operation that returns one patient's record: audited as one access to that
    patient, listing every type touched (the referenced practitioners and places too)."""
    ctx = _ctx.get()
    if ctx is not None:
        ctx.operation = (name, patient, types)


def note_outcome(code: str | None, ok: bool, equivalent_status: int) -> None:
    """The request's outcome when its HTTP status does not carry it: ``$process-message``
    answers 200 with a response message that may be a fatal-error. The record then says
    ``result`` failure with the response's first error ``code``, and ``equivalent_status``
    (the status the same failure has over REST), which gives the AuditEvent its outcome
    (0 success, 4 minor failure, 8 serious failure)."""
    ctx = _ctx.get()
    if ctx is not None:
        ctx.outcome = (code, ok, equivalent_status)


def note_backend(provider: Provider, operation: str, query: Query | Count | None) -> None:
    ctx = _ctx.get()
    if ctx is None:
        return
    shape = _shape(query.criteria) if query is not None else ""
    if isinstance(query, Query):
        shape += " order(" + ",".join(("-" if s.descending else "") + s.ref
                                       for s in query.sort) + ")"
    entry = {
        "adapter": provider.mapping.adapter.name,
        "connection": provider.mapping.connection,
        "resource_type": provider.resource_type,
        "operation": operation,
        "shape": shape[:500],
        "shape_id": _shape_id(shape),
    }
    if len(ctx.backend) < 50:
        ctx.backend.append(entry)


_SHAPE_IDS: dict[str, str] = {}
_MAX_SHAPE_IDS = 4096


def _shape_id(shape: str) -> str:
    """The hash of a shape, cached: a few shapes recur on every request. Shapes hold no
    values, so neither does the cache; bounded (emptied when full; long shapes not kept)."""
    found = _SHAPE_IDS.get(shape)
    if found is None:
        found = hashlib.sha256(shape.encode()).hexdigest()[:12]
        if len(shape) <= 512:
            if len(_SHAPE_IDS) >= _MAX_SHAPE_IDS:
                _SHAPE_IDS.clear()
            _SHAPE_IDS[shape] = found
    return found


def _shape(c: Criterion | None) -> str:
    """The criteria without their values: what the statement looks like, never what it asks."""
    if c is None:
        return "all"
    if isinstance(c, In):  # the commonest first (a read): the types are disjoint
        return f"{c.ref} in ?[{len(c.values)}]"
    if isinstance(c, Compare):
        return f"{c.ref}{c.op}?"
    if isinstance(c, And | Or):
        return f"{type(c).__name__.lower()}(" + ",".join(_shape(i) for i in c.items) + ")"
    if isinstance(c, Not):
        return f"not({_shape(c.item)})"
    if isinstance(c, Nothing):
        return "nothing"
    if isinstance(c, IsNull):
        return f"{c.ref} is {'' if c.null else 'not '}null"
    if isinstance(c, Chain):
        return f"{c.ref} in {c.target_ref}({_shape(c.criteria)})"
    assert isinstance(c, Text)
    return f"{c.ref} {c.mode} ?"


def _normalise(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in pairs:
        if len(out) >= MAX_QUERY_PAIRS:
            out.append(("(truncated)", "more parameters not recorded"))
            break
        if name in ("_format", "_pretty"):
            continue
        if name == "_page":
            value = "(paging link)"
        elif len(value) > MAX_VALUE_CHARS:
            value = value[:MAX_VALUE_CHARS] + "...(truncated)"
        out.append((name[:MAX_VALUE_CHARS], value))
    return out


# --- the ASGI layer ---------------------------------------------------------------------------


def classify(method: str, path: str, base: str) -> tuple[str, str | None]:
    """(interaction, resource type) of a request, from its method and path."""
    interaction, rtype, _target = _classify(method, path, base)
    return interaction, rtype


_INSTANCE = {"PUT": "update", "DELETE": "delete", "PATCH": "patch"}
_WRITES = frozenset({"create", "update", "delete", "patch"})


def _classify(method: str, path: str, base: str) -> tuple[str, str | None, str | None]:
    """``classify``, plus the ``Type/id`` of an instance-level request (``[type]/[id]...``)
    or None: one pass over the path."""
    if base and not path.startswith(base + "/"):
        return "unknown", None, None
    rest = path[len(base):].strip("/")
    parts = rest.split("/") if rest else []
    if "//" in rest:  # empty segments do not count
        parts = [p for p in parts if p]
    if not parts:
        return "unknown", None, None
    first = parts[0]
    if first[0] == "$":  # a system-level operation ($process-message): never a create
        return "operation", None, None
    rtype = first if first[0].isupper() else None  # segments are never empty here
    if len(parts) == 1:
        if first == "metadata":
            return "capabilities", None, None
        return ("create" if method == "POST" else "search-type"), rtype, None
    target = (f"{rtype}/{parts[1][:64]}" if rtype and not parts[1].startswith(("_", "$"))
              else None)
    if parts[1] == "_search":
        return "search-type", rtype, target
    if parts[1].startswith("$") or (len(parts) > 2 and parts[2].startswith("$")):
        return "operation", rtype, target
    if len(parts) == 2:
        return _INSTANCE.get(method, "read"), rtype, target
    return ("history" if parts[2] == "_history" else "unknown"), rtype, target


def _operation_name(path: str) -> str:
    """``process-message`` of ``/STU3/$process-message`` (``[type]/[id]/$name`` alike)."""
    last = path.rsplit("/", 1)[-1]
    return last[1:65] if last.startswith("$") else ""


def _result(status: int) -> str:
    if status < 400:
        return "success"
    if status in (401, 403, 429):
        return "denied"
    return "failure"


def _error_code(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> str | None:
    if status < 400 or not body:
        return None
    ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    try:
        if b"xml" in ctype:
            m = _XML_CODE.search(body[:65536])
            return m.group(1).decode() if m else None
        doc = orjson.loads(body[:1 << 20])
        code = doc["issue"][0]["details"]["coding"][0]["code"]
        return str(code)[:64] if isinstance(code, str) else None
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None


class AuditLayer:
    def __init__(self, app: ASGIApp, trail: AuditTrail, base_path: str = "") -> None:
        self.app = app
        self.trail = trail
        self.base = base_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        ctx = AuditContext()
        token = _ctx.set(ctx)
        corr_token = backend_correlations.set(ctx.correlations)
        started_token = request_started.set(asyncio.get_running_loop().time())
        method = scope["method"]
        interaction, rtype, target = _classify(method, scope["path"], self.base)
        started: Message | None = None
        body: list[Message] = []
        streamed = refused = False

        async def buffer(message: Message) -> None:
            nonlocal started, streamed, refused
            if streamed:
                await send(message)
            elif refused:
                return  # the audit sink failed: none of this response is released
            elif message["type"] == "http.response.start":
                started = message
                if state.get("stream_response") and message["status"] < 400:
                    # A streamed body (Binary content, any size) is never held here: the
                    # record is written now, before the first byte is released.
                    state["audit_written"] = self._write(self._records(
                        scope, ctx, interaction, rtype, target, message["status"], None,
                        "access"))
                    if not state["audit_written"] and self.trail.fail_closed:
                        refused = True
                        return
                    streamed = True
                    await send(message)
            else:
                body.append(message)

        if interaction in _WRITES or (interaction == "operation" and method == "POST"):
            # Written by the provider just before the backend is asked (audit.before_write),
            # when authentication has named the caller: an attempt record names who tried.
            # An operation may write too ($process-message): only a write asks for it.
            def attempt() -> bool:
                written = self._write(self._records(scope, ctx, interaction, rtype, target,
                                                    0, None, "attempt"))
                return written or not self.trail.fail_closed

            ctx.attempt = attempt
        try:
            try:
                await self.app(scope, receive, buffer)
            except ClientDisconnect:
                # Not a server failure: the client left before its request was complete.
                self._write(self._records(scope, ctx, interaction, rtype, target, 499,
                                          "CLIENT_CLOSED_REQUEST", "access"))
                raise
            except Exception:
                # RequestContext answers 500; the record says so. If it cannot be written,
                # the original error still propagates (and the sink failure is logged).
                self._write(self._records(scope, ctx, interaction, rtype, target, 500,
                                          "INTERNAL_SERVER_ERROR", "access"))
                raise
        finally:
            _ctx.reset(token)
            backend_correlations.reset(corr_token)
            request_started.reset(started_token)
        if streamed:
            return
        if refused:
            await self._unavailable(scope, receive, send)
            return
        status = started["status"] if started else 500
        code = None
        if status >= 400:  # only an error's body is read (for its code)
            content = b"".join(m.get("body", b"") for m in body)
            code = _error_code(status, list(started.get("headers", [])) if started else [],
                               content)
        records = self._records(scope, ctx, interaction, rtype, target, status, code, "access")
        denials = self.trail.denials
        if (status in (401, 429) and denials is not None and not ctx.entities
                and not denials.first((records[0]["source_ip"], records[0]["client_id"],
                                       status, code), records[0])):
            state["audit_written"] = True  # counted: written with its window's count
        else:
            state["audit_written"] = self._write(records)
        if not state["audit_written"] and self.trail.fail_closed:
            await self._unavailable(scope, receive, send)
            return
        if started is not None:
            await send(started)
        for message in body:
            await send(message)

    def _write(self, records: list[dict[str, Any]]) -> bool:
        try:
            with tracing.traced("audit write", {"ccg.audit.records": len(records)}):
                self.trail.emit(records)
            return True
        except Exception as exc:  # any sink failure: the caller fails closed (or logs)
            metrics.AUDIT_FAILURES.inc()
            app_log.error("audit_write_failed", error=type(exc).__name__,
                          fail_closed=self.trail.fail_closed)
            return False

    async def _unavailable(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = outcome_response(Request(scope, receive),
                                    AuditUnavailable("the audit trail cannot be written; "
                                                     "the request was not served"))
        await response(scope, receive, send)

    def _records(self, scope: Scope, ctx: AuditContext, interaction: str, rtype: str | None,
                 target: str | None, status: int, code: str | None, event: str
                 ) -> list[dict[str, Any]]:
        principal = get_principal(scope)
        state = scope.get("state") or {}
        client = scope.get("client")
        query = ctx.query
        if query is None:
            qs = scope.get("query_string", b"")
            query = _normalise(parse_qsl(qs.decode("latin-1"), keep_blank_values=True)
                               ) if qs else []
        common: dict[str, Any] = {
            "event": event,
            "request_id": state.get("request_id"),
            "client_id": principal.client_id if principal else None,
            "user": principal.subject if principal else None,
            "role": principal.role if principal else None,
            "auth_mode": principal.mode if principal else None,
            "scopes": principal.scope_text if principal else None,
            "context_patient": principal.patient if principal else None,
            "source_ip": client[0] if client else None,
            "method": scope["method"],
            "path": scope["path"][:512],
            "interaction": interaction,
            "resource_type": ctx.query_type or rtype,
            "query": [list(p) for p in query] if query else [],
            "outcome": {"status": status, "code": code,
                        "result": "attempt" if event == "attempt" else _result(status)},
            "backend": {"sent": list(ctx.correlations), "queries": list(ctx.backend)},
        }
        common["target"] = target
        if ctx.outcome is not None and event == "access" and status < 400:
            ocode, ok, equivalent = ctx.outcome
            common["outcome"] = {"status": status, "code": ocode,
                                 "result": "success" if ok else "failure"}
            if equivalent != status:
                common["outcome"]["equivalent_status"] = equivalent
        by_patient: dict[str | None, list[str]] = {}
        for (etype, eid), patients in ctx.entities.items():
            for p in patients or (None,):
                by_patient.setdefault(p, []).append(f"{etype}/{eid}")
        if ctx.operation is not None:
            name, subject, types = ctx.operation
            common["operation"] = {"name": name, "types": types}
            if set(by_patient) <= {subject, None}:  # one record access, not one per kind
                by_patient = {subject: [e for ents in by_patient.values() for e in ents]}
        elif interaction == "operation":  # which one, and the types it touched (or wrote)
            common["operation"] = {"name": _operation_name(scope["path"]),
                                   "types": sorted({t for t, _ in ctx.entities})}
        if not any(p is not None for p in by_patient):
            # Nothing about a patient was served (not found, denied, a count): the record is
            # still about the patient the request aimed at, or the token's compartment.
            restricted = principal.patient if principal and principal.patient_restricted else None
            aimed = (target.removeprefix("Patient/") if target and target.startswith("Patient/")
                     else restricted)
            if aimed is not None:  # its own record; non-patient entities keep theirs
                first: dict[str | None, list[str]] = {aimed: []}
                by_patient = first | by_patient
        if not by_patient:
            by_patient[None] = []
        count = sum(1 for p in by_patient if p is not None)
        if len(by_patient) == 1:  # the common case: one record, the common dict itself
            ((patient, entities),) = by_patient.items()
            common["patient"], common["patient_count"], common["entities"] = (
                patient, count, entities)
            return [common]
        out = []
        for patient, entities in by_patient.items():
            out.append({**common, "patient": patient, "patient_count": count,
                        "entities": entities})
        return out


# --- work done later for a request (the asynchronous messaging worker) -----------------------


def caller(scope: Scope) -> dict[str, Any]:
    """Who made a request, from where, and which request it was: kept (JSON) with work
    done for it later, so that work is audited — and confined to the token's patient — as
    the request itself would have been."""
    principal = get_principal(scope)
    state = scope.get("state") or {}
    client = scope.get("client")
    return {
        "principal": None if principal is None else {
            "client_id": principal.client_id, "subject": principal.subject,
            "role": principal.role, "scopes": principal.scope_text,
            "patient": principal.patient, "mode": principal.mode},
        "request_id": state.get("request_id"), "source_ip": client[0] if client else None,
        "method": scope.get("method", "POST"), "path": scope.get("path", "")}


def _caller_scope(who: dict[str, Any] | None) -> dict[str, Any]:
    """An ASGI-like scope of the request ``caller`` described (no connection behind it)."""
    from gateway.auth.principal import PRINCIPAL_SCOPE_KEY, AuthMode, Principal, parse_scopes

    who = who or {}
    state: dict[str, Any] = {"request_id": who.get("request_id")}
    p = who.get("principal")
    if isinstance(p, dict) and p.get("mode") in get_args(AuthMode):
        state[PRINCIPAL_SCOPE_KEY] = Principal(
            client_id=str(p.get("client_id") or ""), subject=p.get("subject"),
            role=p.get("role"), scopes=parse_scopes(str(p.get("scopes") or "")),
            patient=p.get("patient"), mode=cast("AuthMode", p["mode"]))
    return {"type": "http", "method": who.get("method") or "POST",
            "path": who.get("path") or "", "query_string": b"", "headers": [],
            "client": (who["source_ip"], 0) if who.get("source_ip") else None,
            "state": state}


class Deferred:
    """Auditing a write made after its request was answered (``$process-message`` with
    ``async=true``: the worker applies it later): the same trail and record format as the
    synchronous request's, ``"deferred": true`` added, the accepting request's id and caller.

    ``with deferred.audited(caller) as done:`` the ``attempt`` record is written just before
    the backend is asked (as for any write: fail closed, the write never starts), the token's
    patient compartment applies, the backend's correlation ids are collected; ``done(status,
    code, ok, equivalent_status=None)`` writes the ``access`` record with the outcome (as
    :func:`note_outcome` gives it)."""

    def __init__(self, trail: AuditTrail, base_path: str = "") -> None:
        self._layer = AuditLayer(_no_app, trail, base_path)

    @contextlib.contextmanager
    def audited(self, who: dict[str, Any] | None) -> Iterator[Callable[..., bool]]:
        scope = _caller_scope(who)
        layer = self._layer
        interaction, rtype, target = _classify(scope["method"], scope["path"], layer.base)
        ctx = AuditContext()

        def records(status: int, code: str | None, event: str) -> list[dict[str, Any]]:
            out = layer._records(scope, ctx, interaction, rtype, target, status, code, event)
            for r in out:
                r["deferred"] = True
            return out

        def attempt() -> bool:
            return layer._write(records(0, None, "attempt")) or not layer.trail.fail_closed

        def done(status: int, code: str | None, ok: bool,
                 equivalent_status: int | None = None) -> bool:
            ctx.outcome = (code, ok, equivalent_status or status)
            return layer._write(records(status, code, "access"))

        ctx.attempt = attempt
        token = _ctx.set(ctx)
        corr_token = backend_correlations.set(ctx.correlations)
        started_token = request_started.set(asyncio.get_running_loop().time())
        confine = compartment.confined_to(scope)
        try:
            with confine:
                yield done
        finally:
            _ctx.reset(token)
            backend_correlations.reset(corr_token)
            request_started.reset(started_token)


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a deferred audit has no application")  # pragma: no cover


# --- FHIR STU3 AuditEvent (IHE BALP shape) ---------------------------------------------------

_ACTIONS = {"create": "C", "update": "U", "delete": "D", "read": "R", "search-type": "E",
            "capabilities": "R", "operation": "E"}
_REST = {"read": "read", "search-type": "search-type", "create": "create", "update": "update",
         "capabilities": "capabilities", "delete": "delete", "patch": "patch",
         "history": "history-instance"}


def audit_event(record: dict[str, Any], source_id: str) -> dict[str, Any]:
    """An audit record as a FHIR STU3 AuditEvent, shaped as IHE BALP's RESTful events."""
    status = record["outcome"].get("equivalent_status") or record["outcome"]["status"]
    # STU3 AuditEventOutcome: 0 success, 4 minor failure (client), 8 serious failure (server)
    outcome = "0" if status < 400 else ("4" if status < 500 else "8")
    if outcome == "0" and record["outcome"].get("result") == "failure":
        outcome = "8"  # a failure without an equivalent status is never a success
    interaction = record["interaction"]
    subtype = [{"system": "http://hl7.org/fhir/restful-interaction", "code": _REST[interaction]}
               ] if interaction in _REST else []
    agents: list[dict[str, Any]] = []
    if record.get("client_id"):
        agents.append({
            "role": [{"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                                  "code": "110150", "display": "Application"}]}],
            "userId": {"value": record["client_id"]},
            "requestor": record.get("user") is None,
            "network": {"address": record["source_ip"], "type": "2"}
            if record.get("source_ip") else None,
        })
    if record.get("user"):
        agent: dict[str, Any] = {"userId": {"value": record["user"]}, "requestor": True}
        if record.get("role"):
            agent["role"] = [{"text": record["role"]}]
        agents.append(agent)
    if not agents:
        agents.append({"requestor": True, "userId": {"value": "anonymous"},
                       "network": {"address": record["source_ip"], "type": "2"}
                       if record.get("source_ip") else None})
    for a in agents:
        if a.get("network") is None:
            a.pop("network", None)
    entities: list[dict[str, Any]] = []
    if record.get("patient"):
        entities.append({
            "reference": {"reference": f"Patient/{record['patient']}"},
            "type": {"system": "http://hl7.org/fhir/audit-entity-type", "code": "1"},
            "role": {"system": "http://hl7.org/fhir/object-role", "code": "1"},
        })
    for ref in record.get("entities", []):
        if ref == f"Patient/{record.get('patient')}":
            continue
        entities.append({
            "reference": {"reference": ref},
            "type": {"system": "http://hl7.org/fhir/audit-entity-type", "code": "2"},
            "role": {"system": "http://hl7.org/fhir/object-role", "code": "4"},
        })
    if record.get("query"):
        import base64
        from urllib.parse import urlencode

        text = urlencode([tuple(p) for p in record["query"]])
        entities.append({
            "type": {"system": "http://hl7.org/fhir/audit-entity-type", "code": "2"},
            "role": {"system": "http://hl7.org/fhir/object-role", "code": "24"},
            "query": base64.b64encode(text.encode()).decode("ascii"),
        })
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://hl7.org/fhir/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "action": _ACTIONS.get(interaction, "E"),
        "recorded": record["timestamp"],
        "outcome": outcome,
        "agent": agents,
        "source": {"site": source_id, "identifier": {"value": source_id},
                   "type": [{"system": "http://hl7.org/fhir/security-source-type",
                             "code": "4", "display": "Application Server"}]},
    }
    if subtype:
        event["subtype"] = subtype
    if record["outcome"].get("code"):
        event["outcomeDesc"] = record["outcome"]["code"]
    if entities:
        event["entity"] = entities
    if record.get("request_id"):
        event["extension"] = [{"url": ERROR_CODE_SYSTEM.rsplit("/", 2)[0]
                               + "/StructureDefinition/request-id",
                               "valueString": record["request_id"]}]
    return event


__all__ = ["AuditLayer", "AuditTrail", "AuditUnavailable", "Deferred", "audit_event",
           "caller", "classify", "note_backend", "note_operation", "note_resource", "note_search",
           "note_written"]
