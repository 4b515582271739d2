"""An ADT message → what the gateway records of it, and the ACK that answers it.

The resources come from the HL7 v2 mapping files (the same compiled mappings, the same
``Hl7v2Adapter.records`` that reads PID groups out of query replies), so an ADT feed and a
query answer for the same patient give the same Patient. Which events are accepted and what
each implies (Encounter status, merges) is declared in ``adt/events.yaml`` beside them.

ACKs follow HL7 v2: original mode (MSH-15 and MSH-16 empty) answers AA, AE (the message is
understood but cannot be applied: a required field is missing, a code cannot be mapped) or AR
(refused: not ADT, an event not configured, wrong processing id or version, or the store
could not record it — resend). Enhanced mode (MSH-15 or MSH-16 set) answers in two steps
(HL7 v2.4 2.13.2): the accept ACK CA / CE / CR — was the message committed to safe storage —
sent as MSH-15 asks, then the application ACK AA / AE / AR — the outcome of processing it — as
a separate message sent as MSH-16 asks (AL always, NE never, ER on error only, SU on success
only; an empty MSH-15 is read as AL, an empty MSH-16 as NE). See ``replies``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from adapters.hl7v2 import er7
from adapters.hl7v2.adapter import Hl7v2Adapter, parse_ref
from gateway.adt.store import Incoming
from gateway.errors import UnmappableData
from gateway.providers import Provider

log = structlog.get_logger("gateway.adt")

EVENTS_FILE = "adt/events.yaml"


class EventSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    resources: list[Literal["Patient", "Encounter"]]
    encounter_status: str | None = None
    encounter_status_override: str | None = None
    merge: str | None = None


class EventsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    events: dict[str, EventSpec]


class AdtConfigError(Exception):
    pass


def load_events(directory: Path) -> dict[str, EventSpec]:
    path = directory / EVENTS_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return dict(EventsFile.model_validate(data).events)
    except FileNotFoundError:
        raise AdtConfigError(f"{path}: not found (the ADT listener needs it)") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise AdtConfigError(f"{path}: {exc}") from None


class Refused(Exception):
    """The message cannot be recorded. ``code`` AE/AR, ``error`` an HL7 table 0357 code."""

    def __init__(self, code: Literal["AE", "AR"], error: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.error = error
        self.text = text


@dataclass
class Mapper:
    patient: Provider
    encounter: Provider | None
    events: dict[str, EventSpec]
    processing_ids: frozenset[str] = frozenset({"P", "T"})

    @classmethod
    def from_providers(cls, providers: dict[str, Provider], events: dict[str, EventSpec],
                       processing_ids: frozenset[str] = frozenset({"P", "T"})) -> Mapper:
        patient = providers.get("Patient")
        if patient is None or not isinstance(patient.mapping.adapter, Hl7v2Adapter):
            raise AdtConfigError("the ADT listener needs a Patient mapping over HL7 v2")
        enc = providers.get("Encounter")
        if enc is not None and not isinstance(enc.mapping.adapter, Hl7v2Adapter):
            enc = None
        return cls(patient, enc, events, processing_ids)

    def check(self, msg: er7.Message) -> tuple[str, str]:
        """The header checks: (sender, event) or Refused (AR)."""
        msh = msg.segments[0]
        control = msg.control_id
        if not control:
            raise Refused("AR", "101", "MSH-10 (message control id) is empty")
        if msh.value(9, 1) != "ADT":
            raise Refused("AR", "200", "only ADT messages are accepted here")
        event = msh.value(9, 2) or ""
        if event not in self.events:
            raise Refused("AR", "201", f"ADT^{event} is not an event this listener accepts")
        if (msh.value(11) or "") not in self.processing_ids:
            raise Refused("AR", "202", "unsupported processing id (MSH-11)")
        version = msh.value(12) or ""
        if not version.startswith("2."):
            raise Refused("AR", "203", "unsupported HL7 version (MSH-12)")
        sender = f"{msh.value(3) or ''}^{msh.value(4) or ''}"
        return sender, event

    def incoming(self, raw: bytes, msg: er7.Message) -> Incoming:
        sender, event = self.check(msg)
        spec = self.events[event]
        if msg.segment("PID") is None:
            raise Refused("AE", "100", "the message has no PID segment")
        resources: list[dict[str, Any]] = []
        patient_key: str | None = None
        try:
            precs = self._records(self.patient, msg)
            if not precs:
                raise Refused("AE", "101", "PID-3 has no patient id of the type the Patient "
                              "mapping is keyed on")
            patient = self.patient.resource(precs[0])
            patient_key = patient["id"]
            resources.append(patient)
            if "Encounter" in spec.resources and self.encounter is not None:
                for rec in self._records(self.encounter, msg):
                    enc = self.encounter.resource(rec)
                    status = spec.encounter_status_override or enc.get("status") \
                        or spec.encounter_status
                    if status:
                        enc["status"] = status
                    resources.append(enc)
        except Refused:
            raise
        except UnmappableData as exc:  # a code the code map lacks, under policy "error"
            raise Refused("AE", "103", "a coded value has no entry in its code map") from exc
        except Exception as exc:  # a mapping failure (code map policy, bad date): no PHI
            raise Refused("AE", "207", f"the message could not be mapped "
                          f"({type(exc).__name__})") from exc
        retired = None
        if spec.merge:
            retired = self._merged_id(msg, spec.merge)
            if not retired:
                raise Refused("AE", "101", f"{spec.merge} (the retired patient id) is empty")
        return Incoming(sender=sender, control_id=msg.control_id or "",
                        digest=hashlib.sha256(raw).hexdigest(), event=event,
                        patient_key=patient_key, resources=resources, retired=retired)

    @staticmethod
    def _records(provider: Provider, msg: er7.Message) -> list[Any]:
        adapter = provider.mapping.adapter
        assert isinstance(adapter, Hl7v2Adapter)
        return adapter.records(provider.mapping.prepared, msg)

    def _merged_id(self, msg: er7.Message, field: str) -> str | None:
        path = parse_ref(field).path
        seg = msg.segment(path.segment)
        if seg is None:
            return None
        # The repetition of the same identifier type as the Patient id (PI), else the first.
        id_type = self.patient.mapping.prepared.source.id_type
        for r in range(seg.repetitions(path.field)):
            if seg.value(path.field, 5, 1, r) == id_type:
                return seg.value(path.field, 1, 1, r)
        return seg.value(path.field, 1, 1, 0)


# --- acknowledgements ---------------------------------------------------------------------

_ACK_CONTROL = 0


def ack(msg: er7.Message | None, code: str, *, error: str | None = None,
        text: str | None = None, control_id: str | None = None,
        application: bool = False) -> bytes:
    """An ACK to ``msg`` (None: it could not be read), built on the sender's delimiters.

    ``application``: the enhanced-mode application ACK, a message of its own that asks for
    no acknowledgement back (MSH-15 and MSH-16 NE)."""
    global _ACK_CONTROL
    _ACK_CONTROL += 1
    enc = msg.encoding if msg is not None else None
    fs, cs = (enc.field, enc.component) if enc else ("|", "^")
    chars = (msg.segments[0].raw(2) if msg is not None else "") or "^~\\&"
    msh = msg.segments[0] if msg is not None else None

    def v(n: int) -> str:
        return msh.raw(n) if msh is not None else ""

    def esc(value: str) -> str:
        return er7.encode(value, enc) if enc is not None else value.replace(fs, " ")

    now = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    event = (msh.value(9, 2) if msh is not None else None) or ""
    mtype = cs.join(("ACK", event, "ACK")) if event else "ACK"
    ours = f"CCG{now}{_ACK_CONTROL:06d}"
    fields = ["MSH", chars, v(5), v(6), v(3), v(4), now, "", mtype, ours,
              v(11) or "P", v(12) or "2.4"]
    if application:
        fields += ["", "", "NE", "NE"]
    header = fs.join(fields)
    acked = control_id or (msg.control_id if msg is not None else None) or ""
    msa = fs.join(["MSA", code, esc(acked)] + ([esc(text)] if text else []))
    segs = [header, msa]
    if error:
        version = v(12) or "2.4"
        label = esc(text or "")
        if version >= "2.5":
            segs.append(fs.join(["ERR", "", "", cs.join((error, label, "HL70357")), "E"]))
        else:
            segs.append(fs.join(["ERR", cs.join(("", "", "", f"{error}&{label}&HL70357"))]))
    return ("\r".join(segs) + "\r").encode("utf-8")


Mode = Literal["original", "enhanced"]


def ack_mode(msg: er7.Message | None) -> tuple[Mode, str]:
    """(mode, MSH-15) — enhanced when MSH-15 or MSH-16 is valued."""
    if msg is None:
        return "original", ""
    msh = msg.segments[0]
    accept = (msh.value(15) or "").upper()
    app = (msh.value(16) or "").upper()
    return ("enhanced" if accept or app else "original"), accept


def _wanted(condition: str, ok: bool) -> bool:
    """Whether an acknowledgement is sent under an MSH-15/16 condition (table 0155)."""
    return not (condition == "NE" or (condition == "ER" and ok) or (condition == "SU" and not ok))


Commit = Literal["CA", "CE", "CR"]


def replies(msg: er7.Message | None, outcome: str | None, *, commit: Commit,
            error: str | None = None, text: str | None = None) -> list[bytes]:
    """Every acknowledgement of ``msg``, in the order to send them.

    Original mode: the one ACK, ``outcome`` (AA/AE/AR; None is read as AR, resend).
    Enhanced mode: the accept ACK ``commit`` if MSH-15 asks for it, then the application
    ACK ``outcome`` if MSH-16 asks for it (None: the message was not processed — it could
    not be committed, the sender resends it — so there is no application ACK)."""
    mode, accept = ack_mode(msg)
    if mode == "original":
        return [ack(msg, outcome or "AR", error=error, text=text)]
    assert msg is not None
    out = []
    if _wanted(accept, commit == "CA"):
        out.append(ack(msg, commit, error=None if commit == "CA" else error,
                       text=None if commit == "CA" else text))
    app = (msg.segments[0].value(16) or "NE").upper()
    if outcome is not None and _wanted(app, outcome == "AA"):
        out.append(ack(msg, outcome, error=error, text=text, application=True))
    return out


def answer(msg: er7.Message | None, outcome: str, *, error: str | None = None,
           text: str | None = None) -> bytes | None:
    """The ACK for ``outcome`` (AA/AE/AR) in the sender's mode; None if it asked for none."""
    mode, accept = ack_mode(msg)
    if mode == "original":
        return ack(msg, outcome, error=error, text=text)
    commit = {"AA": "CA", "AE": "CE", "AR": "CR"}[outcome]
    if not _wanted(accept, outcome == "AA"):
        return None
    return ack(msg, commit, error=error, text=text)
