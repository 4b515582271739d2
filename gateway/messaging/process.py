"""``POST [base]/$process-message``: a message Bundle in, its response message out.

Synchronous (the default): the event's write is made and the response message returned
(200): ``MessageHeader.response.code`` ok, transient-error or fatal-error, with an
OperationOutcome when not ok. ``async=true`` with a ``response-url`` on the allow-list: the
message is recorded durably and accepted (202); a worker processes it and the response is
delivered to the URL through the outbox (gateway.messaging.delivery). The worker retries a
transient error within a bound (``Messaging.retry``, gateway.retry.Backoff), then gives up: a
dead letter, and a final transient-error (MESSAGE_RETRIES_EXHAUSTED) delivered. An unexpected
error (a bug, an unforeseen failure of the store) is retried on the same bound, without
waiting for a restart, and the worker goes on with the other messages meanwhile.

Idempotent by MessageHeader.id: a final response (ok or fatal-error) is stored, and the same
id sent again is answered with it, byte for byte, without a second write; the same id with
other content is refused. A transient error before anything reached the backend is not
stored (the sender may simply send again). A write sent and not acknowledged is recorded as
``unknown`` and answered transient-error (WRITE_OUTCOME_UNKNOWN); when the same message
comes again, a create first looks for the patient by the identifiers sent (as a REST client
would with If-None-Exist) and answers ok if it is there, so it is applied once. Once the
backend acknowledged (AA), the answer is ok — whatever a read-back does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
from starlette.responses import Response

from adapters.base import Write
from gateway import audit, metrics, writes
from gateway.auth import authorize
from gateway.errors import (
    BadRequest,
    GatewayError,
    GatewayTimeout,
    ServiceUnavailable,
    issue,
    operation_outcome,
)
from gateway.messaging.config import MessagingFile
from gateway.messaging.delivery import Outbox, allowed
from gateway.messaging.store import MessageStore, attempted, clear_retries, give_up, reaccept
from gateway.notices import notice
from gateway.operations.base import Context, Invocation, Operation, Parameter
from gateway.operations.params import parameter_list
from gateway.registry import Registry
from gateway.retry import Backoff

log = structlog.get_logger("gateway.messaging")
DEFINITION = "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message"
_NS = uuid.UUID("6d1f2c3a-8e4b-5f70-a1b2-c3d4e5f60718")
_FHIR_JSON = "application/fhir+json"
MESSAGE_LEASE_SECONDS = 600.0
"""Longer than any one message's processing (its backend deadline); after it, a message whose
process died is another's to take."""
MESSAGE_WAIT_SECONDS = 30.0
"""How long a synchronous message waits for another worker processing the same id."""


class Outcome(Exception):
    """A message that cannot be processed, answered with a response message (not HTTP)."""

    def __init__(self, code: str, issues: list[dict[str, Any]], final: bool = True) -> None:
        super().__init__(code)
        self.code = code
        self.issues = issues
        self.final = final


def _fatal(error_code: str, text: str, issue_code: str = "invalid") -> Outcome:
    return Outcome("fatal-error", [issue("error", issue_code, error_code, text)])


def digest(message: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(message, option=orjson.OPT_SORT_KEYS)).hexdigest()


def header_of(message: dict[str, Any]) -> dict[str, Any]:
    """The MessageHeader of a message Bundle, checked enough to answer it (else 400)."""
    if message.get("resourceType") != "Bundle" or message.get("type") != "message":
        raise BadRequest("$process-message takes a Bundle of type message")
    entries = message.get("entry")
    first = entries[0].get("resource") if isinstance(entries, list) and entries and \
        isinstance(entries[0], dict) else None
    if not isinstance(first, dict) or first.get("resourceType") != "MessageHeader":
        raise BadRequest("the message Bundle's first entry must be its MessageHeader")
    mid = first.get("id")
    if not isinstance(mid, str) or not 1 <= len(mid) <= 64:
        raise BadRequest("the MessageHeader needs an id (1 to 64 characters): it identifies "
                         "the message")
    event = first.get("event")
    if not isinstance(event, dict) or not isinstance(event.get("code"), str) \
            or not event["code"]:
        raise BadRequest("the MessageHeader needs an event (a Coding with a code)")
    return first


