"""An independent NHS ITK PAS for tests: no code shared with adapters/hl7v2 or the simulator.

python-hl7 (the ``hl7`` package) parses what arrives and frames it (``hl7.mllp``, its own
asyncio MLLP server); the replies are plain ER7 text built from the ITK sample messages in
../shared (its one patient is the sample's FREDRICA SMITH, given a PAS number). It keeps
patients as PID field lists in memory and answers:

* QBP^Q21 by PAS number (``<n>^^^<authority>^PI``), QBP^Q22 on ``@PID.3.1`` (with or without
  ``@PID.3.4``/``@PID.3.5`` qualifiers: any identifier), ``@PID.5.1`` / ``@PID.5.2`` (a
  trailing ``*`` is "starts with"), ``@PID.7`` and ``@PID.8`` — anything else AE;
* ADT^A28 (a new PAS number; a plain ACK unless ``ack_pid``) and ADT^A31 (by PAS number).

QBP^Q22 pages as the ITK query protocol says: RCP-2 ``<n>^RD`` is the most records a reply
holds; when more remain the reply ends with ``DSC|<pointer>|I`` (a random token it remembers,
never anything derived from the data) and the same query sent with that DSC continues after
them. How it pages varies (constructor flags): ``page_cap`` (at most that many a reply,
whatever was asked: short pages), ``honour_quantity=False`` (RCP-2 ignored: a reply holds
``page_cap`` or all), ``pointer_ttl`` (seconds a pointer lives), ``pointer_uses`` (how often
one may be sent: 1, a single-use cursor), and ``down`` (set it to close every connection on
receipt without an answer: the PAS has stopped answering).

Behaviour varies by constructor flags, so the gateway is tried against more than one PAS,
and ``behaviour`` scripts what the next ADT messages meet (one entry each, in order):

* ``accept`` — applied, AA (as without a script);
* ``AE`` / ``AR`` — refused, not applied: an ACK with that code and an ERR (207);
* ``reject:<errors>`` — refused, not applied, with the ``nak`` code and these errors, in the
  ``err_form``: comma-separated ``<code>[@<SEG-n>]``, a ``W`` before the code making it a
  warning (``reject:W0,205@PID-3``: a warning, then a duplicate key at PID-3);
* ``warn`` — applied, AA with a warning ERR (code 0, severity W in the v2.5 form);
* ``late`` — applied, the AA sent ``late_seconds`` later (after the sender stopped waiting);
* ``drop`` — applied, then the connection closed without an answer;
* ``drop-unapplied`` — the connection closed on receipt: nothing applied, nothing answered.

How it refuses varies too: ``nak`` (MSA-1 ``AE`` or ``AR``), ``err_form`` — ``v2.4`` (one ERR,
each error a repetition of ERR-1, an ELD: ``PID^1^3^205&text&HL70357``), ``v2.5`` (one ERR
per error: ERR-2 location, ERR-3 code, ERR-4 severity, ERR-8 text; MSH-12 2.5), ``msa6``
(no ERR: the code in MSA-6, as v2.3 PASes do) or ``none`` (no code at all: MSA-3 text only)
— and ``unique_nhs`` (an A28 with an NHS number it already holds is refused: 205 at PID-3;
off, it registers the duplicate, as some PASes do). An A31 of a PAS number it does not know
is 204 at PID-3. Its error texts name the patient (name, NHS number), as careless PAS
interfaces do: they must never reach a client or an info-level log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp

SAMPLES = Path(__file__).resolve().parents[4] / "shared" / "hl7v2-samples" / "uk-itk-adt"
FIRST_NUMBER = "RCB0000001"


def _sample_pid() -> list[str]:
    text = (SAMPLES / "A28_Example.txt").read_text(encoding="utf-8")
    msg = hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))
    return str(msg.segment("PID")).split("|")


def _field(msg: Any, segment: str, n: int) -> str:
    """Field ``n`` of the message's first ``segment`` as text ("" if absent)."""
    for seg in str(msg).split("\r"):
        parts = seg.split("|")
        if parts[0] == segment:
            return parts[n] if len(parts) > n else ""
    return ""


def _identifiers(field: str) -> list[list[str]]:
    return [rep.split("^") + [""] * 5 for rep in field.split("~") if rep]


