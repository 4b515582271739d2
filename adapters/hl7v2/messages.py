"""Outgoing HL7 v2 messages, built with hl7apy: QBP queries, ADT A28/A31/A01 and acknowledgements.

hl7apy gives the structure (segment order, field numbers and data types of the version in
``Header.version``: an unknown segment or field number is a ``ValueError`` here, not a message
the PAS rejects); the values are escaped by :func:`er7.encode` *before* hl7apy sees them, so
``| ^ ~ \\ &`` in a surname always round-trip. (hl7apy's own escaping leaves text that looks
like an escape sequence alone, which is right for the escaped text it is given here and wrong
for raw text.) Control characters (``\\r``, ``\\n``, tab, ...) cannot appear in the ST/ID data
types these messages carry: each becomes one space.

Every builder returns the ER7 bytes of one message — segments each ended by ``\\r``, encoded
in the character set of ``Header.charset`` (MSH-18; ``UnicodeEncodeError``, a ``ValueError``,
if a value cannot be written in it) — ready for :func:`mllp.frame`.

Conventions (the PAS contract in :mod:`gateway.demo_pas.hl7v2` relies on them):

* MSH-7 is local time with its UTC offset; MSH-10 is the caller's control id, 1 to 20
  characters (MSH-10 is ST 20 in v2.4); MSH-11 the processing id; MSH-12 the version;
  MSH-18 the character set.
* Queries: QPD-1 names the query (``Q21^Get Person Demographics^HL70471``...), QPD-2 is the
  query tag, RCP-1 is ``I`` (immediate), RCP-2 the quantity limit ``<n>^RD``, and a
  continuation pointer goes in DSC-1 with DSC-2 ``I``.
* ADT: EVN-2 is now; PID-1 is 1; NK1-1 numbers the NK1 segments; PV1 is required by the
  ADT_A05 structure, so unless values are given for it, it is ``PV1|1|N`` (not applicable);
  an A01's PV1 is the visit admitted, PV1-1 1.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hl7apy.core import Message as _Hl7apyMessage
from hl7apy.exceptions import HL7apyException

from adapters.hl7v2 import er7

__all__ = [
    "MAX_CONTROL_ID",
    "Header",
    "ack",
    "adt",
    "new_control_id",
    "qbp_q21",
    "qbp_q22",
    "qbp_zv1",
]

MAX_CONTROL_ID = 20
"""MSH-10 (message control id) is ST with a maximum length of 20 in HL7 v2.4."""

_ENC = er7.DEFAULT_ENCODING
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_QPD_FIELD = re.compile(r"^[A-Z][A-Z0-9]{2}(?:\.\d{1,3}){1,3}$")
_ADT_PATH = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<segrep>\d{1,3})\])?"
    r"-(?P<field>\d{1,3})(?:\[(?P<rep>\d{1,3})\])?"
    r"(?:\.(?P<comp>\d{1,3}))?(?:\.(?P<sub>\d{1,3}))?$"
)
# Segments adt() may fill, in ADT_A05 order, and which of them repeat.
_ADT_SEGMENTS = ("EVN", "PID", "PD1", "NK1", "PV1", "PV2", "DB1", "OBX", "AL1", "DG1")
_ADT_REPEATING = frozenset({"NK1", "DB1", "OBX", "AL1", "DG1"})

QUERY_NAMES = {
    "Q21": "Q21^Get Person Demographics^HL70471",
    "Q22": "Q22^Find Candidates^HL70471",
    "ZV1": "ZV1^Find Candidates including Visit Information^HL70471",
}


@dataclass(frozen=True)
class Header:
    """The MSH values that do not change from message to message."""

    sending_application: str = "CCGATEWAY"
    sending_facility: str = "RX1"
    receiving_application: str = "PAS"
    receiving_facility: str = "RX1"
    version: str = "2.4"
    charset: str = "UNICODE UTF-8"
    processing_id: str = "P"


# --- control ids ------------------------------------------------------------------------------

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PROCESS_TAG = "".join(secrets.choice(_ALPHABET) for _ in range(6))
_COUNTER = itertools.count(secrets.randbelow(36**5))


def _base36(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def new_control_id() -> str:
    """A new MSH-10: 20 characters, ``[0-9A-Z]``, unique within this process and practically
    across processes: milliseconds since 1970 (9), a random per-process tag (6), a counter (5).
    Sorts roughly by time, which helps reading PAS logs."""
    return (_base36(time.time_ns() // 1_000_000, 9) + _PROCESS_TAG
            + _base36(next(_COUNTER), 5))


# --- small helpers ----------------------------------------------------------------------------


def _esc(value: Any) -> str:
    """One value, escaped for ER7 (delimiters escaped, control characters → space)."""
    return er7.encode(_CONTROL_CHARS.sub(" ", str(value)), _ENC)


def _join(parts: Iterable[str], sep: str) -> str:
    out = list(parts)
    while out and not out[-1]:
        out.pop()
    return sep.join(out)


def _composite(*components: str | tuple[str | None, ...] | None) -> str:
    """A field from raw values: each component a value or a tuple of sub-components."""
    out: list[str] = []
    for c in components:
        if c is None:
            out.append("")
        elif isinstance(c, tuple):
            out.append(_join((_esc(s) if s is not None else "" for s in c), _ENC.subcomponent))
        else:
            out.append(_esc(c))
    return _join(out, _ENC.component)


def _version(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _now() -> str:
    return dt.datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z")


def _check_control_id(control_id: str, what: str = "control id") -> None:
    if not control_id or len(control_id) > MAX_CONTROL_ID:
        raise ValueError(f"the {what} must be 1 to {MAX_CONTROL_ID} characters (MSH-10 is ST 20)")
    if _CONTROL_CHARS.search(control_id) or _esc(control_id) != control_id:
        raise ValueError(f"the {what} must not contain HL7 delimiters or control characters")


def _new(structure: str, header: Header, control_id: str, message_type: str) -> Any:
    _check_control_id(control_id)
    try:
        m = _Hl7apyMessage(structure, version=header.version)
    except HL7apyException as exc:
        raise ValueError(f"hl7apy has no {structure} structure for v{header.version}") from exc
    msh = m.msh
    _set(msh, "MSH_3", _composite(header.sending_application))
    _set(msh, "MSH_4", _composite(header.sending_facility))
    _set(msh, "MSH_5", _composite(header.receiving_application))
    _set(msh, "MSH_6", _composite(header.receiving_facility))
    _set(msh, "MSH_7", _now())
    _set(msh, "MSH_9", message_type)
    _set(msh, "MSH_10", control_id)
    _set(msh, "MSH_11", _composite(header.processing_id))
    _set(msh, "MSH_12", _composite(header.version))
    if header.charset:
        _set(msh, "MSH_18", _esc(header.charset))
    return m


def _set(segment: Any, field: str, er7_text: str, *, repeat: bool = False) -> None:
    """Put already-escaped ER7 text in a field (a new repetition when ``repeat``, which may be
    empty to keep the positions of the repetitions after it)."""
    if not er7_text and not repeat:
        return
    try:
        target = segment.add_field(field) if repeat else getattr(segment, field.lower())
        if er7_text:
            target.value = er7_text
    except (HL7apyException, AttributeError) as exc:
        raise ValueError(f"{field.replace('_', '-')} cannot be set in this message") from exc


def _finish(m: Any, header: Header) -> bytes:
    codec = er7.charset_of(header.charset)
    text: str = m.to_er7()
    return (text + "\r").encode(codec)


# --- queries ----------------------------------------------------------------------------------


def _query(header: Header, control_id: str, trigger: str, query_tag: str,
           parameters: list[str], quantity: int | None, continuation: str | None) -> bytes:
    """A query is written directly as ER7: it is on every read's path, and hl7apy costs
    ~3 ms per message here (it re-parses each value it is given). The structure is the one
    hl7apy builds — ``_query_hl7apy`` stays as the oracle the tests compare against."""
    _check_control_id(control_id)
    tag = _esc(query_tag)
    if not tag or len(query_tag) > 32:
        raise ValueError("the query tag must be 1 to 32 characters (QPD-2 is ST 32)")
    if quantity is not None and quantity < 0:
        raise ValueError("the quantity limit cannot be negative")
    msh = [
        "MSH", _ENC.component + _ENC.repetition + _ENC.escape + _ENC.subcomponent,
        _composite(header.sending_application), _composite(header.sending_facility),
        _composite(header.receiving_application), _composite(header.receiving_facility),
        _now(), "", f"QBP^{trigger}^QBP_Q21", control_id, _composite(header.processing_id),
        _composite(header.version),
    ]
    if header.charset:
        msh += ["", "", "", "", "", _esc(header.charset)]
    segments = [
        "|".join(msh),
        "|".join(["QPD", QUERY_NAMES[trigger], tag, _ENC.repetition.join(parameters)]),
        "RCP|I" + (f"|{quantity}^RD" if quantity is not None else ""),
    ]
    if continuation:
        segments.append(f"DSC|{_esc(continuation)}|I")
    return ("\r".join(segments) + "\r").encode(er7.charset_of(header.charset))


def _query_hl7apy(header: Header, control_id: str, trigger: str, query_tag: str,
                  parameters: list[str], quantity: int | None, continuation: str | None
                  ) -> bytes:
    m = _new("QBP_Q21", header, control_id, f"QBP^{trigger}^QBP_Q21")
    qpd = m.qpd
    _set(qpd, "QPD_1", QUERY_NAMES[trigger])
    tag = _esc(query_tag)
    if not tag or len(query_tag) > 32:
        raise ValueError("the query tag must be 1 to 32 characters (QPD-2 is ST 32)")
    _set(qpd, "QPD_2", tag)
    for p in parameters:
        _set(qpd, "QPD_3", p, repeat=True)
    _set(m.rcp, "RCP_1", "I")
    if quantity is not None:
        if quantity < 0:
            raise ValueError("the quantity limit cannot be negative")
        _set(m.rcp, "RCP_2", f"{quantity}^RD")
    if continuation:
        dsc = m.add_segment("DSC")
        _set(dsc, "DSC_1", _esc(continuation))
        _set(dsc, "DSC_2", "I")
    return _finish(m, header)


def _criteria(criteria: list[tuple[str, str]]) -> list[str]:
    if not criteria:
        raise ValueError("a query needs at least one criterion")
    out = []
    for name, value in criteria:
        if not _QPD_FIELD.match(name):
            raise ValueError(f"{name!r} is not a QPD-3 field name like PID.5.1")
        out.append(f"@{name}{_ENC.component}{_esc(value)}")
    return out


def qbp_q21(header: Header, control_id: str, *, identifier: str, identifier_type: str,
            authority: str | None = None, query_tag: str) -> bytes:
    """QBP^Q21 Get Person Demographics: QPD-3 is one CX, ``identifier^^^authority^type``."""
    if not identifier:
        raise ValueError("the identifier is empty")
    cx = _composite(identifier, None, None, authority, identifier_type)
    return _query(header, control_id, "Q21", query_tag, [cx], None, None)


def qbp_q22(header: Header, control_id: str, *, criteria: list[tuple[str, str]], quantity: int,
            query_tag: str, continuation: str | None = None) -> bytes:
    """QBP^Q22 Find Candidates: QPD-3 repeats ``@PID.5.1^SMITH*`` pairs (AND)."""
    return _query(header, control_id, "Q22", query_tag, _criteria(criteria), quantity,
                  continuation)


def qbp_zv1(header: Header, control_id: str, *, criteria: list[tuple[str, str]], quantity: int,
            query_tag: str, continuation: str | None = None) -> bytes:
    """QBP^ZV1 patient + visit query (NHS/IHE PDQV): PID and PV1 criteria in QPD-3.

    hl7apy has no QBP_ZV1 structure, and none is needed: the message is QBP_Q21-shaped, with
    MSH-9 ``QBP^ZV1^QBP_Q21`` (as IHE ITI-22 sends it).
    """
    return _query(header, control_id, "ZV1", query_tag, _criteria(criteria), quantity,
                  continuation)


# --- ADT --------------------------------------------------------------------------------------

# (segment, segment repetition) → field → field repetition → component → sub-component → value
_Tree = dict[tuple[str, int], dict[int, dict[int, dict[int, dict[int, str]]]]]


def _adt_tree(values: Mapping[str, Any]) -> _Tree:
    tree: _Tree = {}
    for key, value in values.items():
        if value is None or not str(value).strip():
            continue
        m = _ADT_PATH.match(key)
        if not m:
            raise ValueError(f"{key!r} is not an HL7 path like PID-5.1 or PID-3[0].5")
        seg = m.group("seg")
        if seg not in _ADT_SEGMENTS:
            raise ValueError(f"{key!r}: segment {seg} cannot be sent in ADT_A05")
        segrep = int(m.group("segrep") or 0)
        if segrep and seg not in _ADT_REPEATING:
            raise ValueError(f"{key!r}: segment {seg} does not repeat")
        numbers = [int(m.group(g) or d) for g, d in
                   (("field", 0), ("rep", 0), ("comp", 1), ("sub", 1))]
        field, rep, comp, sub = numbers
        if field < 1 or comp < 1 or sub < 1:
            raise ValueError(f"{key!r}: fields, components and sub-components count from 1")
        tree.setdefault((seg, segrep), {}).setdefault(field, {}).setdefault(rep, {}) \
            .setdefault(comp, {})[sub] = _esc(value)
    return tree


def _field_text(components: dict[int, dict[int, str]]) -> str:
    parts = []
    for c in range(1, max(components) + 1):
        subs = components.get(c, {})
        parts.append(_join((subs.get(s, "") for s in range(1, max(subs, default=0) + 1)),
                           _ENC.subcomponent))
    return _join(parts, _ENC.component)


AdtEvent = Literal["A01", "A28", "A31"]
# The message structure of each event (HL7 v2.4 chapter 3): A28/A31 share ADT_A05; A01 is
# ADT_A01, whose segments this writer fills come in the same order.
_STRUCTURE = {"A01": "ADT_A01", "A28": "ADT_A05", "A31": "ADT_A05"}


def adt(header: Header, control_id: str, *, event: AdtEvent,
        values: Mapping[str, Any]) -> bytes:
    """ADT^A28 (add person) or ADT^A31 (update person), structure ADT_A05 (v2.4 uses it for
    both), or ADT^A01 (admit/visit notification), structure ADT_A01.

    ``values`` are keyed by HL7 paths: ``SEG[segment repetition]-field[repetition].component
    .subcomponent``, brackets and parts after the field optional: ``PID-5.1``, ``PID-3[1].5``,
    ``PID-11[0].12.2``, ``NK1[1]-2.1``. Values are plain text (escaped here); ``None``, ``""``
    and blanks leave a value out; the text ``'""'`` is sent as the HL7 null (delete the value).

    Written directly as ER7: hl7apy takes ~30 ms for one A28 (every write's path). The
    structure is the one hl7apy builds — :func:`_adt_hl7apy` stays as the oracle the tests
    compare against — and field numbers are checked against hl7apy's segment definitions.
    """
    tree = _adt_prepared(header, event, values)
    _check_control_id(control_id)
    msh = [
        "MSH", _ENC.component + _ENC.repetition + _ENC.escape + _ENC.subcomponent,
        _composite(header.sending_application), _composite(header.sending_facility),
        _composite(header.receiving_application), _composite(header.receiving_facility),
        _now(), "", f"ADT^{event}^{_STRUCTURE[event]}", control_id,
        _composite(header.processing_id), _composite(header.version),
    ]
    if header.charset:
        msh += ["", "", "", "", "", _esc(header.charset)]
    lines = ["|".join(msh)]
    for seg in _ADT_SEGMENTS:
        reps = sorted(r for (s, r) in tree if s == seg)
        if not reps:
            continue
        limit = _max_field(seg, header.version)
        for segrep in range(reps[-1] + 1):
            fields = tree.get((seg, segrep), {})
            if fields and max(fields) > limit:
                raise ValueError(f"{seg}_{max(fields)} cannot be set in this message")
            out = [seg]
            for field in range(1, max(fields, default=0) + 1):
                repetitions = fields.get(field, {})
                out.append(_ENC.repetition.join(
                    _field_text(repetitions[r]) if r in repetitions else ""
                    for r in range(max(repetitions, default=-1) + 1)))
            lines.append(_ENC.field.join(out))
    return ("\r".join(lines) + "\r").encode(er7.charset_of(header.charset))


def _adt_prepared(header: Header, event: str, values: Mapping[str, Any]) -> _Tree:
    if event not in _STRUCTURE:
        raise ValueError("event must be A01, A28 or A31")
    tree = _adt_tree(values)
    tree.setdefault(("EVN", 0), {}).setdefault(2, {0: {1: {1: _now()}}})
    tree.setdefault(("PID", 0), {}).setdefault(1, {0: {1: {1: "1"}}})
    if ("PV1", 0) not in tree:
        tree[("PV1", 0)] = {1: {0: {1: {1: "1"}}}, 2: {0: {1: {1: "N"}}}}
    elif event == "A01":  # the visit is the message's subject: numbered as any PV1
        tree[("PV1", 0)].setdefault(1, {0: {1: {1: "1"}}})
    for (seg, segrep), fields in tree.items():
        if seg == "NK1":
            fields.setdefault(1, {0: {1: {1: str(segrep + 1)}}})
    for seg in _ADT_SEGMENTS:  # a repeating segment's gaps are empty segments
        reps = sorted(r for (s, r) in tree if s == seg)
        for segrep in range(reps[-1] + 1 if reps else 0):
            fields = tree.setdefault((seg, segrep), {})
            if seg == "NK1":
                fields.setdefault(1, {0: {1: {1: str(segrep + 1)}}})
    return tree


@functools.cache
def _max_field(segment: str, version: str) -> int:
    """The number of fields hl7apy defines for a segment in this version (checked once)."""
    try:
        m = _Hl7apyMessage("ADT_A05", version=version)
        seg = m.add_segment(segment)
    except HL7apyException as exc:
        raise ValueError(f"segment {segment} cannot be sent in ADT_A05") from exc
    count = 0
    for n in range(1, 200):
        try:
            getattr(seg, f"{segment.lower()}_{n}")
        except (HL7apyException, AttributeError):
            break
        count = n
    return count


def _adt_hl7apy(header: Header, control_id: str, *, event: AdtEvent,
                values: Mapping[str, Any]) -> bytes:
    """:func:`adt` built with hl7apy: the oracle for the direct ER7 writer."""
    tree = _adt_prepared(header, event, values)
    structure = _STRUCTURE[event]
    m = _new(structure, header, control_id, f"ADT^{event}^{structure}")
    for seg in _ADT_SEGMENTS:
        reps = sorted(r for (s, r) in tree if s == seg)
        if not reps:
            continue
        for segrep in range(reps[-1] + 1):
            fields = tree.setdefault((seg, segrep), {})
            try:
                segment = m.add_segment(seg)
            except HL7apyException as exc:
                raise ValueError(f"segment {seg} cannot be sent in ADT_A05") from exc
            for field in sorted(fields):
                repetitions = fields[field]
                for rep in range(max(repetitions) + 1):
                    text = _field_text(repetitions[rep]) if rep in repetitions else ""
                    _set(segment, f"{seg}_{field}", text, repeat=True)
    return _finish(m, header)


# --- acknowledgements -------------------------------------------------------------------------

AckCode = Literal["AA", "AE", "AR", "CA", "CE", "CR"]


def ack(header: Header, control_id_of_reply: str, *, acknowledges: str, code: AckCode,
        text: str | None = None, error: tuple[str, str] | None = None,
        event: str | None = None) -> bytes:
    """An ACK: MSA-1 ``code``, MSA-2 the acknowledged MSH-10, MSA-3 ``text``.

    ``error`` = (code, text) adds an ERR segment. In v2.4 ERR has one field, ERR-1 (ELD),
    and the error is its 4th component: ``ERR|^^^207&Application internal error&HL70357``
    (read it as ERR-1.4.1 and ERR-1.4.2). From v2.5 on, ERR-3 (``207^text^HL70357``), ERR-4
    (severity ``E``) and ERR-8 (the text) are filled as well. ``event`` gives MSH-9
    ``ACK^<event>^ACK`` (plain ``ACK`` without it).
    """
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise ValueError("unknown acknowledgement code")
    if not acknowledges:
        raise ValueError("the acknowledged control id is empty")
    message_type = f"ACK^{event}^ACK" if event else "ACK"
    m = _new("ACK", header, control_id_of_reply, message_type)
    _set(m.msa, "MSA_1", code)
    _set(m.msa, "MSA_2", _esc(acknowledges))
    if text:
        _set(m.msa, "MSA_3", _esc(text))
    if error is not None:
        err_code, err_text = error
        err = m.add_segment("ERR")
        _set(err, "ERR_1", _composite(None, None, None, (err_code, err_text, "HL70357")))
        if _version(header.version) >= (2, 5):
            _set(err, "ERR_3", _composite(err_code, err_text, "HL70357"))
            _set(err, "ERR_4", "E")
            _set(err, "ERR_8", _esc(err_text))
    return _finish(m, header)
