"""HL7 v2 adapter: Care Connect over a PAS that speaks the NHS ITK HL7 v2.4 dialect over MLLP.

Reads and searches become queries (QBP^Q21 Get Person Demographics, QBP^Q22 Find Candidates,
QBP^ZV1 patient + visit); writes become ADT^A28 / ADT^A31 (Patient) and ADT^A01 (an
Encounter create: an admission). Replies are read with the fast
ER7 reader (hl7apy builds the outgoing messages, where its validation is worth its cost).

Records are keyed by the field paths the mapping uses: ``PID-5.1``; ``PID-3.1[PID-3.5=NH]``
for the repetition whose component 5 is NH; children are the repetitions of a field
(``repeat: PID-11``) or repeated segments (``segment: NK1``) of one reply group.

What a query cannot express (date ranges over Q22, ``:contains``, OR across fields) is
reported as UnsupportedCriteria → 400, never answered wrongly. Replies are checked: MSA-2 must
echo our MSH-10 (the MLLP client does that); MSA-1 AE/AR/CE/CR are read by ``ack``: a write
refused for what was sent (HL7 table 0357: a duplicate or unknown key, a value missing or not
in the PAS's tables) is the client's 4xx, anything else the PAS's failure; the PAS's own text
goes to a debug log only. QAK-2 NF is an empty result.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters import dropped, observe
from adapters.base import (
    Adapter,
    And,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Compare,
    Count,
    Criterion,
    In,
    Needs,
    Nothing,
    Page,
    Query,
    Record,
    SourceConfigError,
    Text,
    UnsupportedCriteria,
    Write,
    WriteResult,
    backend_correlations,
    note_correlation,
    request_started,
    source_config_error,
)
from adapters.hl7v2 import ack, er7, messages
from adapters.hl7v2.mllp import (
    Endpoint,
    MllpClient,
    MllpError,
    MllpProtocolError,
    MllpTimeout,
    MllpUnavailable,
    client_ssl_context,
)
from adapters.text import fold

log = structlog.get_logger("adapters.hl7v2")

_PROTOCOL = frozenset({"MSH", "MSA", "ERR", "QAK", "QPD", "RCP", "DSC", "EVN"})

# SEG-F, SEG-F.C or SEG-F.C.S, optionally narrowed: PID-3.1[PID-3.5=NH]
_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d{1,3})(?:\.(\d{1,3}))?(?:\.(\d{1,3}))?$")
_REF = re.compile(r"^(?P<path>[A-Z0-9.\-]+)(?:\[(?P<where>[^\]]+)\])?$")

# (the request's correlation list, the adapter's id, the deadline): see Hl7v2Adapter._deadline
_DEADLINE: ContextVar[tuple[object, int, float] | None] = ContextVar("hl7v2_deadline",
                                                                     default=None)


class WriteOutcomeUnknown(BackendTimeout):
    """A write was sent and no usable acknowledgement came back: the PAS may have applied it.
    (A BackendTimeout, so that the gateway's answer is a 504 — with its own code for writes.)"""


@dataclass(frozen=True, slots=True)
class Path:
    segment: str
    field: int
    component: int = 1
    subcomponent: int = 1

    @property
    def qpd(self) -> str:
        """QPD-3 form: ``PID.5.1``."""
        out = f"{self.segment}.{self.field}"
        if self.component != 1 or self.subcomponent != 1:
            out += f".{self.component}"
        if self.subcomponent != 1:
            out += f".{self.subcomponent}"
        return out


@dataclass(frozen=True, slots=True)
class FieldRef:
    path: Path
    where: tuple[tuple[Path, str], ...] = ()


def parse_path(text: str) -> Path:
    m = _PATH.match(text)
    if not m:
        raise SourceConfigError(f"{text!r} is not an HL7 path like PID-5.1", text)
    seg, f, c, s = m.groups()
    return Path(seg, int(f), int(c or 1), int(s or 1))


def parse_ref(ref: str) -> FieldRef:
    m = _REF.match(ref)
    if not m:
        raise SourceConfigError(f"{ref!r} is not an HL7 field reference", ref)
    where: list[tuple[Path, str]] = []
    for cond in (m.group("where") or "").split(","):
        if cond:
            key, _, value = cond.partition("=")
            where.append((parse_path(key), value))
    path = parse_path(m.group("path"))
    for w, _ in where:
        if (w.segment, w.field) != (path.segment, path.field):
            raise SourceConfigError(f"{ref!r}: where must test the same field", ref)
    return FieldRef(path, tuple(where))


# --- configuration --------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChildSpec(_Strict):
    repeat: str | None = None
    """Each repetition of this field is a child record (``PID-11``)."""
    segment: str | None = None
    """Each such segment in the group is a child record (``NK1``)."""


class WriteSpec(_Strict):
    create: Literal["A28", "A01"] | None = None
    """A28 adds a person (Patient); A01 notifies an admission (Encounter: the PV1)."""
    update: Literal["A31"] | None = None


class Hl7Source(_Strict):
    connection: str
    read: Literal["Q21", "ZV1"] | None = None
    search: Literal["Q22", "ZV1"] = "Q22"
    group: str = "PID"
    within: str | None = None
    """A record is each ``group`` segment (PV1) with its own segments, plus the segments of
    the enclosing ``within`` group (PID, PD1): every visit of a patient is one record."""
    id_type: str | None = None
    """PID-3.5 identifier type of the resource id for Q21 reads (e.g. PI)."""
    authority: str | None = None
    wildcard: str | None = None
    """Deprecated here: the wildcard is the connection's (``options.dialect.wildcard``)."""
    children: dict[str, ChildSpec] = Field(default_factory=dict)
    write: WriteSpec | None = None
    ignore_segments: list[str] = Field(default_factory=list)
    """Z-segments and others read by nobody: listed so ignoring them is a decision."""


# QBP^Q22 / ZV1 QPD-3 fields an NHS ITK (IHE PDQ/PDQV) PAS answers.
ITK_QPD_FIELDS = ("PID.3.1", "PID.3.4", "PID.3.5", "PID.5.1", "PID.5.2", "PID.5.3", "PID.7",
                  "PID.8", "PID.11.5", "PV1.2", "PV1.3", "PV1.7", "PV1.10", "PV1.19",
                  "PV1.44", "PV1.45")

NewNumber = Literal["sent", "ack", "query"]
Interaction = Literal["create", "update"]


class Dialect(_Strict):
    """What this PAS's HL7 v2 says and understands: declared per connection, ITK defaults."""

    version: str = "2.4"
    """MSH-12; MSH-18 must be a character set of HL7 table 0211 in this version."""
    wildcard: Literal["*", "%", "none"] = "*"
    """How the PAS spells "starts with" in QPD-3: a trailing ``*`` or ``%``, or ``none``."""
    matching: Literal["exact", "prefix"] = "exact"
    """How the PAS compares a value without a wildcard: exactly, or as a prefix (then
    ``:exact`` is filtered from the reply by the gateway)."""
    identifier_qualifiers: bool = True
    """Send an identifier criterion's qualifiers (``@PID.3.4^NHS``) beside the number; off:
    the bare number, and the reply is filtered to the identifier type asked for."""
    qpd_fields: tuple[str, ...] = ITK_QPD_FIELDS
    """QPD-3 fields the PAS searches on; a search needing another is 400 UNSUPPORTED_SEARCH."""
    identifier_types: dict[str, str] = Field(default_factory=lambda: {"NHS": "NH"})
    """CX-4 assigning authority → CX-5 identifier type naming one kind of identifier: both
    are written (``9990000018^^^NHS^NH``, as the ITK specification shows), and a repetition
    carrying either one is read as that identifier."""
    new_patient_number: tuple[NewNumber, ...] = ("ack", "query")
    """How the gateway learns a new patient's PAS number after the A28's AA, tried in order:
    ``sent`` (the client's resource carries it; the gateway sends it in PID-3), ``ack`` (a
    PID in the ACK), ``query`` (QBP^Q22 on the other identifiers sent, one match)."""


class Hl7Options(_Strict):
    connect_timeout: float = 5.0
    reply_timeout: float = 15.0
    retries: int = 2
    deadline: float = 20.0
    """Seconds for all of one FHIR request's messages to this PAS, retries and waits for a
    pooled connection included."""
    dialect: Dialect = Field(default_factory=Dialect)
    pool_size: int = 2
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    sending_application: str = "CCGATEWAY"
    sending_facility: str = "RX1"
    receiving_application: str = "PAS"
    receiving_facility: str = "RX1"
    charset: str = "UNICODE"
    """MSH-18, a value of HL7 table 0211 for the dialect's version (v2.4: ``UNICODE`` is the
    ITK's UTF-8)."""


# HL7 table 0211 (character sets) by version: v2.5 added the named Unicode encoding forms.
_TABLE_0211_V24 = frozenset({"ASCII", "8859/1", "8859/2", "8859/3", "8859/4", "8859/5",
                             "8859/6", "8859/7", "8859/8", "8859/9", "ISO IR14", "ISO IR87",
                             "ISO IR159", "UNICODE"})
_TABLE_0211_V25 = _TABLE_0211_V24 | {"8859/15", "UNICODE UTF-8", "UNICODE UTF-16",
                                     "UNICODE UTF-32", "GB 18030-2000", "KS X 1001",
                                     "CNS 11643-1992", "BIG-5"}


def check_charset(charset: str, version: str) -> None:
    """MSH-18 must be in table 0211 of the declared version, and one we can encode."""
    table = _TABLE_0211_V25 if er7._version_tuple(version) >= (2, 5) else _TABLE_0211_V24
    if " ".join(charset.split()).upper() not in table:
        raise ValueError(f"charset {charset!r} is not in HL7 table 0211 for v{version}")
    er7.charset_of(charset)


@dataclass
class Prepared:
    source: Hl7Source
    key: FieldRef
    key_ref: str
    fields: dict[str, FieldRef]
    child_fields: dict[str, dict[str, FieldRef]]
    child_of_field: dict[tuple[str, int], str] = field(default_factory=dict)
    read_segments: set[str] = field(default_factory=set)
    alternatives: dict[tuple[str, int, int, str], tuple[int, str]] = field(default_factory=dict)
    """(segment, field, component, value) of a ``where`` → the other CX qualifier that names
    the same identifier (CX-4 NHS ↔ CX-5 NH), from the dialect."""


class Hl7v2Adapter(Adapter):
    name = "hl7v2"
    # A page resumes only at the PAS's DSC-1 pointer, never after a given record: as one of
    # several sources of a type it is read in place (gateway.multisource, in-order paging).
    keyset_paging = False

    def __init__(self, url: str, *, options: dict[str, Any] | None = None,
                 label: str = "hl7v2") -> None:
        self.label = label
        try:
            self.options = Hl7Options.model_validate(options or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise SourceConfigError(
                f"connection '{label}': options.{where}: {err['msg']}") from None
        parts = urlsplit(url)
        if parts.scheme not in ("mllp", "mllps") or not parts.hostname or not parts.port:
            raise SourceConfigError(
                f"connection '{label}': url must be mllp://host:port or mllps://host:port"
            )
        ssl = None
        if parts.scheme == "mllps":
            o = self.options
            ssl = client_ssl_context(ca_file=o.ca_file, cert_file=o.cert_file,
                                     key_file=o.key_file, verify=o.verify)
        self.endpoint = Endpoint(parts.hostname, parts.port, ssl)
        self._warned: set[str] = set()
        o = self.options
        self.client = MllpClient(self.endpoint, pool_size=o.pool_size,
                                 connect_timeout=o.connect_timeout,
                                 reply_timeout=o.reply_timeout, retries=o.retries,
                                 label=label)
        self.dialect = o.dialect
        try:
            check_charset(o.charset, o.dialect.version)
        except (ValueError, er7.Er7Error) as exc:
            raise SourceConfigError(f"connection '{label}': options.charset: {exc}") from None
        if o.deadline <= 0:
            raise SourceConfigError(f"connection '{label}': options.deadline must be positive")
        self.header = messages.Header(
            sending_application=o.sending_application, sending_facility=o.sending_facility,
            receiving_application=o.receiving_application,
            receiving_facility=o.receiving_facility, charset=o.charset,
            version=o.dialect.version,
        )

    # -- load time

    def prepare(self, source: dict[str, Any], needs: Needs) -> Prepared:
        try:
            src = Hl7Source.model_validate(source)
        except ValidationError as exc:
            raise source_config_error(exc) from None
        child_of_field: dict[tuple[str, int], str] = {}
        for name, spec in src.children.items():
            if bool(spec.repeat) == bool(spec.segment):
                raise SourceConfigError("a child needs one of: repeat, segment",
                                        f"children.{name}")
            if spec.repeat:
                p = parse_path(spec.repeat)
                child_of_field[(p.segment, p.field)] = name
        fields: dict[str, FieldRef] = {}
        child_fields: dict[str, dict[str, FieldRef]] = {n: {} for n in src.children}
        for ref in sorted(needs.fields | needs.criteria_refs | {needs.key}):
            fr = parse_ref(ref)
            owner = child_of_field.get((fr.path.segment, fr.path.field))
            seg_child = next((n for n, s in src.children.items()
                              if s.segment == fr.path.segment), None)
            if (owner or seg_child) and not fr.where:
                child_fields[owner or seg_child or ""][ref] = fr
            else:
                fields[ref] = fr
        for name in needs.children:
            if name not in src.children:
                raise SourceConfigError(f"output repeats over child {name!r}, not declared",
                                        name)
        if needs.sort_refs:
            raise SourceConfigError("an HL7 v2 source cannot sort; remove sort:", "sort")
        key = parse_ref(needs.key)
        if src.read == "Q21" and not src.id_type:
            raise SourceConfigError("read: Q21 needs id_type (the PID-3.5 of the id)", "id_type")
        if src.wildcard is not None:
            raise SourceConfigError("wildcard is the PAS's, not a mapping's: set it in the "
                                    "connection's options.dialect.wildcard", "wildcard")
        read = {fr.path.segment for fr in fields.values()}
        read |= {fr.path.segment for cf in child_fields.values() for fr in cf.values()}
        read |= {s.segment for s in src.children.values() if s.segment}
        read.add(src.group)
        if src.within:
            read.add(src.within)
        alternatives: dict[tuple[str, int, int, str], tuple[int, str]] = {}
        for fr in [*fields.values(), key]:
            for w, value in fr.where:
                for authority, id_type in self.dialect.identifier_types.items():
                    if w.component == 4 and value == authority:
                        alternatives[(w.segment, w.field, 4, value)] = (5, id_type)
                    elif w.component == 5 and value == id_type:
                        alternatives[(w.segment, w.field, 5, value)] = (4, authority)
        return Prepared(src, key, needs.key, fields, child_fields, child_of_field, read,
                        alternatives)

    def interactions(self, prepared: Prepared) -> frozenset[str]:
        out = {"read", "search-type"}
        w = prepared.source.write
        if w and w.create:
            out.add("create")
        if w and w.update:
            out.add("update")
        return frozenset(out)

    # -- queries

    async def fetch(self, prepared: Prepared, query: Query) -> Page:
        if query.backwards:
            raise UnsupportedCriteria("this source pages forwards only")
        deadline = self._deadline()
        ids = _key_lookup(prepared, query.criteria)
        if ids is not None and prepared.source.read == "Q21":
            records: list[Record] = []
            for rid in ids[: query.count]:
                records += await self._q21(prepared, rid, deadline)
            return Page(records=records, more=False, total=len(records))
        if isinstance(query.criteria, Nothing):
            return Page(records=[], more=False, total=0)
        pairs, filters = _qpd_pairs(prepared, self.dialect, query.criteria)
        return await self._search(prepared, pairs, filters, query.count, query.after, deadline)

    async def count(self, prepared: Prepared, query: Count) -> int:
        if isinstance(query.criteria, Nothing):
            return 0
        pairs, filters = _qpd_pairs(prepared, self.dialect, query.criteria)
        if filters:
            raise UnsupportedCriteria("this PAS cannot count this search exactly")
        page = await self._search(prepared, pairs, [], 1, None, self._deadline())
        if page.total is not None:
            return page.total
        if page.more:  # one record asked for, more there, and no count we can trust
            raise UnsupportedCriteria("this PAS cannot count this search exactly")
        return len(page.records)

    def _deadline(self) -> float:
        """The loop time by which this FHIR request's messages must be answered: one deadline
        per request (the audit layer's per-request correlation list marks the request),
        shared by every message the request sends to this PAS."""
        now = asyncio.get_running_loop().time()
        owner = backend_correlations.get()
        held = _DEADLINE.get()
        if owner is not None and held is not None and held[0] is owner and held[1] == id(self):
            return held[2]
        began = request_started.get()  # queued time before the first message counts too
        at = (now if began is None else min(now, began)) + self.options.deadline
        if owner is not None:
            _DEADLINE.set((owner, id(self), at))
        return at

    async def _q21(self, prepared: Prepared, rid: str, deadline: float) -> list[Record]:
        src = prepared.source
        control = messages.new_control_id()
        msg = messages.qbp_q21(self.header, control, identifier=rid,
                               identifier_type=src.id_type or "PI", authority=src.authority,
                               query_tag=_tag())
        reply = await self._send(msg, control, [rid], deadline=deadline)
        return self.records(prepared, reply)

    async def _search(self, prepared: Prepared, pairs: list[tuple[str, str]],
                      filters: list[_Filter], count: int, after: tuple[Any, ...] | None,
                      deadline: float) -> Page:
        continuation = str(after[0]) if after else None
        known_total = after[1] if after and len(after) > 1 else None
        control = messages.new_control_id()
        build = messages.qbp_zv1 if prepared.source.search == "ZV1" else messages.qbp_q22
        msg = build(self.header, control, criteria=pairs, quantity=max(count, 1),
                    query_tag=_tag(), continuation=continuation)
        reply = await self._send(msg, control, [v for _, v in pairs], deadline=deadline)
        groups = self._groups(prepared, reply)
        records = self._records(prepared, groups)
        if filters:
            records = [r for r in records if all(f.holds(r) for f in filters)]
        # Never cut to `count`: the pointer (DSC-1) stands after the reply's LAST record, so
        # records cut off here could never be asked for again (a PAS ignoring RCP-2 sends more).
        records = records if count else []
        qak = reply.segment("QAK")
        total = _int(qak.value(4)) if qak else None
        returned = _int(qak.value(5)) if qak else None
        remaining = _int(qak.value(6)) if qak else None
        if filters or (returned is not None and returned != len(groups)):
            total = None  # the PAS counted something else (patients, not visits; unfiltered)
        if (not continuation and total is not None and returned is not None
                and remaining is not None and total != returned + remaining):
            total = None  # QAK-4/5/6 count different things (patients in one, visits in another)
        if continuation:
            # A continuation's QAK-4 may count from the pointer on (PAS dialects differ):
            # the total is the one the first page reported.
            total = known_total if isinstance(known_total, int) else None
        dsc = reply.segment("DSC")
        pointer = dsc.value(1) if dsc else None
        more = bool(pointer) and (remaining is None or remaining > 0)
        page = Page(records=records, more=more, total=total)
        if more and pointer:
            page.end = (pointer, total)
        return page

    async def _send(self, msg: bytes, control: str, sensitive: list[str], *, deadline: float,
                    idempotent: bool = True, write: Interaction | None = None,
                    own_key: tuple[str, int] | None = None) -> er7.Message:
        hook = observe.exchange
        if hook is None:
            return await self._send_unobserved(msg, control, sensitive, deadline=deadline,
                                               idempotent=idempotent, write=write,
                                               own_key=own_key)
        with hook(self.label, _message_type(msg), control):
            return await self._send_unobserved(msg, control, sensitive, deadline=deadline,
                                               idempotent=idempotent, write=write,
                                               own_key=own_key)

    async def _send_unobserved(self, msg: bytes, control: str, sensitive: list[str], *,
                               deadline: float, idempotent: bool = True,
                               write: Interaction | None = None,
                               own_key: tuple[str, int] | None = None) -> er7.Message:
        """One exchange. For a ``write`` (the interaction), a failure after the message may
        have reached the PAS is :class:`WriteOutcomeUnknown`; one before it is
        BackendUnavailable (not applied); a refusal is read by ``ack.refusal``, which needs
        the written record's key field (``own_key``) to tell an unknown record from an
        unknown reference."""
        note_correlation(f"{self.label}:MSH-10={control}")
        try:
            raw = await self.client.send(msg, control, idempotent=idempotent, deadline=deadline)
        except MllpError as exc:
            if write and (exc.sent or isinstance(exc, MllpProtocolError)):
                raise WriteOutcomeUnknown(
                    f"the '{self.label}' PAS may have applied this write: it was sent but no "
                    "usable acknowledgement came back", correlation=control) from exc
            if isinstance(exc, MllpTimeout):
                raise BackendTimeout(f"the '{self.label}' PAS did not answer in time",
                                     correlation=control) from exc
            if isinstance(exc, MllpUnavailable):
                raise BackendUnavailable(f"the '{self.label}' PAS is not reachable",
                                         correlation=control) from exc
            raise BackendError(f"the '{self.label}' PAS sent an unusable reply",
                               correlation=control) from exc
        try:
            reply = er7.parse(raw)
        except er7.Er7Error as exc:
            if write:
                raise WriteOutcomeUnknown(
                    f"the '{self.label}' PAS may have applied this write: its acknowledgement "
                    "could not be read", correlation=control) from exc
            raise BackendError(f"the '{self.label}' PAS sent a malformed reply",
                               correlation=control) from exc
        msa = reply.segment("MSA")
        code = (msa.value(1) if msa else None) or ""
        if code not in ("AA", "CA"):  # an AA with a warning ERR is still an AA: applied
            self._refused(reply, code, sensitive, control)
            raise ack.refusal(self.label, code, reply, write=write, own_key=own_key,
                              sensitive=sensitive, correlation=control)
        qak = reply.segment("QAK")
        status = qak.value(2) if qak else None
        if status in ("AE", "AR"):
            self._refused(reply, status or "", sensitive, control)
            raise ack.refusal(self.label, status or "", reply, write=None, own_key=None,
                              sensitive=sensitive, correlation=control)
        return reply

    def _refused(self, reply: er7.Message, code: str, sensitive: list[str], control: str
                 ) -> None:
        """The PAS's own words about a refusal, at debug only (they may name the patient)."""
        log.debug("hl7_rejection_text", connection=self.label, ack=code, control_id=control,
                  text=ack.pas_text(reply, sensitive))

    def records(self, prepared: Prepared, reply: er7.Message) -> list[Record]:
        """The records in a reply (or any message with the group segments, e.g. an ADT)."""
        return self._records(prepared, self._groups(prepared, reply))

    def _groups(self, prepared: Prepared, reply: er7.Message) -> list[list[Any]]:
        qak = reply.segment("QAK")
        if qak is not None and qak.value(2) == "NF":
            return []
        src = prepared.source
        if not src.within:
            groups = reply.groups(src.group)
        else:
            # RSP^ZV2: PID [PD1] {PV1 [PV2]}: each visit, with its patient's segments.
            groups = []
            for outer in reply.groups(src.within):
                head: list[Any] = []
                visits: list[list[Any]] = []
                for seg in outer:
                    if seg.name == src.group:
                        visits.append([seg])
                    elif visits:
                        visits[-1].append(seg)
                    else:
                        head.append(seg)
                groups += [head + v for v in visits]
        self._check_segments(prepared, groups)
        return groups

    def _records(self, prepared: Prepared, groups: list[list[Any]]) -> list[Record]:
        out = []
        for group in groups:
            rec = _extract(group, prepared.fields, prepared.alternatives)
            if rec.get(prepared.key_ref) is None:
                # A group without the id cannot become a resource: left out, but not silently.
                dropped.note(f"hl7v2:{prepared.source.group}:{prepared.key_ref}",
                             "group without its id")
                continue
            for name, spec in prepared.source.children.items():
                rec["@" + name] = _children(group, spec, prepared.child_fields[name])
            out.append(rec)
        return out

    def _check_segments(self, prepared: Prepared, groups: list[list[Any]]) -> None:
        """Segments nobody reads must be ignored by decision (ignore_segments), not by
        accident: an unexpected one (a new Z-segment from a PAS upgrade) is logged once."""
        # The query protocol's own segments (DSC follows the last group) are no one's data.
        known = prepared.read_segments | set(prepared.source.ignore_segments) | _PROTOCOL
        for group in groups:
            for seg in group:
                if seg.name not in known and seg.name not in self._warned:
                    self._warned.add(seg.name)
                    log.warning("unmapped_segment", connection=self.label, segment=seg.name,
                                hint="map it, or list it in the source's ignore_segments")

    # -- writes

    async def write(self, prepared: Prepared, write: Write) -> WriteResult:
        """ADT^A28 / A01 / A31. Once the PAS says AA this never raises: a new record's key
        that cannot be learned is an empty ``WriteResult.id`` (the write *was* applied). A
        failure after the message may have reached the PAS is :class:`WriteOutcomeUnknown`.
        A28 and A01 are never resent after they left (a PAS need not recognise a resent
        MSH-10); A31 replaces the whole record, so resending it is harmless."""
        w = prepared.source.write
        event: messages.AdtEvent | None = (
            (w.create if write.interaction == "create" else w.update) if w else None)
        if event is None:
            raise UnsupportedCriteria(f"this source does not accept {write.interaction}")
        record = dict(write.record)
        if write.id is not None:
            record[prepared.key_ref] = write.id
        elif (event == "A28" and self.dialect.new_patient_number == ("sent",)
              and not record.get(prepared.key_ref)):
            raise UnsupportedCriteria("this PAS takes a new patient's number from the gateway: "
                                      "the resource must carry it (the id's identifier)")
        values = _adt_values(prepared, record)
        if write.interaction == "update":
            # FHIR update replaces the resource: a field the mapping reads that the new
            # version lacks is cleared with the HL7 null "" (an absent field means "no change").
            sent = {k.split(".")[0].split("[")[0] for k in values}
            for fr in prepared.fields.values():
                name = f"{fr.path.segment}-{fr.path.field}"
                if fr.path.segment in ("PID", "PD1") and name not in sent:
                    values[f"{name}.1"] = '""'
                    sent.add(name)
        if values.get("PID-29.1", '""') != '""':
            values["PID-30.1"] = "Y"  # the death indicator goes with a date of death
        deadline = self._deadline()
        control = messages.new_control_id()
        msg = messages.adt(self.header, control, event=event, values=values)
        reply = await self._send(msg, control, [str(v) for v in values.values()],
                                 deadline=deadline, idempotent=event == "A31",
                                 write=write.interaction,
                                 own_key=(prepared.key.path.segment, prepared.key.path.field))
        if write.id is not None:
            return WriteResult(id=write.id, created=False, correlation=control)
        if event == "A01":
            new_id = await self._new_visit(prepared, record, reply, deadline)
        else:
            new_id = await self._new_number(prepared, record, reply, deadline)
        return WriteResult(id=new_id or "", created=True, correlation=control)

    async def _new_visit(self, prepared: Prepared, record: Record, reply: er7.Message,
                         deadline: float) -> str | None:
        """The key (PV1-19 visit number) of the visit an A01 just added: the one sent, else
        a PV1 in the ACK, else the patient's visits asked for (ZV1 on the patient and the
        admission's day) and the one admitted at the very time sent."""
        key = prepared.key_ref
        if record.get(key):
            return str(record[key])
        for group in reply.groups(prepared.source.group):
            found = _extract(group, {key: prepared.key}, prepared.alternatives).get(key)
            if found:
                return str(found)
        found = await self._find_visit(prepared, record, deadline)
        if found is None:
            log.warning("new_visit_number_unknown", connection=self.label)
        return found

    async def _find_visit(self, prepared: Prepared, record: Record, deadline: float
                          ) -> str | None:
        """The visit of the patient in ``record`` admitted at its admission time (PV1-44)."""
        admit_ref = next((ref for ref, fr in prepared.fields.items()
                          if fr.path == Path("PV1", 44) and not fr.where), None)
        admitted = str(record.get(admit_ref) or "") if admit_ref else ""
        patient = [(ref, v) for ref, v in record.items() if v and ref in prepared.fields
                   and prepared.fields[ref].where and prepared.fields[ref].path.segment == "PID"]
        if prepared.source.search != "ZV1" or not admit_ref or not admitted or not patient:
            return None
        try:
            pairs = _pairs_for(patient[0][0], str(patient[0][1]), self.dialect)
            pairs += _pairs_for(admit_ref, admitted[:8], self.dialect)
            page = await self._search(prepared, pairs, [], 20, None, deadline)
        except (BackendError, UnsupportedCriteria) as exc:
            log.warning("new_visit_number_query_failed", connection=self.label,
                        error=type(exc).__name__)
            return None
        at = [r for r in page.records if str(r.get(admit_ref) or "")[:12] == admitted[:12]]
        return str(at[0][prepared.key_ref]) if len(at) == 1 else None

    async def _new_number(self, prepared: Prepared, record: Record, reply: er7.Message,
                          deadline: float) -> str | None:
        """The PAS number of the patient an A28 just added, as the dialect says to learn it."""
        for how in self.dialect.new_patient_number:
            found: Any = None
            if how == "sent":
                found = record.get(prepared.key_ref)
            elif how == "ack":
                for group in reply.groups("PID"):
                    found = _extract(group, {prepared.key_ref: prepared.key},
                                     prepared.alternatives).get(prepared.key_ref) or found
            else:
                found = await self._find_created(prepared, record, deadline)
            if found:
                return str(found)
        log.warning("new_patient_number_unknown", connection=self.label,
                    tried=list(self.dialect.new_patient_number))
        return None

    async def _find_created(self, prepared: Prepared, record: Record, deadline: float
                            ) -> str | None:
        """QBP^Q22 on the other identifiers sent (the NHS number): exactly one match."""
        criteria = [Compare(ref, "=", value) for ref, value in record.items()
                    if ref != prepared.key_ref and not ref.startswith("@") and value
                    and ref in prepared.fields and prepared.fields[ref].where
                    and prepared.fields[ref].path.field == prepared.key.path.field
                    and prepared.fields[ref].path.segment == prepared.key.path.segment]
        if not criteria:
            return None
        try:
            pairs, filters = _qpd_pairs(prepared, self.dialect, And(tuple(criteria)))
            page = await self._search(prepared, pairs, filters, 2, None, deadline)
        except (BackendError, UnsupportedCriteria) as exc:
            log.warning("new_patient_number_query_failed", connection=self.label,
                        error=type(exc).__name__)
            return None
        if len(page.records) != 1:
            return None
        found = page.records[0].get(prepared.key_ref)
        return str(found) if found else None

    async def ping(self) -> None:
        # A connection is the cheapest proof of life that needs no PAS-side support.
        reader_writer = None
        try:
            import asyncio

            reader_writer = await asyncio.wait_for(
                asyncio.open_connection(self.endpoint.host, self.endpoint.port,
                                        ssl=self.endpoint.ssl), self.options.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"the '{self.label}' PAS is not reachable") from exc
        finally:
            if reader_writer is not None:
                reader_writer[1].close()
                await reader_writer[1].wait_closed()

    async def aclose(self) -> None:
        await self.client.aclose()

    def explain(self, prepared: Prepared, query: Query) -> list[str]:
        src = prepared.source
        ids = _key_lookup(prepared, query.criteria)
        if ids is not None and src.read == "Q21":
            return [f"HL7 v2 QBP^Q21 (get demographics), one message per id: QPD-3 "
                    f"@PID.3.1^?~@PID.3.5^{src.id_type or 'PI'}",
                    f"reply: {src.group} groups, read as records"]
        if isinstance(query.criteria, Nothing):
            return ["nothing is sent: the criteria cannot match"]
        # UnsupportedCriteria as fetch would; in this PAS dialect's terms
        pairs, filters = _qpd_pairs(prepared, self.dialect, query.criteria)
        kind = "QBP^ZV1" if src.search == "ZV1" else "QBP^Q22 (find candidates)"
        qpd = "~".join(f"@{name}^?" for name, _ in pairs) or "(no criteria)"
        lines = [f"HL7 v2 {kind}, RCP-2 quantity {max(query.count, 1)}; the next page by "
                 "continuation (DSC-1)",
                 f"QPD-3: {qpd}  (? = a value from the request, not shown)",
                 f"reply: {src.group} groups, read as records"]
        if filters:  # the dialect falls short: the gateway checks the reply itself
            lines.append("then filtered by the gateway on the reply: "
                         + ", ".join(sorted({f.ref for f in filters})))
        lines += [f"child {name}: each "
                  + (f"repetition of {spec.repeat}" if spec.repeat else f"{spec.segment} segment")
                  + " in a group" for name, spec in src.children.items()]
        return lines


# --- helpers ----------------------------------------------------------------------------------


def _message_type(msg: bytes) -> str:
    """MSH-9 as ``QBP^Q22^QBP_Q21`` (our own message: the type is from the mapping)."""
    msh = msg.split(b"\r", 1)[0]
    fields = msh.split(msh[3:4]) if len(msh) > 3 else []
    return fields[8].decode("ascii", "replace")[:40] if len(fields) > 8 else "unknown"


def _tag() -> str:
    return uuid.uuid4().hex[:16]


def _int(v: str | None) -> int | None:
    return int(v) if v and v.isdigit() else None


def _key_lookup(p: Prepared, c: Criterion | None) -> list[str] | None:
    """The ids asked for, if the criteria are exactly 'id is one of ...'."""
    if isinstance(c, Compare) and c.ref == p.key_ref and c.op == "=":
        return [str(c.value)]
    if isinstance(c, In) and c.ref == p.key_ref:
        return [str(v) for v in c.values]
    return None


@dataclass(frozen=True, slots=True)
class _Filter:
    """A condition the PAS cannot check as asked, checked on its reply instead."""

    ref: str
    value: str
    text: bool  # compare folded text (``:exact`` over a prefix-matching PAS)

    def holds(self, rec: Record) -> bool:
        got = rec.get(self.ref)
        if got is None:
            return False
        return fold(str(got)) == self.value if self.text else str(got) == self.value


def _qpd_pairs(p: Prepared, dialect: Dialect, c: Criterion | None
               ) -> tuple[list[tuple[str, str]], list[_Filter]]:
    """Criteria → QPD-3 ``@SEG.F.C^value`` pairs (an AND of simple conditions only), in the
    dialect's terms, and the filters to apply to the reply where the dialect falls short."""
    leaves: list[Criterion] = []
    stack = [c] if c is not None else []
    while stack:
        item = stack.pop(0)
        if isinstance(item, And):
            stack[:0] = list(item.items)
        else:
            leaves.append(item)
    pairs: list[tuple[str, str]] = []
    filters: list[_Filter] = []
    ranges: dict[str, dict[str, Any]] = {}
    asked: dict[str, str] = {}
    """QPD field → the field reference first asked on it (its qualifiers with it)."""
    for leaf in leaves:
        if isinstance(leaf, Compare) and leaf.op in (">=", "<"):
            ranges.setdefault(leaf.ref, {})[leaf.op] = leaf.value
            continue
        if isinstance(leaf, In) and leaf.values and (len(leaf.values) == 1
                                                     or leaf.ref != p.key_ref):
            # Several local codes for one FHIR code (a code map that reads two code sets):
            # ask in the first one the code map lists, the PAS's own.
            leaf = Compare(leaf.ref, "=", leaf.values[0])
        if isinstance(leaf, Compare) and leaf.op == "=":
            value = str(leaf.value)
            qpd = parse_ref(leaf.ref).path.qpd
            if asked.setdefault(qpd, leaf.ref) != leaf.ref:
                # A second value of one QPD field under other qualifiers (an NHS number and
                # the PAS number: an identifier search in a patient/ compartment): QPD-3's
                # PID-3.4/3.5 qualifiers belong to the query, not to one PID-3.1, so a PAS
                # cannot tell which number each qualifies. The first is asked, this one is
                # checked on the reply.
                if leaf.ref not in p.fields:
                    raise UnsupportedCriteria("this PAS cannot be asked for two identifiers "
                                              "of different types at once")
                filters.append(_Filter(leaf.ref, value, False))
                continue
            # An identifier asked for bare, or of a PAS that prefix-matches, may match another
            # identifier (or a longer number): the reply is checked. (Whole codes such as a
            # sex are not: a prefix of a code list's code is that code.)
            if (parse_ref(leaf.ref).where and leaf.ref in p.fields
                    and (dialect.matching == "prefix" or not dialect.identifier_qualifiers)):
                filters.append(_Filter(leaf.ref, value, False))
            pairs += _pairs_for(leaf.ref, value, dialect)
        elif isinstance(leaf, Text) and leaf.mode in ("prefix", "exact"):
            value = leaf.value.upper()
            wildcard = "" if dialect.wildcard == "none" else dialect.wildcard
            if wildcard and wildcard in value:
                raise UnsupportedCriteria(f"this PAS reads {wildcard} as a wildcard: a search "
                                          "value cannot contain it")
            if leaf.mode == "prefix":
                if wildcard:
                    value += wildcard
                elif dialect.matching != "prefix":
                    raise UnsupportedCriteria("this PAS cannot search by the start of a value: "
                                              "use the :exact modifier")
            elif dialect.matching == "prefix":
                filters.append(_Filter(leaf.ref, leaf.value, True))
            pairs += _pairs_for(leaf.ref, value, dialect)
        else:
            raise UnsupportedCriteria(_unsupported(leaf))
    for ref, bounds in ranges.items():
        lo, hi = bounds.get(">="), bounds.get("<")
        if p.source.search == "ZV1":
            # The NHS visit query takes inclusive day ranges, either end open: from-to.
            start = str(lo)[:8] if lo is not None else ""
            end = _day_before(str(hi)) if hi is not None else ""
            pairs += _pairs_for(ref, f"{start}-{end}", dialect)
        elif lo is not None and hi is not None and _one_day(str(lo), str(hi)):
            pairs += _pairs_for(ref, str(lo), dialect)
        else:
            raise UnsupportedCriteria("this source matches dates exactly: search a full date "
                                      "(YYYY-MM-DD) without a prefix")
    if not pairs:
        raise UnsupportedCriteria("this source needs at least one search parameter")
    for name, _ in pairs:
        # PID.5 is PID.5.1 (the first component), however either side writes it.
        if not {name, name + ".1", name.removesuffix(".1")} & set(dialect.qpd_fields):
            raise UnsupportedCriteria(f"this PAS cannot search on {name} (not among the QPD "
                                      "fields its connection declares)")
    return pairs, filters


def _pairs_for(ref: str, value: str, dialect: Dialect) -> list[tuple[str, str]]:
    fr = parse_ref(ref)
    if not dialect.identifier_qualifiers:
        return [(fr.path.qpd, value)]
    return [(fr.path.qpd, value), *((w.qpd, v) for w, v in fr.where)]


def _one_day(lo: str, hi: str) -> bool:
    import datetime as dt

    try:
        d0 = dt.datetime.strptime(lo[:8], "%Y%m%d")
        d1 = dt.datetime.strptime(hi[:8], "%Y%m%d")
    except ValueError:
        return False
    return (d1 - d0).days == 1 and len(lo) == 8


def _day_before(bound: str) -> str:
    """The last day included by an exclusive bound in YYYYMMDD[HHMM] form."""
    import datetime as dt

    moment = dt.datetime.strptime(bound[:12].ljust(12, "0"), "%Y%m%d%H%M")
    return (moment - dt.timedelta(minutes=1)).strftime("%Y%m%d")


def _unsupported(leaf: Criterion) -> str:
    if isinstance(leaf, Text):
        return f"this source cannot search text with :{leaf.mode}"
    if isinstance(leaf, In):
        return "this source cannot search for several values at once"
    return "this source cannot answer this combination of search parameters"


def _value(seg: Any, path: Path, repetition: int = 0) -> str | None:
    v: str | None = seg.value(path.field, path.component, path.subcomponent, repetition)
    return v


Alternatives = dict[tuple[str, int, int, str], tuple[int, str]]


def _matches(seg: Any, where: tuple[tuple[Path, str], ...], r: int,
             alternatives: Alternatives) -> bool:
    for w, v in where:
        if _value(seg, w, r) == v:
            continue
        alt = alternatives.get((w.segment, w.field, w.component, v))
        if alt is None or _value(seg, Path(w.segment, w.field, alt[0]), r) != alt[1]:
            return False
    return True


def _extract(group: list[Any], fields: dict[str, FieldRef],
             alternatives: Alternatives | None = None) -> Record:
    by_name: dict[str, Any] = {}
    for seg in group:
        by_name.setdefault(seg.name, seg)
    rec: Record = {}
    for ref, fr in fields.items():
        seg = by_name.get(fr.path.segment)
        if seg is None:
            continue
        if not fr.where:
            rec[ref] = _value(seg, fr.path)
            continue
        for r in range(seg.repetitions(fr.path.field)):
            if _matches(seg, fr.where, r, alternatives or {}):
                rec[ref] = _value(seg, fr.path, r)
                break
    return rec


def _children(group: list[Any], spec: ChildSpec, fields: dict[str, FieldRef]) -> list[Record]:
    out: list[Record] = []
    if spec.segment:
        for seg in group:
            if seg.name == spec.segment:
                out.append({ref: _value(seg, fr.path) for ref, fr in fields.items()})
        return out
    assert spec.repeat is not None
    p = parse_path(spec.repeat)
    seg = next((s for s in group if s.name == p.segment), None)
    if seg is None:
        return out
    for r in range(seg.repetitions(p.field)):
        out.append({ref: _value(seg, fr.path, r) for ref, fr in fields.items()})
    return out


def _adt_values(p: Prepared, record: Record) -> dict[str, str]:
    """A reverse-mapped record → ``{"PID-3[0].1": ..., "PID-5.1": ...}`` for messages.adt."""
    values: dict[str, str] = {}
    reps: dict[tuple[str, int], list[tuple[tuple[Path, str], ...]]] = {}

    def rep_index(path: Path, where: tuple[tuple[Path, str], ...]) -> int:
        seen = reps.setdefault((path.segment, path.field), [])
        if where not in seen:
            seen.append(where)
        return seen.index(where)

    def put(path: Path, rep: int | None, value: Any) -> None:
        at = f"{path.segment}-{path.field}" + (f"[{rep}]" if rep is not None else "")
        at += f".{path.component}" + (f".{path.subcomponent}" if path.subcomponent != 1 else "")
        values[at] = str(value)

    for ref, value in record.items():
        if ref.startswith("@") or value is None:
            continue
        fr = parse_ref(ref)
        if fr.where:
            i = rep_index(fr.path, fr.where)
            put(fr.path, i, value)
            for w, v in fr.where:
                put(w, i, v)
                # The other CX qualifier of the same identifier (CX-4 NHS → CX-5 NH), and
                # the source's assigning authority beside its own identifier type.
                alt = p.alternatives.get((w.segment, w.field, w.component, v))
                if alt is not None:
                    put(Path(w.segment, w.field, alt[0]), i, alt[1])
                elif (w.component == 5 and v == p.source.id_type and p.source.authority
                      and (w.segment, w.field) == (p.key.path.segment, p.key.path.field)):
                    put(Path(w.segment, w.field, 4), i, p.source.authority)
        else:
            put(fr.path, None, value)
    for name, spec in p.source.children.items():
        rows = record.get("@" + name) or []
        if spec.repeat:
            rp = parse_path(spec.repeat)
            base = len(reps.get((rp.segment, rp.field), []))
            for i, row in enumerate(rows):
                for ref, value in row.items():
                    if value is not None:
                        put(parse_ref(ref).path, base + i, value)
        elif rows:
            raise UnsupportedCriteria(f"this source cannot write repeated {spec.segment} "
                                      "segments")
    return values
