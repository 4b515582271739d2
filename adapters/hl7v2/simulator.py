"""A PAS simulator: an HL7 v2.4 MLLP server over the demo PAS database, with scriptable faults.

It answers the NHS ITK query dialect (QBP^Q21, QBP^Q22, QBP^ZV1) and takes ADT^A28/A31, from
the demo PAS tables (``gateway.demo_pas.schema``) through SQLAlchemy Core, in worker threads
so the server loop never waits on the database. ``Faults`` scripts what goes wrong next
(delays, dropped connections, NAKs, split or unterminated frames, a wrong MSA-2), so the
gateway's HL7 adapter can be tested against every failure a real PAS interface shows.

THE PAS CONTRACT — what the gateway's HL7 v2 mapping may assume of the PAS
=========================================================================

Every reply
    MSH-3/4 ``PAS``/``RX1``; MSH-5/6 echo the request's MSH-3/4; MSH-10 a new control id;
    MSH-12 ``2.4``; MSH-18 the request's character set. MSA-1 ``AA`` (or ``AE``/``AR``),
    **MSA-2 = the request's MSH-10**, MSA-3 a short text on errors. An error adds
    ``ERR|^^^<code>&<text>&HL70357`` (v2.4 ERR-1 = ELD: ERR-1.4.1 code, ERR-1.4.2 text, from
    HL7 table 0357: 100 segment sequence / unreadable message, 101 required field missing,
    102 data type error, 103 value not supported, 200 unsupported message type, 201 unsupported
    event, 204 unknown key identifier, 205 duplicate key identifier, 207 application internal
    error). Error texts never contain patient data. A message that cannot be parsed gets an
    ``ACK`` with ``AR`` (code 100) if its MSH-10 can be read, else the connection is closed.
    Any other message type: ``AR`` with 200 (201 for an unknown QBP/ADT trigger). A refused
    query is still an RSP of its kind: MSA ``AE``, ERR, QAK-2 ``AE``, the QPD, no groups.

QBP^Q21 Get Person Demographics → RSP^K21 (structure RSP_K21)
    QPD-3 is one CX ``<id>^^^<authority>^<type>``: type ``PI`` (or authority ``RX1``) is the
    PAS number (PATIENTS.PASID), type ``NH`` (or authority ``NHS``) the NHS number. Other types
    → AE 103. Reply: MSA, QAK (QAK-1 = QPD-2 query tag, QAK-2 ``OK``/``NF``, QAK-3 = QPD-1,
    QAK-4/5/6 = 1/1/0 or 0/0/0), QPD (the request's, echoed), then PID and PD1 when found.
    An archived patient is not found (NF), even by its own PAS number.

QBP^Q22 Find Candidates → RSP^K22 (structure RSP_K22); QBP^ZV1 → RSP^ZV2 (RSP_ZV2)
    QPD-3 repeats ``@<field>^<value>``; all must hold (AND). Text compares case- and
    accent-insensitively; a trailing ``*`` makes it a prefix match (``SMITH*``).

    ==============  =====================================================================
    ``PID.3.1``     identifier, exact. With ``PID.3.5`` = ``PI`` the PAS number, ``NH`` the
                    NHS number, another type an old identifier of that type (PATIENT_IDS,
                    e.g. ``OLDHN``); without a type any of them. (``PID.3``, ``PID.3.1.1``
                    are read as ``PID.3.1``; ``PID.3.4`` ``NHS``/``RX1`` acts as a type.)
    ``PID.5.1``     family name (``PID.5``, ``PID.5.1.1`` too)
    ``PID.5.2``     given name: the first OR the second forename
    ``PID.5.3``     second forename
    ``PID.7``       birth date ``YYYYMMDD`` exactly; ``YYYY`` or ``YYYYMM`` for a year/month
    ``PID.8``       sex, ``M F O U`` or ``1 2 9 X`` (either set, whatever ``sex_codes``)
    ``PID.11.5``    postcode of any address, current or past, ignoring spaces
    ==============  =====================================================================

    ZV1 also takes ``PV1.2`` (``I`` ordinary / ``D`` day case), ``PV1.3`` ward code,
    ``PV1.7`` consultant GMC code, ``PV1.10`` specialty code, ``PV1.19`` spell number (all
    exact), and ``PV1.44`` / ``PV1.45`` admission / discharge date ranges written
    ``<from>-<to>`` with inclusive ``YYYYMMDD[HHMM]`` ends, either end open (``20240101-``,
    ``-20241231``), or a single ``YYYYMMDD`` meaning that day. Anything else → AE 103 (the
    field is named in the text); no criteria → AE 101.

    Archived patients (ARCHV_FLAG ``Y``, merged duplicates) are never returned, by any query.
    Q22 returns one PID [PD1] group per patient ordered by PATNT_REFNO; ZV1 one PID [PD1] PV1
    PV2 group per PROVIDER_SPELLS row, ordered by patient then spell key.

    Paging: RCP-2 ``<n>^RD`` is the page size, capped at ``max_quantity`` (also the default);
    ``0`` returns the counts only. QAK-4 = total hits, QAK-5 = hits in this reply, QAK-6 =
    hits remaining after it. When some remain, the reply ends with ``DSC|<pointer>|I``. To get
    the next page, send the same query (same QBP trigger and QPD-3; the QPD-2 tag may differ)
    with ``DSC|<pointer>|I``. The pointer is opaque (base64url of a hash of the query and the
    last key returned): for another query, or altered, it is AE 102. No hits → QAK-2 ``NF``
    and no groups (MSA-1 is still ``AA``).

PID (in every reply group)
    PID-1 set id; PID-3 repetitions ``<PASID>^^^RX1^PI``, ``<NHS number>^^^NHS^NH`` (if any),
    then each old identifier ``<id>^^^RX1^<type>^^<from YYYYMMDD>^<to YYYYMMDD>`` (CX-7/8);
    PID-5 ``SURNAME^FORENAME^SECOND^^TITLE^^L``; PID-7 birth date ``YYYYMMDD``; PID-8 sex
    (``sex_codes="hl7"``: M F O U; ``"nhs"``: the NHS Data Dictionary codes 1 2 9 X, as the
    ITK samples send); PID-11 every address, current ones first (then by start date):
    ``LINE1^LINE2^LINE3^LINE4^POSTCODE^^<type>^^^^^<from>&<to>`` with type ``H`` home,
    ``C`` temporary, ``M`` correspondence and XAD-12 the validity range (``YYYYMMDDHHMM``; no
    end = current); PID-13 ``<home>^PRN^PH``, ``<mobile>^ORN^CP``, ``^NET^Internet^<email>``
    (those present, in that order); PID-15 language (local code), PID-16 marital status
    (local code), PID-22 ethnic category (local code, as ITK), PID-29 date of death
    ``YYYYMMDDHHMM`` and PID-30 ``Y`` when dead, PID-32 the NHS number status as ITK
    table 0445: ``NSTS01`` .. ``NSTS08``.
PD1 (when there is a current GP registration)
    PD1-3 ``<practice name>^^<practice ODS code>``, PD1-4
    ``<GP national code>^<SURNAME>^<FORENAME>^^^<TITLE>^^^GMP``.
PV1 / PV2 (ZV2 only)
    PV1-1 set id; PV1-2 ``I`` ordinary admission / ``D`` day case (a local value);
    PV1-3 ``<ward code>^^^RX1^^^^^<ward name>``; PV1-4 admission method;
    PV1-7 ``<GMC code>^<SURNAME>^<FORENAME>^^^<TITLE>^^^GMC``; PV1-10 main specialty;
    PV1-14 source of admission; PV1-18 patient classification (local ``1``/``2``);
    PV1-19 ``<spell number>^^^RX1^VN``; PV1-36 discharge method; PV1-37 discharge
    destination; PV1-41 spell status (local ``A``/``D``/``C``); PV1-44 admitted, PV1-45
    discharged (``YYYYMMDDHHMM``). PV2 is empty (the demo PAS holds no expected dates).

ADT^A28 Add Person → ACK^A28
    Creates a patient from PID (and PD1): PID-5.1 family and PID-5.2 given name and PID-7
    birth date are required (AE 101); PID-8 missing means ``X`` (not known). PID-3: a ``PI``
    repetition that already exists → AE 205; a new one is used as the PAS number, otherwise
    the next free ``D`` + 7 digits is allocated. An ``NH`` repetition must be a valid NHS
    number (AE 102) that no patient has (AE 205). PID-11 repetitions become addresses (all, with
    their XAD-12 ranges; no start means now), PID-13 by equipment type (``CP`` mobile,
    ``Internet``/``X.400`` or use ``NET`` e-mail, else home phone), PID-15, 16, 22, 29, 32 as
    above. PD1-3.3 (practice ODS code) and PD1-4.1 (GP code) start a GP registration; an
    unknown code → AE 204. **The ACK (AA) carries ``PID|1||<PASID>^^^RX1^PI[~<NHS>^^^NHS^NH]``:
    the gateway learns the new patient's PAS number from the PID in the ACK.**
ADT^A31 Update Person → ACK^A31
    Finds the patient by the PID-3 ``PI`` repetition (none, unknown or archived → AE 204) and
    applies HL7 update rules: an empty or absent field leaves the value alone, ``""`` (the HL7
    null) clears it (AE 101 for a required one). A repeating field, when sent, is the new list:
    PID-13 replaces all three telecom columns. PID-11: for each address type sent without an
    end date, a different address end-dates the current one of that type and starts the new
    one (the same address changes nothing). A PD1-3/PD1-4 naming another practice or GP ends
    the current GP registration and starts a new one; PD1-3 ``""`` just ends it. MODIF_DTTM is
    set. The ACK carries the same PID-3 as for A28.
Resends
    A28 and A31 are idempotent on (MSH-3, MSH-4, MSH-10): a message whose control id was
    already processed gets the very same ACK again (same bytes) without being applied twice —
    so a resend after a lost ACK never creates a duplicate patient. (Remembered in memory, for
    the last 10,000 messages.) Queries are simply answered again.

Faults (``PasSimulator.faults``, see :class:`Faults`)
    NAK faults answer without processing, with an ``ACK`` (for queries too) MSA-1 ``AE``/``AR``
    and ERR 207; they are not remembered, so a resend is processed. A dropped reply is a
    message processed (and, for ADT, remembered) whose connection closes without an answer.

The simulator is for tests and demos: writes are serialised, and its idempotency memory is
lost on restart. Use ``careconnect-gateway pas-simulator`` to run it on its own.
"""

