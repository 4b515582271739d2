"""The PAS simulator's MLLP listener: one message in, one reply out, faults applied."""

from __future__ import annotations

# ruff: noqa: SIM300
import collections
import ssl as ssl_module
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.to_thread
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from adapters.hl7v2 import er7, messages
from adapters.hl7v2.mllp_server import MllpServer, Reply
from adapters.text import fold
from gateway.demo_pas.hl7v2.adt import _admit, _create, _update
from gateway.demo_pas.hl7v2.faults import Faults, deliver
from gateway.demo_pas.hl7v2.profiles import PROFILES, Profile
from gateway.demo_pas.hl7v2.queries import Queries
from gateway.demo_pas.hl7v2.wire import (
    _IDEMPOTENCY_MEMORY,
    TRUST_ODS,
    _f,
    _Reject,
    _reply_header,
    _Request,
    _request,
    _seg,
    _sniff_control_id,
    _Writer,
    pat,
)

log = structlog.get_logger("gateway.demo_pas.hl7v2")

class PasSimulator(Queries):
    """An MLLP server that behaves as the PAS contract above says. ``async with`` it, or call
    ``start()``/``stop()``; ``port`` is the bound port (pass ``port=0`` for a free one)."""

    def __init__(self, db_url: str, *, host: str = "127.0.0.1", port: int = 0,
                 sex_codes: Literal["hl7", "nhs"] = "hl7",
                 ssl: ssl_module.SSLContext | None = None, max_quantity: int = 100,
                 dialect: str | Profile = "demo") -> None:
        self.profile = dialect if isinstance(dialect, Profile) else PROFILES[dialect]
        if sex_codes not in ("hl7", "nhs"):
            raise ValueError("sex_codes must be 'hl7' or 'nhs'")
        if max_quantity < 1:
            raise ValueError("max_quantity must be at least 1")
        self.faults = Faults()
        self.received: list[str] = []
        """MSH-10 of every message received, in order ('' when it could not be read)."""
        self.max_quantity = max_quantity
        self._writer = _Writer(sex_codes, self.profile)
        kwargs: dict[str, Any] = {}
        if db_url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        self.engine: Engine = sa.create_engine(db_url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_functions)
        self._server = MllpServer(self._handle, host=host, port=port, ssl=ssl)
        self._write_lock = anyio.Lock()
        self._acks: collections.OrderedDict[tuple[str, str, str], bytes] = (
            collections.OrderedDict())

    @property
    def port(self) -> int:
        port: int = self._server.port
        return port

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float = 0.0) -> None:
        """Stop; with ``grace``, the answers being made are finished and sent first."""
        try:
            await self._server.stop(grace)
        finally:
            self.engine.dispose()

    async def __aenter__(self) -> PasSimulator:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # -- one message in, one reply out

    async def _handle(self, data: bytes) -> bytes | Reply | None:
        try:
            msg: er7.Message | None = er7.parse(data)
        except er7.Er7Error:
            msg = None
        control = (msg.control_id if msg is not None else None) or _sniff_control_id(data)
        self.received.append(control or "")
        if not control:
            log.info("pas_simulator_unreadable", detail="no MSH-10: closing the connection")
            return Reply(None, drop_connection=True)
        kind = ((msg.segments[0].value(9, 1) if msg is not None else None) or "").upper()
        due = self.faults.applies(kind)
        if msg is None:
            reply = messages.ack(_reply_header(None), messages.new_control_id(),
                                 acknowledges=control, code="AR",
                                 text="message could not be parsed",
                                 error=("100", "message could not be parsed"))
        else:
            reply = await self._respond(msg, control, due)
        return deliver(self.faults, reply, control, due)

    async def _respond(self, msg: er7.Message, control: str, due: bool = True) -> bytes:
        request = _request(msg, control)
        faults = self.faults
        if due and (faults.nak_ae_count > 0 or faults.nak_ar_count > 0):
            code: Literal["AE", "AR"] = "AE" if faults.nak_ae_count > 0 else "AR"
            if code == "AE":
                faults.nak_ae_count -= 1
            else:
                faults.nak_ar_count -= 1
            return self._ack(request, code, "207", f"simulated {code} fault")
        handlers: dict[tuple[str, str], Callable[[_Request], Any]] = {
            ("QBP", "Q21"): self._q21, ("QBP", "Q22"): self._find,
            ("QBP", "ZV1"): self._find, ("ADT", "A28"): self._adt, ("ADT", "A31"): self._adt,
        }
        if self.profile.admissions:
            handlers[("ADT", "A01")] = self._adt
        handler = handlers.get((request.kind, request.trigger))
        if handler is None:
            known = request.kind in ("QBP", "ADT")
            return self._ack(request, "AR", "201" if known else "200",
                             f"unsupported {'event' if known else 'message type'}")
        if request.kind == "ADT":
            return await self._adt_once(request)
        try:
            result: bytes = await anyio.to_thread.run_sync(handler, request)
        except _Reject as exc:
            return self._rsp_error(request, exc)
        except Exception as exc:  # the PAS must answer, whatever went wrong
            log.warning("pas_simulator_error", error=type(exc).__name__)
            return self._rsp_error(request, _Reject("207", "application internal error"))
        return result

    # -- ADT (writes, serialised, idempotent on the control id)

    async def _adt_once(self, request: _Request) -> bytes:
        msh = request.msg.segments[0]
        key = (msh.value(3) or "", msh.value(4) or "", request.control_id)
        async with self._write_lock:
            cached = self._acks.get(key) if self.profile.resend_dedup else None
            if cached is not None:
                self._acks.move_to_end(key)
                return cached
            try:
                pid_text = await anyio.to_thread.run_sync(self._adt, request)
                reply = self._ack(request, "AA", None, None,
                                  extra=pid_text if self.profile.ack_pid else "")
            except _Reject as exc:
                reply = self._ack(request, exc.ack, exc.code, exc.text, where=exc.where)
            except Exception as exc:
                log.warning("pas_simulator_error", error=type(exc).__name__)
                reply = self._ack(request, "AE", "207", "application internal error")
            self._acks[key] = reply
            while len(self._acks) > _IDEMPOTENCY_MEMORY:
                self._acks.popitem(last=False)
            return reply

    def _adt(self, request: _Request) -> str:
        msg = request.msg
        pid = msg.segment("PID")
        if pid is None:
            raise _Reject("101", "PID segment missing")
        by = self.profile.nhs_by
        with self.engine.begin() as conn:
            if request.trigger == "A01":
                refno, number = _admit(conn, pid, msg.segment("PV1"), by)
                row = conn.execute(sa.select(pat.c.PASID, pat.c.NHS_NUMBER)
                                   .where(pat.c.PATNT_REFNO == refno)).one()
                ids = [_f(row.PASID, None, None, TRUST_ODS, "PI")]
                # the ACK names the new visit, as it names a new patient after an A28
                return "\r".join([_seg("PID", {1: "1", 3: ids}), _seg("PV1", {
                    1: "1", 19: _f(number, None, None, TRUST_ODS, "VN")})])
            if request.trigger == "A28":
                refno = _create(conn, pid, msg.segment("PD1"), msg.encoding, by)
            else:
                refno = _update(conn, pid, msg.segment("PD1"), msg.encoding, by)
            row = conn.execute(sa.select(pat.c.PASID, pat.c.NHS_NUMBER)
                               .where(pat.c.PATNT_REFNO == refno)).one()
        ids = [_f(row.PASID, None, None, TRUST_ODS, "PI")]
        if row.NHS_NUMBER:
            ids.append(self._writer.nhs(row.NHS_NUMBER))
        return _seg("PID", {1: "1", 3: ids})


def _sqlite_functions(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.create_function("ccg_fold", 1, lambda v: None if v is None else fold(str(v)),
                               deterministic=True)
