"""Applying ADT^A28 / A31 / A01 to the demo PAS tables, inside one transaction."""

from __future__ import annotations

# ruff: noqa: SIM300
import datetime as dt
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from adapters.hl7v2 import er7
from gateway import nhs_number
from gateway.demo_pas.hl7v2.wire import (
    _ADDRESS_FROM_HL7,
    _CLASS_FROM_HL7,
    _DATE_PART,
    _PASID,
    _SEX_FROM_WIRE,
    TRUST_ODS,
    _dttm,
    _is_null,
    _modif,
    _now,
    _Reject,
    addr,
    clin,
    gpreg,
    loc,
    org,
    pat,
    spell,
)

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


def _identifiers(pid: er7.Segment, nhs_by: str = "cx4-or-cx5"
                 ) -> tuple[str | None, str | None]:
    """(PAS number, NHS number) from PID-3's repetitions (the NHS number by CX-5 NH only,
    when ``nhs_by`` is ``cx5``)."""
    pasid = nhs = None
    for r in range(pid.repetitions(3)):
        value = _text(pid, 3, 1, 1, r)
        id_type = _text(pid, 3, 5, 1, r)
        authority = _text(pid, 3, 4, 1, r)
        if not value:
            continue
        if id_type == "PI" or (id_type is None and authority == TRUST_ODS):
            pasid = pasid or value
        elif id_type == "NH" or (id_type is None and authority == "NHS"
                                 and nhs_by != "cx5"):
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
        raise _Reject("205", "the NHS number belongs to another patient", where="PID-3")


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
            enc: er7.Encoding, nhs_by: str = "cx4-or-cx5") -> int:
    now = _now()
    stamp = _dttm(now)
    values = _demographics(pid, enc, update=False)
    for column in ("SURNAME", "FORENAME"):
        if not values.get(column):
            part = "family" if column == "SURNAME" else "given"
            raise _Reject("101", f"PID-5 {part} name is required")
    pasid, nhs = _identifiers(pid, nhs_by)
    if pasid is not None:
        if not _PASID.match(pasid):
            raise _Reject("102", "PID-3 PAS number is not valid")
        if conn.execute(sa.select(pat.c.PATNT_REFNO).where(pat.c.PASID == pasid)).first():
            raise _Reject("205", "a patient with this PAS number already exists", where="PID-3")
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
            enc: er7.Encoding, nhs_by: str = "cx4-or-cx5") -> int:
    now = _now()
    stamp = _dttm(now)
    pasid, nhs = _identifiers(pid, nhs_by)
    if pasid is None:
        raise _Reject("204", "PID-3 carries no PAS number (type PI)")
    refno: int | None = conn.execute(sa.select(pat.c.PATNT_REFNO).where(
        pat.c.PASID == pasid, pat.c.ARCHV_FLAG != "Y")).scalar()
    if refno is None:
        raise _Reject("204", "no patient has this PAS number", where="PID-3")
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


_SPELL_NUMBER = re.compile(r"^[A-Z0-9]{1,12}$")


def _admit(conn: Connection, pid: er7.Segment, pv1: er7.Segment | None,
           nhs_by: str = "cx4-or-cx5") -> tuple[int, str]:
    """ADT^A01: a new inpatient spell (PROVIDER_SPELLS) for a known patient; (PATNT_REFNO,
    SPELL_NUMBER)."""
    if pv1 is None:
        raise _Reject("101", "PV1 segment missing")
    pasid, nhs = _identifiers(pid, nhs_by)
    if pasid is not None:
        where = pat.c.PASID == pasid
    elif nhs is not None:
        where = pat.c.NHS_NUMBER == nhs
    else:
        raise _Reject("204", "PID-3 carries no PAS number (type PI) or NHS number")
    refno: int | None = conn.execute(sa.select(pat.c.PATNT_REFNO).where(
        where, pat.c.ARCHV_FLAG != "Y")).scalar()
    if refno is None:
        raise _Reject("204", "no patient has this identifier", where="PID-3")
    admitted = _text(pv1, 44)
    if admitted is None:
        raise _Reject("101", "PV1-44 admit date/time is required")
    if not _DATE_PART.match(admitted[:12]) or len(admitted) < 8:
        raise _Reject("102", "PV1-44 admit date/time must be YYYYMMDD[HHMM]")
    patcl = None
    if (klass := _text(pv1, 2)) is not None:
        patcl = _CLASS_FROM_HL7.get(klass.upper())
        if patcl is None:
            raise _Reject("103", "PV1-2 patient class is not supported (I or D)")
    ward = _text(pv1, 3)
    loctn = None
    if ward is not None:
        loctn = conn.execute(sa.select(loc.c.LOCTN_REFNO).where(loc.c.LOCTN_CODE == ward)
                             ).scalar()
        if loctn is None:
            raise _Reject("204", "PV1-3 ward code is not known")
    proca = None
    if (gmc := _text(pv1, 7)) is not None:
        proca = conn.execute(sa.select(clin.c.PROCA_REFNO).where(clin.c.GMC_CODE == gmc)
                             ).scalar()
        if proca is None:
            raise _Reject("204", "PV1-7 consultant code is not known")
    number = _text(pv1, 19)
    if number is not None:
        if not _SPELL_NUMBER.match(number):
            raise _Reject("102", "PV1-19 visit number is not valid")
        if conn.execute(sa.select(spell.c.PRVSP_REFNO).where(spell.c.SPELL_NUMBER == number)
                        ).first():
            raise _Reject("205", "a spell with this visit number already exists",
                          where="PV1-19")
    key = _next_key(conn, spell.c.PRVSP_REFNO)
    if number is None:
        last = conn.execute(sa.select(sa.func.max(spell.c.SPELL_NUMBER)).where(
            spell.c.SPELL_NUMBER.like("IP________"))).scalar()
        n = int(last[2:]) + 1 if last and last[2:].isdigit() else 1
        number = f"IP{n:08d}"
    values: dict[str, Any] = {
        "PRVSP_REFNO": key, "PATNT_REFNO": refno, "SPELL_NUMBER": number,
        "ADMIT_DTTM": admitted[:12].ljust(12, "0"), "DISCH_DTTM": None, "SPELL_STATUS": "A",
        "PATCL_CODE": patcl, "ADMET_CODE": _text(pv1, 4), "ADSOR_CODE": _text(pv1, 14),
        "DISMT_CODE": None, "DISDE_CODE": None, "PROCA_REFNO": proca, "LOCTN_REFNO": loctn,
        "MAIN_SPECT_CODE": _text(pv1, 10), "MODIF_DTTM": _modif(_now())}
    for column in ("ADMET_CODE", "ADSOR_CODE", "MAIN_SPECT_CODE"):
        _check_length(spell.c[column], values[column], column.lower().replace("_", " "))
    conn.execute(spell.insert(), [values])
    return refno, number