# HL7 table 0357 (v2.4), the meanings this PAS writes beside its codes
_MEANING = {"0": "Message accepted", "100": "Segment sequence error",
            "101": "Required field missing", "102": "Data type error",
            "103": "Table value not found", "204": "Unknown key identifier",
            "205": "Duplicate key identifier", "206": "Application record locked",
            "207": "Application internal error"}


class _Refused(Exception):
    """An ADT this PAS refuses: a table 0357 code, its own words, where (``PID-3``)."""

    def __init__(self, code: str, text: str, where: str = "") -> None:
        super().__init__(text)
        self.code, self.text, self.where = code, text, where


def _errors(script: str) -> list[tuple[str, str, str]]:
    """``W0,205@PID-3`` → [(W, 0, ""), (E, 205, PID-3)]."""
    out = []
    for item in script.split(","):
        severity = "W" if item.startswith("W") else "E"
        code, _, where = item.removeprefix("W").partition("@")
        out.append((severity, code, where))
    return out


def _eld_location(where: str) -> str:
    """v2.4 ELD components 1-3: segment ID, sequence, field position (``PID^1^3``)."""
    seg, _, n = where.partition("-")
    return f"{seg}^1^{n}" if where else "^^"


class ItkPeer:
    def __init__(self, *, ack_pid: bool = False, wildcard: str = "*",
                 late_seconds: float = 2.0, page_cap: int | None = None,
                 honour_quantity: bool = True, pointer_ttl: float | None = None,
                 pointer_uses: int | None = None, nak: str = "AE", err_form: str = "v2.4",
                 unique_nhs: bool = False) -> None:
        self.nak = nak
        self.err_form = err_form
        self.unique_nhs = unique_nhs
        self.page_cap = page_cap
        self.honour_quantity = honour_quantity
        self.pointer_ttl = pointer_ttl
        self.pointer_uses = pointer_uses
        self.down = False
        """Set: every connection is closed on receipt, nothing answered."""
        self.continued: list[str] = []
        """DSC-1 of every continuation query received, in order (a re-sent one twice)."""
        self._pointers: dict[str, list[Any]] = {}
        """pointer → [query, offset, issued at, uses left]"""
        self.ack_pid = ack_pid
        self.wildcard = wildcard
        self.late_seconds = late_seconds
        self.behaviour: list[str] = []
        """What the next ADT messages meet (see the module's docstring), consumed in order."""
        self.adt_controls: list[str] = []
        """MSH-10 of every ADT message received (a resend shows as the same id twice)."""
        pid = _sample_pid()
        pid[3] = f"{FIRST_NUMBER}^^^RCB^PI~{pid[3]}"
        self.patients: dict[str, list[str]] = {FIRST_NUMBER: pid}
        self.received: list[str] = []
        """MSH-9 of every message, in order (``QBP^Q22^QBP_Q21``)."""
        self._next = 2
        self._server: Any = None

    async def start(self) -> int:
        self._server = await hl7.mllp.start_hl7_server(self._client, "127.0.0.1", 0,
                                                         encoding="utf-8")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while True:
                message = await reader.readmessage()
                if self.down:
                    return
                step = "accept"
                if str(message["MSH.F9.R1.C1"]) == "ADT":
                    self.adt_controls.append(str(message["MSH.F10"]))
                    step = self.behaviour.pop(0) if self.behaviour else "accept"
                if step == "drop-unapplied":
                    self.received.append(f"{message['MSH.F9.R1.C1']}^{message['MSH.F9.R1.C2']}")
                    return
                if step in ("AE", "AR") or step.startswith("reject:"):
                    self.received.append(f"{message['MSH.F9.R1.C1']}^{message['MSH.F9.R1.C2']}")
                    code, errors = ((step, [("E", "207", "")]) if step in ("AE", "AR") else
                                    (self.nak, _errors(step.removeprefix("reject:"))))
                    answer = self._ack(str(message["MSH.F10"]), str(message["MSH.F9.R1.C2"]),
                                       code, "refused by the test script", errors=errors)
                else:
                    answer = self.answer(message)
                    if step == "warn":  # applied; the AA carries a warning
                        answer = self._with_warning(answer)
                if step == "drop":
                    return
                if step == "late":
                    await asyncio.sleep(self.late_seconds)
                writer.writeblock(answer.encode("utf-8"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    # -- one message in, one reply out

    def answer(self, msg: Any) -> str:
        control = str(msg["MSH.F10"])
        kind, trigger = str(msg["MSH.F9.R1.C1"]), str(msg["MSH.F9.R1.C2"])
        self.received.append(f"{kind}^{trigger}")
        try:
            if kind == "QBP" and trigger in ("Q21", "Q22"):
                return self._query(msg, control, trigger)
            if kind == "ADT" and trigger in ("A28", "A31"):
                return self._adt(msg, control, trigger)
        except _Refused as exc:
            return self._ack(control, trigger, self.nak, exc.text,
                             errors=[("E", exc.code, exc.where)])
        except LookupError as exc:
            return self._ack(control, trigger, "AE", str(exc))
        return self._ack(control, trigger, "AR", "unsupported message")

    def _msh(self, structure: str) -> str:
        now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
        version = "2.5" if self.err_form == "v2.5" else "2.4"
        return (f"MSH|^~\\&|PAS|RCB|ROUTE|ROUTE|{now}||{structure}|P{now}{self._next}|P|"
                f"{version}|||||GBR|UNICODE|EN")

    def _ack(self, control: str, trigger: str, code: str, text: str = "",
             extra: str = "", errors: list[tuple[str, str, str]] | None = None) -> str:
        """``errors``: (severity, table 0357 code, location ``SEG-n`` or "") each, written in
        this PAS's ``err_form``; a refusal without any says 207 (application error)."""
        if code != "AA" and not errors:
            errors = [("E", "207", "")]
        errors = errors or []
        msa = f"MSA|{code}|{control}|{text}"
        lines = [self._msh(f"ACK^{trigger}^ACK")]
        if self.err_form == "msa6" and errors:  # v2.3: MSA-6 error condition, no ERR
            lines.append(f"{msa}|||{errors[-1][1]}^{_MEANING.get(errors[-1][1], text)}")
        else:
            lines.append(msa.rstrip("|"))
        if self.err_form == "v2.4" and errors:
            lines.append("ERR|" + "~".join(
                f"{_eld_location(where)}^{c}&{text or _MEANING.get(c, 'error')}&HL70357"
                for _, c, where in errors))
        elif self.err_form == "v2.5":
            for severity, c, where in errors:
                seg, _, n = where.partition("-")
                erl = f"{seg}^1^{n}" if where else ""
                lines.append(f"ERR||{erl}|{c}^{_MEANING.get(c, 'error')}^HL70357|{severity}"
                             f"||||{text}")
        return "\r".join(lines + ([extra] if extra else [])) + "\r"

    def _with_warning(self, answer: str) -> str:
        """An AA with a warning: accepted, with a remark (a v2.5 ERR-4 W; v2.4 has no
        severity, so there the ERR carries code 0, message accepted)."""
        if self.err_form == "v2.5":
            warning = "ERR|||0^Message accepted^HL70357|W||||address not verified"
        else:
            warning = "ERR|^^^0&address not verified&HL70357"
        lines = answer.rstrip("\r").split("\r")
        return "\r".join([*lines[:2], warning, *lines[2:]]) + "\r"

    def _query(self, msg: Any, control: str, trigger: str) -> str:
        qpd = msg.segment("QPD")
        tag = str(qpd[2])
        if trigger == "Q21":
            number = str(msg["QPD.F3.R1.C1"])
            found = [number] if number in self.patients else []
        else:
            found = [n for n, pid in self.patients.items()
                     if all(self._holds(pid, str(c)) for c in qpd[3] if str(c))]
        offset, size = 0, len(found)
        if trigger == "Q22":
            query = str(qpd[3])
            offset = self._continue(msg, query)
            size = len(found) - offset
            quantity = _field(msg, "RCP", 2).split("^")[0]
            if self.honour_quantity and quantity.isdigit():
                size = min(size, int(quantity))
            if self.page_cap is not None:
                size = min(size, self.page_cap)
        rows = [self.patients[n] for n in found[offset:offset + size]]
        remaining = len(found) - offset - len(rows)
        lines = [self._msh(f"RSP^K{trigger[1:]}^RSP_K21"), f"MSA|AA|{control}",
                 f"QAK|{tag}|{'OK' if found else 'NF'}|{qpd[1]}|{len(found)}|{len(rows)}|"
                 f"{remaining}",
                 str(qpd)]
        for i, pid in enumerate(rows, 1):
            lines.append("|".join(["PID", str(i), *pid[2:]]))
        if remaining > 0:
            pointer = secrets.token_hex(8)
            self._pointers[pointer] = [str(qpd[3]), offset + len(rows), time.monotonic(),
                                       self.pointer_uses]
            lines.append(f"DSC|{pointer}|I")
        return "\r".join(lines) + "\r"

    def _continue(self, msg: Any, query: str) -> int:
        """Where a continuation (DSC-1) resumes; LookupError (→ AE) for a bad pointer."""
        pointer = _field(msg, "DSC", 1)
        if not pointer:
            return 0
        self.continued.append(pointer)
        entry = self._pointers.get(pointer)
        if entry is None or entry[0] != query:
            raise LookupError("continuation pointer not known for this query")
        if self.pointer_ttl is not None and time.monotonic() - entry[2] > self.pointer_ttl:
            raise LookupError("continuation pointer has expired")
        if entry[3] is not None:
            if entry[3] <= 0:
                raise LookupError("continuation pointer was already used")
            entry[3] -= 1
        offset: int = entry[1]
        return offset

    def _holds(self, pid: list[str], criterion: str) -> bool:
        name, _, value = criterion.lstrip("@").partition("^")
        field = dict(enumerate(pid))
        if name in ("PID.3.4", "PID.3.5"):
            return True  # a qualifier: any identifier of the number matches
        if name in ("PID.3", "PID.3.1"):
            return any(cx[0] == value for cx in _identifiers(field.get(3, "")))
        if name in ("PID.5", "PID.5.1", "PID.5.2"):
            part = 1 if name.endswith(".2") else 0
            have = [*field.get(5, "").split("^"), "", ""][part].upper()
            if value.endswith(self.wildcard):
                return have.startswith(value[:-1].upper())
            return have == value.upper()
        if name == "PID.7":
            return field.get(7, "")[: len(value)] == value
        if name == "PID.8":
            sex = {"1": "M", "2": "F", "9": "U"}.get(field.get(8, ""), field.get(8, ""))
            return sex == value.upper() or field.get(8, "") == value
        raise LookupError(f"QPD-3 field {name} is not supported")

    def _adt(self, msg: Any, control: str, trigger: str) -> str:
        sent = str(msg.segment("PID")).split("|")
        ids = _identifiers(sent[3] if len(sent) > 3 else "")
        nhs = [cx[0] for cx in ids if cx[3] == "NHS" or cx[4] == "NH"]
        if trigger == "A28":
            if self.unique_nhs:
                for n, pid in self.patients.items():
                    held = [cx[0] for cx in _identifiers(pid[3])]
                    if any(x in held for x in nhs):
                        # what a careless PAS says: the holder named, the number repeated
                        name = pid[5].replace("^", " ") if len(pid) > 5 else ""
                        raise _Refused("205", f"NHS number {nhs[0]} already registered to "
                                              f"{name} ({n})", "PID-3")
            number = f"RCB{self._next:07d}"
            self._next += 1
            stored = list(sent)
        else:
            number = next((cx[0] for cx in ids if cx[4] == "PI"), "")
            if number not in self.patients:
                raise _Refused("204", f"no patient has PAS number {number}", "PID-3")
            stored = self.patients[number]
            stored += [""] * (len(sent) - len(stored))
            for i, value in enumerate(sent[4:], 4):  # HL7 update: "" clears, empty keeps
                if value == '""':
                    stored[i] = ""
                elif value:
                    stored[i] = value
        stored[3] = "~".join([f"{number}^^^RCB^PI", *(f"{n}^^^NHS" for n in nhs)])
        self.patients[number] = stored
        extra = f"PID|1||{stored[3]}" if self.ack_pid else ""
        return self._ack(control, trigger, "AA", extra=extra)