def _instant(value: Any) -> dt.datetime | None:
    """A FHIR dateTime to the minute, as a comparable instant (None when it is not one)."""
    if not isinstance(value, str) or len(value) < 16:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.astimezone(dt.UTC).replace(second=0, microsecond=0)


def audit_outcome(response: dict[str, Any]) -> tuple[str | None, bool, int]:
    """(first error code, ok, equivalent status) of a response message, for its audit record
    (gateway.audit.note_outcome): the status the same failure has over REST (its error's),
    else 422 for a message the gateway refused (fatal-error) and 503 for a transient-error."""
    code = response["entry"][0]["resource"]["response"]["code"]
    if code == "ok":
        return None, True, 200
    codes = [c.get("code") for e in response["entry"][1:]
             for i in e["resource"].get("issue", ())
             for c in (i.get("details") or {}).get("coding", ())]
    first = codes[0] if codes and isinstance(codes[0], str) else None
    status = _error_status(first) if first else None
    return first, False, status or (503 if code == "transient-error" else 422)


@functools.cache
def _error_status(code: str) -> int | None:
    """The HTTP status of the gateway error with this stable code (None: a messaging code)."""
    todo: list[type[GatewayError]] = [GatewayError]
    while todo:
        cls = todo.pop()
        if cls.error_code == code:
            return cls.status
        todo.extend(cls.__subclasses__())
    return None


def _distinct(response: dict[str, Any], salt: str) -> dict[str, Any]:
    """A response message with ids of its own (a give-up is not the message's answer: a
    later answer to a resend is another message, which a receiver must not drop as a
    duplicate)."""
    out: dict[str, Any] = orjson.loads(orjson.dumps(response))
    ids = {e["resource"]["id"]: str(uuid.uuid5(_NS, f"{salt}/{e['resource']['id']}"))
           for e in out["entry"]}
    out["id"] = str(uuid.uuid5(_NS, f"{salt}/{out['id']}"))
    for e in out["entry"]:
        e["resource"]["id"] = ids[e["resource"]["id"]]
        e["fullUrl"] = f"urn:uuid:{e['resource']['id']}"
    details = out["entry"][0]["resource"]["response"].get("details")
    if details:
        details["reference"] = f"urn:uuid:{ids[details['reference'].removeprefix('urn:uuid:')]}"
    return out