# SQLAlchemy columns keep the PAS's upper-case names, which ruff takes for constants:
# ruff: noqa: SIM300

from __future__ import annotations

import base64
import binascii
import collections
import datetime as dt
import hashlib
import json
import re
import ssl as ssl_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.to_thread
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import ColumnElement

from adapters.hl7v2 import er7, messages
from adapters.hl7v2.mllp import MllpServer, Reply
from adapters.sql import fold as sql_fold
from adapters.text import fold
from gateway import nhs_number
from gateway.demo_pas import schema

log = structlog.get_logger("adapters.hl7v2.simulator")

__all__ = ["Faults", "PasSimulator"]

_ENC = er7.DEFAULT_ENCODING
_IDEMPOTENCY_MEMORY = 10_000
TRUST_ODS = "RX1"

pat = schema.patients
addr = schema.addresses
pids = schema.patient_ids
gpreg = schema.gp_registrations
spell = schema.provider_spells
loc = schema.locations
clin = schema.clinicians
org = schema.organisations

_SEX_TO_HL7 = {"1": "M", "2": "F", "9": "O", "X": "U"}
_SEX_FROM_WIRE = {"M": "1", "F": "2", "O": "9", "U": "X", "1": "1", "2": "2", "9": "9",
                  "X": "X", "0": "X"}
_ADDRESS_TO_HL7 = {"HOME": "H", "TEMP": "C", "CORR": "M"}
_ADDRESS_FROM_HL7 = {"H": "HOME", "C": "TEMP", "M": "CORR", "": "HOME"}
_CLASS_TO_HL7 = {"1": "I", "2": "D"}
_CLASS_FROM_HL7 = {"I": "1", "D": "2", "1": "1", "2": "2"}
_DATE_PART = re.compile(r"^\d{4}(?:\d{2}){0,4}$")
_PASID = re.compile(r"^[A-Z0-9]{1,10}$")


@dataclass
class Faults:
    """Faults for upcoming messages: each ``*_count`` is how many of the next messages get it
    (decremented as used). Several faults may hit the same message."""

    delay_seconds: float = 0.0
    delay_count: int = 0
    """Hold the reply back ``delay_seconds`` (beyond the client's reply timeout: a timeout)."""
    drop_count: int = 0
    """Process the message, then close the connection without replying (a lost ACK)."""
    nak_ae_count: int = 0
    """Do not process; reply AE with ERR 207."""
    nak_ar_count: int = 0
    """Do not process; reply AR with ERR 207."""
    split_count: int = 0
    """Send the reply in three TCP writes."""
    missing_cr_count: int = 0
    """Leave out the CR ending the last segment and the CR after the MLLP end block."""
    wrong_msa2_count: int = 0
    """Put another control id in MSA-2."""


class _Reject(Exception):
    """A request the PAS refuses: becomes MSA-1 AE/AR with an ERR (code from table 0357)."""

    def __init__(self, code: str, text: str, ack: Literal["AE", "AR"] = "AE") -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.ack: Literal["AE", "AR"] = ack


# --- writing ER7 (replies are built here: fast, and RSP_ZV2 is not an hl7apy structure) -------

Part = str | tuple[str | None, ...] | None


def _esc(value: Any) -> str:
    return er7.encode(str(value), _ENC)


def _join(parts: Sequence[str], sep: str) -> str:
    out = list(parts)
    while out and not out[-1]:
        out.pop()
    return sep.join(out)


def _f(*components: Part) -> str:
    """One field repetition from raw values; a tuple is a component of sub-components."""
    out = []
    for c in components:
        if c is None:
            out.append("")
        elif isinstance(c, tuple):
            out.append(_join([_esc(s) if s is not None else "" for s in c], _ENC.subcomponent))
        else:
            out.append(_esc(c))
    return _join(out, _ENC.component)


