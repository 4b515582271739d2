"""ER7 as the simulator writes and reads it: values, segments, PID/PD1/PV1 from rows."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from adapters.hl7v2 import er7, messages
from gateway.demo_pas import schema
from gateway.demo_pas.hl7v2.profiles import Profile

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



_NAMED_FIELD = re.compile(r"^(PID|PD1|PV1|QPD|RCP|DSC|MSH)-(\d{1,3})\b")


class _Reject(Exception):
    """A request the PAS refuses: becomes MSA-1 AE/AR with an ERR (code from table 0357) at
    ``where`` (``PID-3``: the segment and field at fault; by default the one the text
    starts with, if it names one)."""

    def __init__(self, code: str, text: str, ack: Literal["AE", "AR"] = "AE",
                 where: str | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.ack: Literal["AE", "AR"] = ack
        named = _NAMED_FIELD.match(text)
        self.where = where or (f"{named.group(1)}-{named.group(2)}" if named else None)


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

    def __init__(self, sex_codes: Literal["hl7", "nhs"], profile: Profile) -> None:
        self.sex_codes = sex_codes
        self.profile = profile

    def nhs(self, number: str) -> str:
        return _f(number, None, None, "NHS", "NH" if self.profile.nhs_out == "cx4+cx5" else None)

    def pid(self, set_id: int, p: sa.Row[Any], rel: _Related) -> str:
        ids = [_f(p.PASID, None, None, TRUST_ODS, "PI")]
        if p.NHS_NUMBER:
            ids.append(self.nhs(p.NHS_NUMBER))
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
            29: _f(p.DTTM_OF_DEATH[:8] if self.profile.death == "date" and p.DTTM_OF_DEATH
                   else p.DTTM_OF_DEATH),
            30: "Y" if p.DTTM_OF_DEATH else None,
            32: (_f(f"NSTS{p.NNNTS_CODE}") if p.NNNTS_CODE and self.profile.pid32 else None),
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




@dataclass(frozen=True)
class _Request:
    msg: er7.Message
    control_id: str
    kind: str
    trigger: str
    header: messages.Header
    """The header for replies (sender and receiver swapped)."""
    raw_qpd: str | None


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


def _text(seg: er7.Segment | None, field: int, component: int = 1,
          subcomponent: int = 1, repetition: int = 0) -> str | None:
    if seg is None:
        return None
    v = seg.value(field, component, subcomponent, repetition)
    return v.strip() if v and v.strip() else None