def _raised_at(exc: BaseException) -> str:
    """Where ``exc`` was raised: the innermost frame's file (from the package root) and line
    — code, never data."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown"
    parts = Path(tb.tb_frame.f_code.co_filename).parts
    return f"{'/'.join(parts[-2:])}:{tb.tb_lineno}"


class _HasRegistry(Protocol):
    @property
    def registry(self) -> Registry: ...


class Messaging:
    """The messaging service: the declaration, the store, the outbox and its workers."""

    def __init__(self, spec: MessagingFile, registry: Registry, store: MessageStore,
                 allow_list: list[str], outbox: Outbox | None = None,
                 retry_seconds: float = 2.0, retry: Backoff | None = None) -> None:
        self.retry_seconds = retry_seconds
        self.retry = retry or Backoff(retry_seconds, 300.0, 12, 3600.0)
        """The worker's bound on an accepted message meeting transient errors."""
        self.spec = spec
        self._registry = registry
        # the live mappings (gateway.reload.LiveMappings), once the app has them: a reload's
        # providers are found there, the request's pinned generation first
        self.registry_source: _HasRegistry | None = None
        self.store = store
        self.allow_list = allow_list
        self.outbox = outbox or Outbox(store, allow_list)
        self.audit: audit.Deferred | None = None
        """The audit of the worker's writes (set by the app with its trail)."""
        self._locks: dict[str, list[Any]] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._failures: dict[str, int] = {}
        """Unexpected errors of messages whose attempts the store could not count."""
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def registry(self) -> Registry:
        if self.registry_source is not None:
            return self.registry_source.registry
        return self._registry

    # -- lifecycle

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self.outbox.run()),
                       asyncio.create_task(self._worker())]
        for found in await self.store.waiting():  # accepted before a restart
            self._queue.put_nowait(found.id)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.store.close()

    # -- processing

    @contextlib.asynccontextmanager
    async def _lock(self, mid: str) -> AsyncIterator[None]:
        """One message id processed at a time; the lock is dropped when nobody holds or
        waits for it (memory stays bounded by the messages in flight)."""
        entry = self._locks.get(mid)
        if entry is None:
            entry = self._locks[mid] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._locks.pop(mid, None)

    async def process(self, message: dict[str, Any], base: str) -> dict[str, Any]:
        """The response message (synchronous mode), the write applied at most once."""
        header = header_of(message)
        mid, dg = header["id"], digest(message)
        async with self._lock(mid), self._claim(mid, MESSAGE_WAIT_SECONDS) as held:
            if not held:  # another worker on this store has it (and is still at it)
                return self.response(header, base, Outcome("transient-error", [issue(
                    "error", "transient", "MESSAGE_IN_PROGRESS", "another worker is "
                    "processing this message; send the same message again shortly")],
                    final=False))
            stored = await self.store.get(mid)
            if stored is not None and stored.digest != dg:
                return self.response(header, base, _fatal(
                    "MESSAGE_ID_REUSED", "this MessageHeader.id was already used for another "
                    "message; a new message needs a new id", "duplicate"))
            if stored is not None and stored.response is not None:
                return stored.response
            again = stored is not None and stored.state == "unknown"
            if stored is None:
                await self.store.put(mid, dg, "processing")
            response, final = await self._apply(message, header, base, again)
            if final:  # accepted asynchronously before: its response-url gets it too
                await self.store.finish(mid, response, stored.response_url if stored else None)
                self.outbox.wake()
            elif response["entry"][0]["resource"]["response"]["code"] == "transient-error" \
                    and not self._unknown(response):
                await self.store.forget(mid)
            return response

    async def accept(self, message: dict[str, Any], response_url: str, base: str,
                     caller: dict[str, Any] | None = None) -> None:
        """Asynchronous mode: recorded durably (then 202), processed by the worker; a message
        answered before is not processed again (its response was delivered). ``caller``
        (gateway.audit.caller) is kept with it: the worker's write is audited, and confined
        to the token's patient, as the request's own would have been."""
        header = header_of(message)
        mid, dg = header["id"], digest(message)
        async with self._lock(mid):
            stored = await self.store.get(mid)
            if stored is not None and stored.digest != dg:
                raise BadRequest("this MessageHeader.id was already used for another message")
            body = {"message": message, "base": base, "caller": caller}
            if stored is None:
                await self.store.put(mid, dg, "accepted", body=body,
                                     response_url=response_url)
                self._queue.put_nowait(mid)
            elif stored.state == "unknown" and stored.body is None and stored.response is None:
                await reaccept(self.store, mid, body, response_url)  # given up on before
                self._queue.put_nowait(mid)

    async def _worker(self) -> None:
        while True:
            mid = await self._queue.get()
            try:
                await self._process_stored(mid)
                self._failures.pop(mid, None)
            except Exception as exc:  # one message must not stop the others
                await self._unexpected(mid, exc)

    async def _unexpected(self, mid: str, exc: Exception) -> None:
        """An unexpected error (a bug, an unforeseen failure) while processing message
        ``mid``: tried again later on the worker's bound (``self.retry``, counted in the store
        like a transient error), then given up on like one (a dead letter, and a final
        transient-error MESSAGE_RETRIES_EXHAUSTED to the response-url). A write that may
        have reached the PAS stays ``unknown`` (the next attempt looks for it first). Logged
        with the error's class and where it was raised: no message content, no traceback
        (whose values could hold patient data). Never raises: the worker goes on."""
        error = type(exc).__name__
        where = _raised_at(exc)
        try:
            outcome, delay = await self._retry_unexpected(mid, error)
        except Exception as again:  # the store itself failing: retried all the same
            attempts = self._failures[mid] = self._failures.get(mid, 0) + 1
            delay = self.retry.delay(attempts)
            log.error("message_processing_failed", error=error, where=where,
                      then=type(again).__name__, attempts=attempts,
                      retry_in_seconds=round(delay, 1))
            metrics.message_worker_error("retry")
        else:
            self._failures.pop(mid, None)
            log.error("message_processing_failed", error=error, where=where, outcome=outcome,
                      **({"retry_in_seconds": round(delay, 1)} if delay is not None else {}))
            metrics.message_worker_error(outcome)
        if delay is not None:
            asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, mid)

    async def _retry_unexpected(self, mid: str, error: str) -> tuple[str, float | None]:
        """(what follows: retry, dead_letter or skipped, the delay before the next attempt)"""
        async with self._lock(mid), self._claim(mid) as held:
            if not held:  # another process on this store has it now
                return "skipped", None
            stored = await self.store.get(mid)
            if stored is None or stored.response is not None or stored.body is None:
                return "skipped", None  # answered meanwhile, or not this worker's
            header, base = header_of(stored.body["message"]), stored.body["base"]
            response = self.response(header, base, Outcome("transient-error", [issue(
                "error", "exception", "MESSAGE_PROCESSING_FAILED",
                "an unexpected error stopped the processing of this message; the gateway "
                "tries again (the same message is applied at most once)")], final=False))
            delay = await self._retry_or_give_up(mid, response, base, stored.response_url,
                                                 stored.state, error=f"unexpected {error}")
            return ("retry" if delay is not None else "dead_letter"), delay

    async def _process_stored(self, mid: str) -> None:
        # Another process on this store (``--workers``) may have queued it too (each reads the
        # waiting messages when it starts): the one holding its lease applies it, once.
        async with self._lock(mid), self._claim(mid) as held:
            if not held:
                return
            stored = await self.store.get(mid)
            if stored is None or stored.response is not None or stored.body is None:
                return
            message, base = stored.body["message"], stored.body["base"]
            header = header_of(message)
            with self._audited(stored.body.get("caller")) as done:
                response, final = await self._apply(message, header, base,
                                                    stored.state == "unknown")
                done(response)
            if final:
                await self.store.finish(mid, response, stored.response_url)
                await clear_retries(self.store, mid)
                self.outbox.wake()
                return
            delay = await self._retry_or_give_up(mid, response, base, stored.response_url,
                                                 stored.state)
            if delay is None:
                return
        # transient: try again later (the row stays accepted/unknown, so a restart resumes it)
        asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, mid)

    @contextlib.contextmanager
    def _audited(self, caller: dict[str, Any] | None
                 ) -> Iterator[Callable[[dict[str, Any]], None]]:
        """The worker's processing of one message, audited as a deferred write (an
        ``attempt`` record before the PAS is asked, an ``access`` record with the response's
        outcome), or not at all when the service has no trail (unit tests)."""
        if self.audit is None:
            yield lambda response: None
            return
        with self.audit.audited(caller) as done:
            def finish(response: dict[str, Any]) -> None:
                code, ok, equivalent = audit_outcome(response)
                done(200, code, ok, equivalent)

            try:
                yield finish
            except Exception:  # as a request failing with a 500 is: recorded, then raised
                done(500, "INTERNAL_SERVER_ERROR", False)
                raise

    @contextlib.asynccontextmanager
    async def _claim(self, mid: str, wait: float = 0.0) -> AsyncIterator[bool]:
        """Inside ``_lock(mid)``: the store's lease on message ``mid``, which processes
        sharing the store (workers on one data directory) take in turn; waited for up to
        ``wait`` seconds. Yields whether this process holds it."""
        name, holder = f"message:{mid}", self.outbox.holder
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not (held := await self.store.lease(name, holder, MESSAGE_LEASE_SECONDS)):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        try:
            yield held
        finally:
            if held:
                await self.store.unlease(name, holder)

    async def _retry_or_give_up(self, mid: str, response: dict[str, Any], base: str,
                                url: str | None, before: str, error: str | None = None
                                ) -> float | None:
        """After a transient error: the delay before the next attempt, or None when the
        worker gives up (``self.retry``): a dead letter is kept and the response-url gets a
        final transient-error saying so — never a fatal-error, and never "not applied" for a
        write that may have reached the backend (any attempt's WRITE_OUTCOME_UNKNOWN)."""
        if before != "unknown" and not self._unknown(response):
            # nothing reached the backend (as a synchronous message's row is forgotten then)
            await self.store.state(mid, before)
        codes = [c.get("code") for e in response["entry"][1:]
                 for i in e["resource"].get("issue", ())
                 for c in (i.get("details") or {}).get("coding", ())]
        attempts, age = await attempted(self.store, mid,
                                        error or str(codes[0] if codes else ""))
        if not self.retry.exhausted(attempts, age):
            return self.retry.delay(attempts)
        stored = await self.store.get(mid)
        unknown = stored is not None and stored.state == "unknown"
        header = response["entry"][0]["resource"]
        text = (f"the gateway gave up after {attempts} attempts over {int(age)} s; "
                + ("the write MAY HAVE BEEN APPLIED: send the same message (the same "
                   "MessageHeader.id) again, and it is applied at most once" if unknown else
                   "nothing was applied: the same message may be sent again"))
        issues = [i for e in response["entry"][1:] for i in e["resource"].get("issue", ())]
        final = self.response({"id": mid, "event": header["event"]}, base, Outcome(
            "transient-error", [*issues, issue("error", "transient",
                                               "MESSAGE_RETRIES_EXHAUSTED", text)]))
        dead = await give_up(self.store, mid, "unknown" if unknown else "unsent",
                             _distinct(final, f"gave-up/{uuid.uuid4()}"), url)
        log.warning("message_dead_lettered", dead_letter=dead, attempts=attempts,
                    outcome="unknown" if unknown else "unsent")
        self.outbox.wake()
        return None

    @staticmethod
    def _unknown(response: dict[str, Any]) -> bool:
        for e in response["entry"][1:]:
            for i in e["resource"].get("issue", ()):
                for c in (i.get("details") or {}).get("coding", ()):
                    if c.get("code") == "WRITE_OUTCOME_UNKNOWN":
                        return True
        return False

    async def _apply(self, message: dict[str, Any], header: dict[str, Any], base: str,
                     again: bool) -> tuple[dict[str, Any], bool]:
        mid = header["id"]
        event = header["event"].get("code") if header["event"].get(
            "system") == self.spec.event_system else None
        try:
            focus = await self._write(message, header, again, mid)
        except Outcome as out:
            metrics.message_processed(event, self.spec.events, out.code)
            return self.response(header, base, out), out.final
        metrics.message_processed(event, self.spec.events, "ok")
        return self.response(header, base, None, focus), True

    def event_of(self, header: dict[str, Any]) -> tuple[str, Any]:
        event = header["event"]
        code = event.get("code")
        found = self.spec.events.get(code) if event.get("system") == self.spec.event_system \
            else None
        if found is None:
            raise _fatal("MESSAGE_EVENT_NOT_SUPPORTED",
                         "this server does not process that message event (see the "
                         "CapabilityStatement's messaging events)", "not-supported")
        return code, found

    def focus_of(self, message: dict[str, Any], header: dict[str, Any], rtype: str
                 ) -> dict[str, Any]:
        entries = [e for e in message["entry"][1:] if isinstance(e, dict)
                   and isinstance(e.get("resource"), dict)]
        focus = header.get("focus") or []
        if not isinstance(focus, list) or not all(
                isinstance(f, dict) and isinstance(f.get("reference", ""), str) for f in focus):
            # a client's malformed focus is its error, never ours (a 500), nor passed over
            raise _fatal("MESSAGE_FOCUS_INVALID", "MessageHeader.focus must be a list of "
                                                  "References")
        refs = [f["reference"] for f in focus if f.get("reference")]  # (or by identifier)
        for ref in refs:
            for e in entries:
                r = e["resource"]
                if ref in (e.get("fullUrl"), f"{r.get('resourceType')}/{r.get('id')}"):
                    if r.get("resourceType") != rtype:
                        raise _fatal("MESSAGE_FOCUS_INVALID", f"the event's focus must be a "
                                                              f"{rtype}")
                    return dict(r)
        if refs:
            raise _fatal("MESSAGE_FOCUS_INVALID", "MessageHeader.focus does not resolve to "
                                                  "an entry of the message")
        mine = [e["resource"] for e in entries if e["resource"].get("resourceType") == rtype]
        if len(mine) != 1:
            raise _fatal("MESSAGE_FOCUS_INVALID", f"the message must carry one {rtype} (or "
                                                  "name it in MessageHeader.focus)", "required")
        return dict(mine[0])

    async def _write(self, message: dict[str, Any], header: dict[str, Any], again: bool,
                     mid: str) -> str | None:
        _, event = self.event_of(header)
        resource = self.focus_of(message, header, event.focus)
        provider = self.registry.get(event.focus)
        try:
            if event.focus != "Patient":
                resource = await self._patient_in_message(message, resource)
            if event.write == "create":
                resource.pop("id", None)  # the PAS gives the new id
            writes.validate(resource, event.focus, provider.profile)
            record = provider.to_record(resource)
            if event.write == "update":
                rid = resource.get("id")
                if not isinstance(rid, str):
                    raise _fatal("MESSAGE_FOCUS_INVALID", f"an update needs the {event.focus}'s"
                                                          " id", "required")
                if await provider.read(rid) is None:
                    raise _fatal("RESOURCE_NOT_FOUND", f"{event.focus} with that id was not "
                                                       "found", "not-found")
            elif again:
                found = await self._existing(provider, resource)
                if found is not None:
                    return f"{event.focus}/{found}"
        except GatewayError as exc:
            raise self._from_error(exc, sent=False) from exc
        await self.store.state(mid, "unknown")  # from here the write may reach the PAS
        try:
            if event.write == "create":
                result = await provider.write(Write("create", record))
                return f"{event.focus}/{result.id}" if result.id else None
            await provider.write(Write("update", record, id=resource["id"]))
            return f"{event.focus}/{resource['id']}"
        except audit.AuditUnavailable as exc:  # before anything was sent: try again later
            raise Outcome("transient-error", exc.outcome()["issue"], final=False) from exc
        except GatewayError as exc:
            raise self._from_error(exc, sent=True) from exc

    async def _patient_in_message(self, message: dict[str, Any], resource: dict[str, Any]
                                  ) -> dict[str, Any]:
        """The focus's ``subject``/``patient`` naming a Patient carried in the message (by
        its fullUrl, e.g. ``urn:uuid:...``) becomes ``Patient/<id>`` of that patient here:
        the PAS's record found by the Patient's identifiers (NHS number first)."""
        for key in ("subject", "patient"):
            ref = (resource.get(key) or {}).get("reference") if isinstance(
                resource.get(key), dict) else None
            if not isinstance(ref, str) or ref.startswith("Patient/"):
                continue
            entry = next((e for e in message["entry"][1:] if isinstance(e, dict)
                          and e.get("fullUrl") == ref and isinstance(e.get("resource"), dict)),
                         None)
            if entry is None or entry["resource"].get("resourceType") != "Patient":
                continue
            if "Patient" not in self.registry:
                raise _fatal("MESSAGE_FOCUS_INVALID", "this server cannot find the message's "
                                                      "Patient: Patient is not served here")
            found = await self._by_identifier(self.registry.get("Patient"), entry["resource"])
            if found is None:
                raise _fatal("RESOURCE_NOT_FOUND", "the message's Patient is not known to "
                                                   "the system behind this server (by its "
                                                   "identifiers); register it first",
                             "not-found")
            resource = {**resource, key: {**resource[key], "reference": f"Patient/{found}"}}
        return resource

    async def _by_identifier(self, provider: Any, resource: dict[str, Any]) -> str | None:
        """The one record with an identifier of ``resource`` (NHS number first), if any."""
        idents = [i for i in writes.identifiers(resource) if isinstance(i, dict)
                  and isinstance(i.get("system"), str) and isinstance(i.get("value"), str)]
        idents.sort(key=lambda i: i["system"] != writes.NHS_NUMBER_SYSTEM)
        for ident in idents:
            try:
                plan = self.registry.plan(provider, [
                    ("identifier", f"{ident['system']}|{ident['value']}")], default_count=2,
                    max_count=2, strict=True, note=False)
            except GatewayError:  # an identifier this source cannot search by
                continue
            page = await provider.search(plan)
            if len(page.records) == 1:
                return str(provider.resource(page.records[0])["id"])
        return None

    async def _existing(self, provider: Any, resource: dict[str, Any]) -> str | None:
        """After an unacknowledged create: the record if the first attempt was applied —
        found by an identifier sent, else (a visit, whose number the PAS gives) the
        subject's record of that type starting at the very time sent."""
        found = await self._by_identifier(provider, resource)
        if found is not None:
            return found
        subject = (resource.get("subject") or {}).get("reference")
        start = (resource.get("period") or {}).get("start")
        if not (isinstance(subject, str) and subject.startswith("Patient/")
                and isinstance(start, str) and len(start) >= 10):
            return None
        try:
            plan = self.registry.plan(provider, [("patient", subject), ("date", start[:10])],
                                      default_count=50, max_count=50, strict=True, note=False)
        except GatewayError:
            return None
        page = await provider.search(plan)
        want = _instant(start)
        same = [r for r in (provider.resource(rec) for rec in page.records)
                if want is not None and _instant((r.get("period") or {}).get("start")) == want]
        return str(same[0]["id"]) if len(same) == 1 else None

    @staticmethod
    def _from_error(exc: GatewayError, sent: bool) -> Outcome:
        if isinstance(exc, GatewayTimeout) and sent:
            return Outcome("transient-error", [issue(
                "error", "timeout", "WRITE_OUTCOME_UNKNOWN",
                "the write was sent but the system behind this server did not acknowledge it "
                "in time, so it MAY HAVE BEEN APPLIED; send the same message (the same "
                "MessageHeader.id) again: it is applied at most once")], final=False)
        if isinstance(exc, ServiceUnavailable | GatewayTimeout):
            return Outcome("transient-error", exc.outcome()["issue"], final=False)
        return Outcome("fatal-error", exc.outcome()["issue"])

    def response(self, header: dict[str, Any], base: str, out: Outcome | None,
                 focus: str | None = None) -> dict[str, Any]:
        mid = header["id"]
        rid = str(uuid.uuid5(_NS, f"response/{mid}"))
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        resp: dict[str, Any] = {
            "resourceType": "MessageHeader", "id": rid, "event": header["event"],
            "timestamp": now, "source": {"name": "careconnect-gateway", "endpoint": base},
            "response": {"identifier": mid, "code": out.code if out else "ok"}}
        src = header.get("source")
        if isinstance(src, dict) and isinstance(src.get("endpoint"), str):
            resp["destination"] = [{"endpoint": src["endpoint"]}]
        entries: list[dict[str, Any]] = [{"fullUrl": f"urn:uuid:{rid}", "resource": resp}]
        if focus:
            resp["focus"] = [{"reference": focus}]
        if out is not None:
            oid = str(uuid.uuid5(_NS, f"outcome/{mid}"))
            resp["response"]["details"] = {"reference": f"urn:uuid:{oid}"}
            entries.append({"fullUrl": f"urn:uuid:{oid}",
                            "resource": {**operation_outcome(out.issues), "id": oid}})
        bid = str(uuid.uuid5(_NS, f"bundle/{mid}"))
        return {"resourceType": "Bundle", "id": bid, "meta": {"lastUpdated": now},
                "type": "message", "entry": entries}

    def capability(self, base: str) -> dict[str, Any]:
        """The CapabilityStatement's ``messaging``: exactly the events declared."""
        return {
            "endpoint": [{"protocol": {"system": "http://hl7.org/fhir/message-transport",
                                       "code": "http"},
                          "address": f"{base}/$process-message"}],
            "documentation": "Synchronous by default; async=true with a response-url on the "
                             "server's allow-list for asynchronous processing. Idempotent by "
                             "MessageHeader.id.",
            "event": [{"code": {"system": self.spec.event_system, "code": code,
                                "display": e.display},
                       "category": "Consequence", "mode": "receiver", "focus": e.focus,
                       "request": {"reference": self.registry.get(e.focus).profile},
                       "response": {"reference":
                                    "http://hl7.org/fhir/StructureDefinition/MessageHeader"},
                       **({"documentation": e.documentation} if e.documentation else {})}
                      for code, e in self.spec.events.items()]}