def _seg(name: str, fields: dict[int, str | list[str] | None]) -> str:
    """A segment from ``{field number: field text or list of repetitions}``."""
    top = max((n for n, v in fields.items() if v), default=0)
    out = [name]
    for n in range(1, top + 1):
        v = fields.get(n)
        out.append(_join(v, _ENC.repetition) if isinstance(v, list) else (v or ""))
    return _ENC.field.join(out)


def _now() -> dt.datetime:
    return dt.datetime.now()


def _dttm(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d%H%M")


def _modif(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


# --- reading the request ----------------------------------------------------------------------


def _is_null(seg: er7.Segment, enc: er7.Encoding, field: int, component: int = 1) -> bool:
    """Whether the field, or this component of its first repetition, is ``""`` (the HL7 null:
    "delete the value"), which ``Segment.value`` reads as None like an empty value."""
    text = seg.raw(field)
    if text == '""':
        return True
    parts = text.split(enc.repetition)[0].split(enc.component)
    return component <= len(parts) and parts[component - 1] == '""'


def _sniff_control_id(data: bytes) -> str | None:
    """MSH-10 of a message er7 cannot parse, if the MSH line is readable at all."""
    text = data.decode("latin-1").lstrip("\r\n \t")
    if not text.startswith("MSH") or len(text) < 8:
        return None
    line = re.split(r"[\r\n]", text, maxsplit=1)[0]
    fields = line.split(line[3])
    value = fields[9].split(line[4])[0] if len(fields) > 9 else ""
    readable = (0 < len(value) <= messages.MAX_CONTROL_ID and value.isprintable()
                and not any(c in value for c in line[3:8]))
    return value if readable else None


# --- the continuation pointer -----------------------------------------------------------------


def _query_hash(trigger: str, criteria: list[tuple[str, str]]) -> str:
    text = "\x1f".join([trigger, *(f"{k}\x1e{v}" for k, v in criteria)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pointer(qhash: str, key: Sequence[int]) -> str:
    raw = json.dumps([qhash, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_pointer(pointer: str, qhash: str, width: int) -> tuple[int, ...]:
    try:
        data = json.loads(base64.urlsafe_b64decode(pointer + "=" * (-len(pointer) % 4)))
    except (ValueError, binascii.Error):
        raise _Reject("102", "DSC-1 continuation pointer is not valid") from None
    if (not isinstance(data, list) or len(data) != width + 1 or data[0] != qhash
            or not all(isinstance(k, int) for k in data[1:])):
        raise _Reject("102", "DSC-1 continuation pointer does not belong to this query")
    return tuple(data[1:])


# --- query criteria ---------------------------------------------------------------------------

_FIELD_ALIASES = {
    "PID.3": "PID.3.1", "PID.3.1.1": "PID.3.1", "PID.3.4.1": "PID.3.4", "PID.5": "PID.5.1",
    "PID.5.1.1": "PID.5.1", "PID.7.1": "PID.7", "PID.8.1": "PID.8", "PV1.2.1": "PV1.2",
    "PV1.3.1": "PV1.3", "PV1.7.1": "PV1.7", "PV1.10.1": "PV1.10", "PV1.19.1": "PV1.19",
    "PV1.44.1": "PV1.44", "PV1.45.1": "PV1.45",
}
_PID_FIELDS = frozenset({"PID.3.1", "PID.3.4", "PID.3.5", "PID.5.1", "PID.5.2", "PID.5.3",
                         "PID.7", "PID.8", "PID.11.5"})
_PV1_FIELDS = frozenset({"PV1.2", "PV1.3", "PV1.7", "PV1.10", "PV1.19", "PV1.44", "PV1.45"})


def _text_match(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    prefix = value.endswith("*")
    folded = fold(value.rstrip("*") if prefix else value)
    if not folded:
        raise _Reject("101", "a search value is empty")
    target = sql_fold(column)
    if not prefix:
        return target == folded
    escaped = folded.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return target.like(escaped + "%", escape="\\")


def _postcode_match(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    prefix = value.endswith("*")
    norm = "".join(value.rstrip("*").split()).upper()
    if not norm:
        raise _Reject("101", "a search value is empty")
    target = sa.func.upper(sa.func.replace(column, " ", ""))
    if not prefix:
        return target == norm
    escaped = norm.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return target.like(escaped + "%", escape="\\")


def _date_range(column: ColumnElement[Any], name: str, value: str) -> ColumnElement[bool]:
    lo, sep, hi = value.partition("-")
    if not sep:
        hi = lo
    if (not lo and not hi) or any(v and not _DATE_PART.match(v) for v in (lo, hi)):
        raise _Reject("102", f"{name} must be a date range YYYYMMDD-YYYYMMDD")
    out: list[ColumnElement[bool]] = []
    if lo:
        out.append(column >= lo)
    if hi:
        out.append(column <= hi.ljust(12, "9"))
    return sa.and_(*out)


def _criteria(qpd: er7.Segment, allowed: frozenset[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for r in range(qpd.repetitions(3)):
        name = (qpd.value(3, 1, repetition=r) or "").lstrip("@")
        value = qpd.value(3, 2, repetition=r)
        if not name and value is None:
            continue
        name = _FIELD_ALIASES.get(name, name)
        if name not in allowed:
            shown = name if re.fullmatch(r"[A-Z0-9.]{1,20}", name) else "(unreadable)"
            raise _Reject("103", f"QPD-3 field {shown} is not supported")
        if value is None:
            raise _Reject("101", f"QPD-3 field {name} has no value")
        out.append((name, value))
    if not out:
        raise _Reject("101", "QPD-3 has no search criteria")
    return out


def _patient_where(criteria: list[tuple[str, str]]) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [pat.c.ARCHV_FLAG != "Y"]
    id_type = next((v for k, v in criteria if k == "PID.3.5"), None)
    authority = next((v for k, v in criteria if k == "PID.3.4"), None)
    if (id_type or authority) and not any(k == "PID.3.1" for k, _ in criteria):
        raise _Reject("101", "PID.3.5 and PID.3.4 need PID.3.1")
    if id_type is None and authority in ("NHS", TRUST_ODS):
        id_type = "NH" if authority == "NHS" else None
    for name, value in criteria:
        if name == "PID.3.1":
            old = sa.exists().where(pids.c.PATNT_REFNO == pat.c.PATNT_REFNO,
                                    pids.c.IDENTIFIER == value)
            if id_type == "PI":
                where.append(pat.c.PASID == value)
            elif id_type == "NH":
                where.append(pat.c.NHS_NUMBER == value)
            elif id_type:
                where.append(old.where(pids.c.PITYP_CODE == id_type))
            elif authority == TRUST_ODS:
                where.append(sa.or_(pat.c.PASID == value, old))
            else:
                where.append(sa.or_(pat.c.PASID == value, pat.c.NHS_NUMBER == value, old))
        elif name == "PID.5.1":
            where.append(_text_match(pat.c.SURNAME, value))
        elif name == "PID.5.2":
            where.append(sa.or_(_text_match(pat.c.FORENAME, value),
                                _text_match(pat.c.SECOND_FORENAME, value)))
        elif name == "PID.5.3":
            where.append(_text_match(pat.c.SECOND_FORENAME, value))
        elif name == "PID.7":
            date = value[:8] if len(value) >= 8 else value
            if not _DATE_PART.match(date) or len(date) not in (4, 6, 8):
                raise _Reject("102", "PID.7 must be a date YYYYMMDD (or YYYY, YYYYMM)")
            where.append(pat.c.DTTM_OF_BIRTH == date if len(date) == 8
                         else pat.c.DTTM_OF_BIRTH.like(date + "%"))
        elif name == "PID.8":
            sex = _SEX_FROM_WIRE.get(value.upper())
            if sex is None:
                raise _Reject("103", "PID.8 sex code is not supported")
            where.append(pat.c.SEXXX_CODE == sex)
        elif name == "PID.11.5":
            where.append(sa.exists().where(addr.c.PATNT_REFNO == pat.c.PATNT_REFNO,
                                           _postcode_match(addr.c.PCODE, value)))
    return where


def _visit_where(criteria: list[tuple[str, str]]) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    for name, value in criteria:
        if name == "PV1.2":
            patcl = _CLASS_FROM_HL7.get(value.upper())
            if patcl is None:
                raise _Reject("103", "PV1.2 patient class is not supported")
            where.append(spell.c.PATCL_CODE == patcl)
        elif name == "PV1.3":
            where.append(spell.c.LOCTN_REFNO.in_(
                sa.select(loc.c.LOCTN_REFNO).where(loc.c.LOCTN_CODE == value)))
        elif name == "PV1.7":
            where.append(spell.c.PROCA_REFNO.in_(
                sa.select(clin.c.PROCA_REFNO).where(clin.c.GMC_CODE == value)))
        elif name == "PV1.10":
            where.append(spell.c.MAIN_SPECT_CODE == value)
        elif name == "PV1.19":
            where.append(spell.c.SPELL_NUMBER == value)
        elif name == "PV1.44":
            where.append(_date_range(spell.c.ADMIT_DTTM, name, value))
        elif name == "PV1.45":
            where.append(_date_range(spell.c.DISCH_DTTM, name, value))
    return where


# --- building PID / PD1 / PV1 from rows -------------------------------------------------------


@dataclass
class _Related:
    """The child rows of one page of patients, loaded in one query per table."""

    addresses: dict[int, list[sa.Row[Any]]] = field(default_factory=dict)
    ids: dict[int, list[sa.Row[Any]]] = field(default_factory=dict)
    gp: dict[int, sa.Row[Any]] = field(default_factory=dict)


def _load_related(conn: Connection, refnos: list[int]) -> _Related:
    out = _Related()
    if not refnos:
        return out
    for row in conn.execute(sa.select(addr).where(addr.c.PATNT_REFNO.in_(refnos)).order_by(
            addr.c.PATNT_REFNO, addr.c.END_DTTM.is_not(None), addr.c.START_DTTM,
            addr.c.ADDSS_REFNO)):
        out.addresses.setdefault(row.PATNT_REFNO, []).append(row)
    for row in conn.execute(sa.select(pids).where(pids.c.PATNT_REFNO.in_(refnos)).order_by(
            pids.c.PATNT_REFNO, pids.c.START_DTTM, pids.c.PATID_REFNO)):
        out.ids.setdefault(row.PATNT_REFNO, []).append(row)
    gp = (sa.select(gpreg.c.PATNT_REFNO, org.c.ORG_NAME, org.c.ODS_CODE, clin.c.GMP_CODE,
                    clin.c.SURNAME, clin.c.FORENAME, clin.c.TITLE)
          .select_from(gpreg.outerjoin(org, org.c.ORGAN_REFNO == gpreg.c.ORGAN_REFNO)
                       .outerjoin(clin, clin.c.PROCA_REFNO == gpreg.c.PROCA_REFNO))
          .where(gpreg.c.PATNT_REFNO.in_(refnos), gpreg.c.END_DTTM.is_(None))
          .order_by(gpreg.c.PATNT_REFNO, gpreg.c.START_DTTM))
    for row in conn.execute(gp):
        out.gp[row.PATNT_REFNO] = row  # the latest current registration wins
    return out


def _date8(value: str | None) -> str | None:
    return value[:8] if value else None


class _Writer:
    """Builds the segments of reply groups."""

    def __init__(self, sex_codes: Literal["hl7", "nhs"]) -> None:
        self.sex_codes = sex_codes

    def pid(self, set_id: int, p: sa.Row[Any], rel: _Related) -> str:
        ids = [_f(p.PASID, None, None, TRUST_ODS, "PI")]
        if p.NHS_NUMBER:
            ids.append(_f(p.NHS_NUMBER, None, None, "NHS", "NH"))
        for i in rel.ids.get(p.PATNT_REFNO, []):
            ids.append(_f(i.IDENTIFIER, None, None, TRUST_ODS, i.PITYP_CODE, None,
                          _date8(i.START_DTTM), _date8(i.END_DTTM)))
        addresses = [
            _f(a.LINE1, a.LINE2, a.LINE3, a.LINE4, a.PCODE, None,
               _ADDRESS_TO_HL7.get(a.ADTYP_CODE, ""), None, None, None, None,
               (a.START_DTTM, a.END_DTTM))
            for a in rel.addresses.get(p.PATNT_REFNO, [])]
        telecom = []
        if p.HOME_TEL:
            telecom.append(_f(p.HOME_TEL, "PRN", "PH"))
        if p.MOBILE_TEL:
            telecom.append(_f(p.MOBILE_TEL, "ORN", "CP"))
        if p.EMAIL_ADDR:
            telecom.append(_f(None, "NET", "Internet", p.EMAIL_ADDR))
        sex = p.SEXXX_CODE if self.sex_codes == "nhs" else _SEX_TO_HL7.get(p.SEXXX_CODE, "U")
        return _seg("PID", {
            1: str(set_id), 3: ids,
            5: _f(p.SURNAME, p.FORENAME, p.SECOND_FORENAME, None, p.TITLE, None, "L"),
            7: _f(p.DTTM_OF_BIRTH), 8: _f(sex), 11: addresses, 13: telecom,
            15: _f(p.LANG_CODE), 16: _f(p.MARRY_CODE), 22: _f(p.ETHGR_CODE),
            29: _f(p.DTTM_OF_DEATH), 30: "Y" if p.DTTM_OF_DEATH else None,
            32: _f(f"NSTS{p.NNNTS_CODE}") if p.NNNTS_CODE else None,
        })

    def pd1(self, refno: int, rel: _Related) -> str | None:
        gp = rel.gp.get(refno)
        if gp is None:
            return None
        practice = _f(gp.ORG_NAME, None, gp.ODS_CODE) if gp.ODS_CODE else None
        doctor = (_f(gp.GMP_CODE, gp.SURNAME, gp.FORENAME, None, None, gp.TITLE, None, None,
                     "GMP") if gp.GMP_CODE else None)
        return _seg("PD1", {3: practice, 4: doctor})

    def pv1(self, set_id: int, s: sa.Row[Any]) -> str:
        consultant = (_f(s.GMC_CODE, s.C_SURNAME, s.C_FORENAME, None, None, s.C_TITLE, None,
                         None, "GMC") if s.GMC_CODE else None)
        ward = (_f(s.LOCTN_CODE, None, None, TRUST_ODS, None, None, None, None, s.LOCTN_NAME)
                if s.LOCTN_CODE else None)
        return _seg("PV1", {
            1: str(set_id), 2: _f(_CLASS_TO_HL7.get(s.PATCL_CODE or "", "")), 3: ward,
            4: _f(s.ADMET_CODE), 7: consultant, 10: _f(s.MAIN_SPECT_CODE),
            14: _f(s.ADSOR_CODE), 18: _f(s.PATCL_CODE),
            19: _f(s.SPELL_NUMBER, None, None, TRUST_ODS, "VN"), 36: _f(s.DISMT_CODE),
            37: _f(s.DISDE_CODE), 41: _f(s.SPELL_STATUS), 44: _f(s.ADMIT_DTTM),
            45: _f(s.DISCH_DTTM),
        })


# --- the simulator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    msg: er7.Message
    control_id: str
    kind: str
    trigger: str
    header: messages.Header
    """The header for replies (sender and receiver swapped)."""
    raw_qpd: str | None


class PasSimulator:
    """An MLLP server that behaves as the PAS contract above says. ``async with`` it, or call
    ``start()``/``stop()``; ``port`` is the bound port (pass ``port=0`` for a free one)."""

    def __init__(self, db_url: str, *, host: str = "127.0.0.1", port: int = 0,
                 sex_codes: Literal["hl7", "nhs"] = "hl7",
                 ssl: ssl_module.SSLContext | None = None, max_quantity: int = 100) -> None:
        if sex_codes not in ("hl7", "nhs"):
            raise ValueError("sex_codes must be 'hl7' or 'nhs'")
        if max_quantity < 1:
            raise ValueError("max_quantity must be at least 1")
        self.faults = Faults()
        self.received: list[str] = []
        """MSH-10 of every message received, in order ('' when it could not be read)."""
        self.max_quantity = max_quantity
        self._writer = _Writer(sex_codes)
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

    async def stop(self) -> None:
        try:
            await self._server.stop()
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
        if msg is None:
            reply = messages.ack(_reply_header(None), messages.new_control_id(),
                                 acknowledges=control, code="AR",
                                 text="message could not be parsed",
                                 error=("100", "message could not be parsed"))
        else:
            reply = await self._respond(msg, control)
        return self._deliver(reply, control)

    async def _respond(self, msg: er7.Message, control: str) -> bytes:
        request = _request(msg, control)
        faults = self.faults
        if faults.nak_ae_count > 0 or faults.nak_ar_count > 0:
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

    def _deliver(self, payload: bytes, control: str) -> bytes | Reply:
        f = self.faults
        if f.wrong_msa2_count > 0:
            f.wrong_msa2_count -= 1
            payload = _replace_msa2(payload, "WRONG" + control[:15])
        delay = drop = split = omit = False
        if f.delay_count > 0:
            f.delay_count -= 1
            delay = True
        if f.drop_count > 0:
            f.drop_count -= 1
            drop = True
        if f.split_count > 0:
            f.split_count -= 1
            split = True
        if f.missing_cr_count > 0:
            f.missing_cr_count -= 1
            omit = True
        if not (delay or drop or split or omit):
            return payload
        if omit and payload.endswith(b"\r"):
            payload = payload[:-1]
        return Reply(None if drop else payload, delay=f.delay_seconds if delay else 0.0,
                     drop_connection=drop, split_into=3 if split else 1, omit_final_cr=omit)

    # -- replies

    def _ack(self, request: _Request, code: Literal["AA", "AE", "AR"], err_code: str | None,
             text: str | None, extra: str = "") -> bytes:
        payload = messages.ack(
            request.header, messages.new_control_id(), acknowledges=request.control_id,
            code=code, text=text, error=(err_code, text or "") if err_code else None,
            event=request.trigger if re.fullmatch(r"[A-Z0-9]{3}", request.trigger) else None)
        if extra:
            codec = er7.charset_of(request.header.charset)
            payload += (extra + "\r").encode(codec)
        return payload

    def _rsp(self, request: _Request, segments: list[str]) -> bytes:
        structure = {"Q21": "RSP^K21^RSP_K21", "Q22": "RSP^K22^RSP_K22",
                     "ZV1": "RSP^ZV2^RSP_ZV2"}[request.trigger]
        h = request.header
        msh = {  # MSH-n: MSH-1 is the field separator itself, so MSH-2 is the first joined
            2: _ENC.component + _ENC.repetition + _ENC.escape + _ENC.subcomponent,
            3: _f(h.sending_application), 4: _f(h.sending_facility),
            5: _f(h.receiving_application), 6: _f(h.receiving_facility), 7: _dttm_now(),
            9: structure, 10: messages.new_control_id(), 11: _f(h.processing_id),
            12: _f(h.version), 18: _f(h.charset),
        }
        text = "\r".join([_seg("MSH", {n - 1: v for n, v in msh.items()}), *segments]) + "\r"
        return text.encode(er7.charset_of(h.charset))

    def _rsp_error(self, request: _Request, exc: _Reject) -> bytes:
        if request.trigger not in ("Q21", "Q22", "ZV1"):
            return self._ack(request, exc.ack, exc.code, exc.text)
        qpd = request.msg.segment("QPD")
        tag = qpd.value(2) if qpd is not None else None
        return self._rsp(request, [
            _seg("MSA", {1: exc.ack, 2: _f(request.control_id), 3: _f(exc.text)}),
            _seg("ERR", {1: _f(None, None, None, (exc.code, exc.text, "HL70357"))}),
            _seg("QAK", {1: _f(tag) if tag else None, 2: exc.ack}),
            request.raw_qpd or "QPD",
        ])

    def _rsp_ok(self, request: _Request, groups: list[str], total: int, returned: int,
                remaining: int, pointer: str | None) -> bytes:
        qpd = request.msg.segment("QPD")
        assert qpd is not None
        tag = qpd.value(2)
        segments = [
            _seg("MSA", {1: "AA", 2: _f(request.control_id)}),
            _seg("QAK", {1: _f(tag) if tag else None, 2: "OK" if total else "NF",
                         3: _f(qpd.value(1), qpd.value(1, 2), qpd.value(1, 3)),
                         4: str(total), 5: str(returned),
                         6: str(remaining)}),
            request.raw_qpd or "QPD",
            *groups,
        ]
        if pointer:
            segments.append(_seg("DSC", {1: _f(pointer), 2: "I"}))
        return self._rsp(request, segments)

    # -- queries (run in worker threads)

    def _q21(self, request: _Request) -> bytes:
        qpd = request.msg.segment("QPD")
        if qpd is None:
            raise _Reject("101", "QPD segment missing")
        ident, authority, id_type = qpd.value(3, 1), qpd.value(3, 4), qpd.value(3, 5)
        if not ident:
            raise _Reject("101", "QPD-3 identifier missing")
        if id_type is None:
            id_type = {"NHS": "NH", TRUST_ODS: "PI"}.get(authority or "")
        column = {"PI": pat.c.PASID, "NH": pat.c.NHS_NUMBER}.get(id_type or "")
        if column is None:
            raise _Reject("103", "QPD-3 identifier type is not supported (use PI or NH)")
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(pat).where(column == ident, pat.c.ARCHV_FLAG != "Y")
                               .order_by(pat.c.PATNT_REFNO).limit(1)).first()
            groups = self._groups(conn, [row] if row else [], visits=False)
        n = 1 if row else 0
        return self._rsp_ok(request, groups, n, n, 0, None)

    def _find(self, request: _Request) -> bytes:
        msg = request.msg
        qpd = msg.segment("QPD")
        if qpd is None:
            raise _Reject("101", "QPD segment missing")
        visits = request.trigger == "ZV1"
        criteria = _criteria(qpd, _PID_FIELDS | _PV1_FIELDS if visits else _PID_FIELDS)
        quantity = self._quantity(msg.segment("RCP"))
        qhash = _query_hash(request.trigger, criteria)
        dsc = msg.segment("DSC")
        pointer = dsc.value(1) if dsc is not None else None
        where = _patient_where(criteria)
        keys: list[ColumnElement[Any]] = [pat.c.PATNT_REFNO]
        if visits:
            where += _visit_where(criteria)
            keys.append(spell.c.PRVSP_REFNO)
            source: sa.FromClause = pat.join(spell, spell.c.PATNT_REFNO == pat.c.PATNT_REFNO)
        else:
            source = pat
        after = _read_pointer(pointer, qhash, len(keys)) if pointer else None
        seek = where + ([_after(keys, after)] if after else [])
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(source)
                                 .where(*where)).scalar_one()
            ahead = total if after is None else conn.execute(
                sa.select(sa.func.count()).select_from(source).where(*seek)).scalar_one()
            rows: list[sa.Row[Any]] = []
            if quantity:
                stmt = (self._visit_select() if visits else sa.select(pat)).where(*seek)
                rows = list(conn.execute(stmt.order_by(*keys).limit(quantity)))
            groups = self._groups(conn, rows, visits=visits)
        remaining = ahead - len(rows)
        next_pointer = None
        if rows and remaining > 0:
            last = rows[-1]
            key = [last.PATNT_REFNO] + ([last.PRVSP_REFNO] if visits else [])
            next_pointer = _pointer(qhash, key)
        return self._rsp_ok(request, groups, total, len(rows), remaining, next_pointer)

    def _quantity(self, rcp: er7.Segment | None) -> int:
        raw = rcp.value(2, 1) if rcp is not None else None
        unit = (rcp.value(2, 2) if rcp is not None else None) or "RD"
        if unit != "RD":
            raise _Reject("103", "RCP-2 quantity unit must be RD (records)")
        if raw is None:
            return self.max_quantity
        if not raw.isdigit():
            raise _Reject("102", "RCP-2 quantity must be a whole number")
        return min(int(raw), self.max_quantity)

    @staticmethod
    def _visit_select() -> sa.Select[Any]:
        spell_cols = [c for c in spell.c if c.name not in ("PATNT_REFNO", "MODIF_DTTM")]
        return (sa.select(pat, *spell_cols, loc.c.LOCTN_CODE, loc.c.LOCTN_NAME, clin.c.GMC_CODE,
                          clin.c.SURNAME.label("C_SURNAME"), clin.c.FORENAME.label("C_FORENAME"),
                          clin.c.TITLE.label("C_TITLE"))
                .select_from(pat.join(spell, spell.c.PATNT_REFNO == pat.c.PATNT_REFNO)
                             .outerjoin(loc, loc.c.LOCTN_REFNO == spell.c.LOCTN_REFNO)
                             .outerjoin(clin, clin.c.PROCA_REFNO == spell.c.PROCA_REFNO)))

    def _groups(self, conn: Connection, rows: list[sa.Row[Any]], *, visits: bool) -> list[str]:
        rel = _load_related(conn, sorted({r.PATNT_REFNO for r in rows}))
        out: list[str] = []
        for n, row in enumerate(rows, 1):
            out.append(self._writer.pid(n, row, rel))
            pd1 = self._writer.pd1(row.PATNT_REFNO, rel)
            if pd1:
                out.append(pd1)
            if visits:
                out.append(self._writer.pv1(n, row))
                out.append("PV2")
        return out

    # -- ADT (writes, serialised, idempotent on the control id)

    async def _adt_once(self, request: _Request) -> bytes:
        msh = request.msg.segments[0]
        key = (msh.value(3) or "", msh.value(4) or "", request.control_id)
        async with self._write_lock:
            cached = self._acks.get(key)
            if cached is not None:
                self._acks.move_to_end(key)
                return cached
            try:
                pid_text = await anyio.to_thread.run_sync(self._adt, request)
                reply = self._ack(request, "AA", None, None, extra=pid_text)
            except _Reject as exc:
                reply = self._ack(request, exc.ack, exc.code, exc.text)
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
        with self.engine.begin() as conn:
            if request.trigger == "A28":
                refno = _create(conn, pid, msg.segment("PD1"), msg.encoding)
            else:
                refno = _update(conn, pid, msg.segment("PD1"), msg.encoding)
            row = conn.execute(sa.select(pat.c.PASID, pat.c.NHS_NUMBER)
                               .where(pat.c.PATNT_REFNO == refno)).one()
        ids = [_f(row.PASID, None, None, TRUST_ODS, "PI")]
        if row.NHS_NUMBER:
            ids.append(_f(row.NHS_NUMBER, None, None, "NHS", "NH"))
        return _seg("PID", {1: "1", 3: ids})


def _sqlite_functions(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.create_function("ccg_fold", 1, lambda v: None if v is None else fold(str(v)),
                               deterministic=True)


def _after(keys: list[ColumnElement[Any]], values: tuple[int, ...]) -> ColumnElement[bool]:
    """Keyset condition: (k1, k2, ...) > (v1, v2, ...), portable to every dialect."""
    if len(keys) == 1:
        return keys[0] > values[0]
    return sa.or_(keys[0] > values[0],
                  sa.and_(keys[0] == values[0], _after(keys[1:], values[1:])))


def _dttm_now() -> str:
    return dt.datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z")


def _reply_header(msg: er7.Message | None) -> messages.Header:
    msh = msg.segments[0] if msg is not None else None
    charset = (msh.value(18) if msh is not None else None) or "UNICODE UTF-8"
    try:
        er7.charset_of(charset)
    except er7.Er7Error:
        charset = "UNICODE UTF-8"
    return messages.Header(
        sending_application="PAS", sending_facility=TRUST_ODS,
        receiving_application=(msh.value(3) if msh is not None else None) or "",
        receiving_facility=(msh.value(4) if msh is not None else None) or "",
        version="2.4", charset=charset,
        processing_id=(msh.value(11) if msh is not None else None) or "P")


def _request(msg: er7.Message, control: str) -> _Request:
    msh = msg.segments[0]
    raw_qpd = None
    qpd = msg.segment("QPD")
    if qpd is not None:
        if msg.encoding == _ENC:  # echoed as sent
            raw_qpd = _ENC.field.join(["QPD", *(qpd.raw(n) for n in range(1, len(qpd) + 1))])
        else:  # other delimiters: echo the query name and tag, re-encoded
            raw_qpd = _seg("QPD", {1: _f(qpd.value(1), qpd.value(1, 2), qpd.value(1, 3)),
                                   2: _f(qpd.value(2) or "")})
    return _Request(msg, control, (msh.value(9, 1) or "").upper(),
                    (msh.value(9, 2) or "").upper(), _reply_header(msg), raw_qpd)


def _replace_msa2(payload: bytes, control: str) -> bytes:
    lines = payload.split(b"\r")
    for i, line in enumerate(lines):
        if line.startswith(b"MSA|"):
            parts = line.split(b"|")
            while len(parts) < 3:
                parts.append(b"")
            parts[2] = control.encode()
            lines[i] = b"|".join(parts)
    return b"\r".join(lines)


# --- ADT processing (inside one transaction) --------------------------------------------------


def _text(seg: er7.Segment | None, field: int, component: int = 1,
          subcomponent: int = 1, repetition: int = 0) -> str | None:
    if seg is None:
        return None
    v = seg.value(field, component, subcomponent, repetition)
    return v.strip() if v and v.strip() else None


def _check_length(column: sa.Column[Any], value: str | None, where: str) -> str | None:
    length = getattr(column.type, "length", None)
    if value is not None and length is not None and len(value) > length:
        raise _Reject("102", f"{where} is longer than the PAS allows ({length})")
    return value


def _identifiers(pid: er7.Segment) -> tuple[str | None, str | None]:
    """(PAS number, NHS number) from PID-3's repetitions."""
    pasid = nhs = None
    for r in range(pid.repetitions(3)):
        value = _text(pid, 3, 1, 1, r)
        id_type = _text(pid, 3, 5, 1, r)
        authority = _text(pid, 3, 4, 1, r)
        if not value:
            continue
        if id_type == "PI" or (id_type is None and authority == TRUST_ODS):
            pasid = pasid or value
        elif id_type == "NH" or (id_type is None and authority == "NHS"):
            nhs = nhs or value
    return pasid, nhs


def _birth_date(value: str | None) -> str:
    if value is None:
        raise _Reject("101", "PID-7 birth date is required")
    date = value[:8]
    try:
        dt.datetime.strptime(date, "%Y%m%d")
    except ValueError:
        raise _Reject("102", "PID-7 birth date must be YYYYMMDD") from None
    return date


def _death(value: str) -> str:
    digits = value[:12]
    if not _DATE_PART.match(digits) or len(digits) < 8:
        raise _Reject("102", "PID-29 date of death must be YYYYMMDD[HHMM]")
    return digits.ljust(12, "0")


def _telecom(pid: er7.Segment) -> dict[str, str | None]:
    out: dict[str, str | None] = {"HOME_TEL": None, "MOBILE_TEL": None, "EMAIL_ADDR": None}
    for r in range(pid.repetitions(13)):
        number, use, equipment = (_text(pid, 13, c, 1, r) for c in (1, 2, 3))
        email = _text(pid, 13, 4, 1, r)
        if equipment in ("Internet", "X.400") or use == "NET":
            column, value = "EMAIL_ADDR", email or number
        elif equipment == "CP":
            column, value = "MOBILE_TEL", number
        else:
            column, value = "HOME_TEL", number
        if value and out[column] is None:
            out[column] = value
    return out


def _demographics(pid: er7.Segment, enc: er7.Encoding, *, update: bool) -> dict[str, Any]:
    """Column values from PID. For an update, only what was sent (None where ``""``)."""
    simple = {  # column: (field, component)
        "SURNAME": (5, 1), "FORENAME": (5, 2), "SECOND_FORENAME": (5, 3), "TITLE": (5, 5),
        "LANG_CODE": (15, 1), "MARRY_CODE": (16, 1), "ETHGR_CODE": (22, 1),
    }
    values: dict[str, Any] = {}
    for column, (f, c) in simple.items():
        value = _text(pid, f, c)
        if value is not None:
            values[column] = value
        elif update and _is_null(pid, enc, f, c):
            values[column] = None
    dob = _text(pid, 7)
    if dob is not None or not update:
        values["DTTM_OF_BIRTH"] = _birth_date(dob)
    elif _is_null(pid, enc, 7):
        values["DTTM_OF_BIRTH"] = None
    sex = _text(pid, 8)
    if sex is not None:
        local = _SEX_FROM_WIRE.get(sex.upper())
        if local is None:
            raise _Reject("103", "PID-8 sex code is not supported")
        values["SEXXX_CODE"] = local
    elif not update:
        values["SEXXX_CODE"] = "X"
    elif _is_null(pid, enc, 8):
        values["SEXXX_CODE"] = None
    death = _text(pid, 29)
    if death is not None:
        values["DTTM_OF_DEATH"] = _death(death)
    elif update and _is_null(pid, enc, 29):
        values["DTTM_OF_DEATH"] = None
    status = _text(pid, 32)
    if status is not None:
        code = status[4:] if status.startswith("NSTS") else status
        if code not in ("01", "02", "03", "04", "05", "06", "07", "08"):
            raise _Reject("103", "PID-32 NHS number status is not supported")
        values["NNNTS_CODE"] = code
    elif update and _is_null(pid, enc, 32):
        values["NNNTS_CODE"] = None
    if pid.repetitions(13):
        values.update(_telecom(pid))
    elif update and pid.raw(13) == '""':
        values.update(dict.fromkeys(("HOME_TEL", "MOBILE_TEL", "EMAIL_ADDR")))
    for column in ("SURNAME", "FORENAME", "DTTM_OF_BIRTH", "SEXXX_CODE"):
        if column in values and values[column] is None:
            raise _Reject("101", f"{column.lower().replace('_', ' ')} cannot be removed")
    for column, value in values.items():
        _check_length(pat.c[column], value, column.lower().replace("_", " "))
    return values


def _next_key(conn: Connection, column: sa.Column[Any]) -> int:
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(column), 0))).scalar_one()) + 1


def _nhs_free(conn: Connection, nhs: str, refno: int | None) -> None:
    if not nhs_number.is_valid(nhs):
        raise _Reject("102", "PID-3 NHS number is not valid")
    where = [pat.c.NHS_NUMBER == nhs]
    if refno is not None:
        where.append(pat.c.PATNT_REFNO != refno)
    if conn.execute(sa.select(pat.c.PATNT_REFNO).where(*where).limit(1)).first():
        raise _Reject("205", "the NHS number belongs to another patient")


def _addresses(pid: er7.Segment, now: str) -> list[dict[str, Any]]:
    out = []
    for r in range(pid.repetitions(11)):
        parts = {col: _text(pid, 11, c, 1, r) for col, c in
                 (("LINE1", 1), ("LINE2", 2), ("LINE3", 3), ("LINE4", 4), ("PCODE", 5))}
        if not any(parts.values()):
            continue
        kind = _ADDRESS_FROM_HL7.get(_text(pid, 11, 7, 1, r) or "")
        if kind is None:
            raise _Reject("103", "PID-11 address type is not supported (H, C or M)")
        start, end = _text(pid, 11, 12, 1, r), _text(pid, 11, 12, 2, r)
        for v in (start, end):
            if v is not None and not _DATE_PART.match(v):
                raise _Reject("102", "PID-11 address dates must be YYYYMMDD[HHMM]")
        for col, value in parts.items():
            _check_length(addr.c[col], value, "PID-11 address")
        out.append({**parts, "ADTYP_CODE": kind,
                    "START_DTTM": (start or now)[:12].ljust(12, "0"),
                    "END_DTTM": end[:12].ljust(12, "0") if end else None})
    return out


def _gp(conn: Connection, pd1: er7.Segment | None) -> tuple[int | None, int | None] | None:
    """(ORGAN_REFNO, PROCA_REFNO) from PD1-3.3 / PD1-4.1; None if PD1 says nothing."""
    ods, gmp = _text(pd1, 3, 3), _text(pd1, 4, 1)
    if ods is None and gmp is None:
        return None
    organ = proca = None
    if ods is not None:
        organ = conn.execute(sa.select(org.c.ORGAN_REFNO).where(org.c.ODS_CODE == ods)).scalar()
        if organ is None:
            raise _Reject("204", "PD1-3 GP practice code is not known")
    if gmp is not None:
        proca = conn.execute(sa.select(clin.c.PROCA_REFNO).where(clin.c.GMP_CODE == gmp)).scalar()
        if proca is None:
            raise _Reject("204", "PD1-4 GP code is not known")
    return organ, proca


def _create(conn: Connection, pid: er7.Segment, pd1: er7.Segment | None,
            enc: er7.Encoding) -> int:
    now = _now()
    stamp = _dttm(now)
    values = _demographics(pid, enc, update=False)
    for column in ("SURNAME", "FORENAME"):
        if not values.get(column):
            part = "family" if column == "SURNAME" else "given"
            raise _Reject("101", f"PID-5 {part} name is required")
    pasid, nhs = _identifiers(pid)
    if pasid is not None:
        if not _PASID.match(pasid):
            raise _Reject("102", "PID-3 PAS number is not valid")
        if conn.execute(sa.select(pat.c.PATNT_REFNO).where(pat.c.PASID == pasid)).first():
            raise _Reject("205", "a patient with this PAS number already exists")
    else:
        last = conn.execute(sa.select(sa.func.max(pat.c.PASID)).where(
            pat.c.PASID.like("D_______"))).scalar()
        number = int(last[1:]) + 1 if last and last[1:].isdigit() else 1
        pasid = f"D{number:07d}"
    if nhs is not None:
        _nhs_free(conn, nhs, None)
    addresses = _addresses(pid, stamp)
    gp = _gp(conn, pd1)
    refno = _next_key(conn, pat.c.PATNT_REFNO)
    row: dict[str, Any] = {c.name: None for c in pat.columns}
    row.update(values)
    row.update({"PATNT_REFNO": refno, "PASID": pasid, "NHS_NUMBER": nhs, "ARCHV_FLAG": "N",
                "MODIF_DTTM": _modif(now)})
    conn.execute(pat.insert(), [row])
    if addresses:
        first = _next_key(conn, addr.c.ADDSS_REFNO)
        conn.execute(addr.insert(), [{**a, "ADDSS_REFNO": first + n, "PATNT_REFNO": refno}
                                  for n, a in enumerate(addresses)])
    if gp is not None:
        _register_gp(conn, refno, gp, stamp)
    return refno


def _update(conn: Connection, pid: er7.Segment, pd1: er7.Segment | None,
            enc: er7.Encoding) -> int:
    now = _now()
    stamp = _dttm(now)
    pasid, nhs = _identifiers(pid)
    if pasid is None:
        raise _Reject("204", "PID-3 carries no PAS number (type PI)")
    refno: int | None = conn.execute(sa.select(pat.c.PATNT_REFNO).where(
        pat.c.PASID == pasid, pat.c.ARCHV_FLAG != "Y")).scalar()
    if refno is None:
        raise _Reject("204", "no patient has this PAS number")
    values = _demographics(pid, enc, update=True)
    if nhs is not None:
        _nhs_free(conn, nhs, refno)
        values["NHS_NUMBER"] = nhs
    values["MODIF_DTTM"] = _modif(now)
    conn.execute(pat.update().where(pat.c.PATNT_REFNO == refno).values(**values))
    for address in _addresses(pid, stamp):
        if address["END_DTTM"] is not None:
            continue  # history is the PAS's own record; only current addresses are applied
        current = list(conn.execute(sa.select(addr).where(
            addr.c.PATNT_REFNO == refno, addr.c.ADTYP_CODE == address["ADTYP_CODE"],
            addr.c.END_DTTM.is_(None))))
        same = [a for a in current if all(
            (getattr(a, k) or None) == address[k] for k in ("LINE1", "LINE2", "LINE3",
                                                            "LINE4", "PCODE"))]
        if same:
            continue
        if current:
            ended_ids = [a.ADDSS_REFNO for a in current]
            conn.execute(addr.update().where(addr.c.ADDSS_REFNO.in_(ended_ids))
                         .values(END_DTTM=stamp))
        key = _next_key(conn, addr.c.ADDSS_REFNO)
        conn.execute(addr.insert(), [{**address, "ADDSS_REFNO": key, "PATNT_REFNO": refno,
                                      "START_DTTM": stamp}])
    gp = _gp(conn, pd1)
    ended = pd1 is not None and _is_null(pd1, enc, 3)
    if gp is not None or ended:
        current_gp = conn.execute(sa.select(gpreg).where(
            gpreg.c.PATNT_REFNO == refno, gpreg.c.END_DTTM.is_(None))).first()
        unchanged = (gp is not None and current_gp is not None
                     and (gp[0] is None or gp[0] == current_gp.ORGAN_REFNO)
                     and (gp[1] is None or gp[1] == current_gp.PROCA_REFNO))
        if not unchanged:
            conn.execute(gpreg.update()
                         .where(gpreg.c.PATNT_REFNO == refno, gpreg.c.END_DTTM.is_(None))
                         .values(END_DTTM=stamp))
            if gp is not None:
                _register_gp(conn, refno, gp, stamp)
    return refno


def _register_gp(conn: Connection, refno: int, gp: tuple[int | None, int | None],
                 stamp: str) -> None:
    conn.execute(gpreg.insert(), [{
        "GPREG_REFNO": _next_key(conn, gpreg.c.GPREG_REFNO), "PATNT_REFNO": refno,
        "ORGAN_REFNO": gp[0], "PROCA_REFNO": gp[1], "START_DTTM": stamp, "END_DTTM": None}])