class ProcessMessage(Operation):
    name = "process-message"
    levels = frozenset({"system"})
    methods = ("POST",)
    idempotent = False
    definition_url = DEFINITION
    parameters = (
        Parameter("content", "Bundle", min=1, documentation="The message (the request body)"),
        Parameter("async", "boolean", documentation="Process later; the response goes to "
                                                    "response-url"),
        Parameter("response-url", "uri", documentation="Where to deliver the response "
                                                       "(asynchronous; allow-listed)"),
        Parameter("return", "Bundle", use="out", documentation="The response message"),
    )
    scopes = "create (or update) of the event's focus type, as the write it makes"

    def __init__(self, messaging: Messaging) -> None:
        self.messaging = messaging

    def messaging_capability(self, base_url: str) -> dict[str, Any]:
        return self.messaging.capability(base_url)

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request = call.request
        fmt = ctx.fmt(request)
        message = await writes.read_body(request, ctx.settings.max_body_bytes)
        is_async, url = False, None
        if message.get("resourceType") == "Parameters":
            content = None
            for p in parameter_list(message):
                if not isinstance(p, dict):
                    continue
                if p.get("name") == "content":
                    content = p.get("resource")
                elif p.get("name") == "async":
                    is_async = p.get("valueBoolean") is True
                elif p.get("name") == "response-url":
                    url = p.get("valueUri")
            if not isinstance(content, dict):
                raise BadRequest("the Parameters need a 'content' parameter (the message)")
            message = content
        q = request.query_params
        if "async" in q:
            if q["async"] not in ("true", "false"):
                raise BadRequest("'async' is true or false")
            is_async = q["async"] == "true"
        url = q.get("response-url", url)
        header = header_of(message)
        base = ctx.base_url(request)
        try:
            _, event = self.messaging.event_of(header)
        except Outcome:
            event = None
        if event is not None:  # the write's own scope, before anything is stored
            authorize.require(request, event.focus, "c" if event.write == "create" else "u")
        else:
            authorize.principal_of(request)
        if not is_async:
            if url:
                raise BadRequest("'response-url' is for async=true")
            response = await self.messaging.process(message, base)
            audit.note_outcome(*audit_outcome(response))  # the response's, not the 200's
            return ctx.respond(response, fmt)
        if not url:
            raise BadRequest("async=true needs a 'response-url'")
        if not allowed(url, self.messaging.allow_list):
            raise BadRequest("'response-url' is not on this server's allow-list "
                             "(CCG_MESSAGING_RESPONSE_URLS)")
        await self.messaging.accept(message, url, base, audit.caller(request.scope))
        body = operation_outcome([notice("MESSAGE_ACCEPTED",
                                         "accepted; the response message will be delivered "
                                         "to the response-url")])
        return ctx.respond(body, fmt, status=202)
