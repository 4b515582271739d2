"""Answering queries (QBP^Q21, Q22, ZV1) from the demo PAS tables, and the replies."""

from __future__ import annotations

# ruff: noqa: SIM300
import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Sequence
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import ColumnElement

from adapters.hl7v2 import er7, messages
from adapters.sql import fold as sql_fold
from adapters.text import fold
from gateway.demo_pas.hl7v2.profiles import Profile
from gateway.demo_pas.hl7v2.wire import (
    _CLASS_FROM_HL7,
    _DATE_PART,
    _ENC,
    _SEX_FROM_WIRE,
    TRUST_ODS,
    _dttm_now,
    _f,
    _load_related,
    _Reject,
    _Request,
    _seg,
    _Writer,
    addr,
    clin,
    loc,
    pat,
    pids,
    spell,
)

# --- the continuation pointer -----------------------------------------------------------------


def _query_hash(trigger: str, criteria: list[tuple[str, str]]) -> str:
    text = "\x1f".join([trigger, *(f"{k}\x1e{v}" for k, v in criteria)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pointer(qhash: str, key: Sequence[int]) -> str:
    raw = json.dumps([qhash, int(time.time()), *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_pointer(pointer: str, qhash: str, width: int, ttl: float | None = None
                  ) -> tuple[int, ...]:
    try:
        data = json.loads(base64.urlsafe_b64decode(pointer + "=" * (-len(pointer) % 4)))
    except (ValueError, binascii.Error):
        raise _Reject("102", "DSC-1 continuation pointer is not valid") from None
    if (not isinstance(data, list) or len(data) != width + 2 or data[0] != qhash
            or not all(isinstance(k, int) for k in data[1:])):
        raise _Reject("102", "DSC-1 continuation pointer does not belong to this query")
    if ttl is not None and time.time() - data[1] > ttl:
        raise _Reject("102", "DSC-1 continuation pointer has expired")
    return tuple(data[2:])


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


def _text_match(column: ColumnElement[Any], value: str, profile: Profile
                ) -> ColumnElement[bool]:
    wildcard = profile.wildcard
    prefix = profile.matching == "prefix" or bool(wildcard and value.endswith(wildcard))
    folded = fold(value.removesuffix(wildcard) if wildcard else value)
    if not folded:
        raise _Reject("101", "a search value is empty")
    target = sql_fold(column)
    if not prefix:
        return target == folded
    escaped = folded.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return target.like(escaped + "%", escape="\\")


def _postcode_match(column: ColumnElement[Any], value: str, profile: Profile
                    ) -> ColumnElement[bool]:
    wildcard = profile.wildcard
    prefix = profile.matching == "prefix" or bool(wildcard and value.endswith(wildcard))
    norm = "".join((value.removesuffix(wildcard) if wildcard else value).split()).upper()
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


def _patient_where(criteria: list[tuple[str, str]], profile: Profile
                   ) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [pat.c.ARCHV_FLAG != "Y"]
    if not profile.qualifiers and any(k in ("PID.3.4", "PID.3.5") for k, _ in criteria):
        raise _Reject("103", "QPD-3 identifier qualifiers are not supported")
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
            where.append(_text_match(pat.c.SURNAME, value, profile))
        elif name == "PID.5.2":
            where.append(sa.or_(_text_match(pat.c.FORENAME, value, profile),
                                _text_match(pat.c.SECOND_FORENAME, value, profile)))
        elif name == "PID.5.3":
            where.append(_text_match(pat.c.SECOND_FORENAME, value, profile))
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
                                           _postcode_match(addr.c.PCODE, value, profile)))
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


def _after(keys: list[ColumnElement[Any]], values: tuple[int, ...]) -> ColumnElement[bool]:
    """Keyset condition: (k1, k2, ...) > (v1, v2, ...), portable to every dialect."""
    if len(keys) == 1:
        return keys[0] > values[0]
    return sa.or_(keys[0] > values[0],
                  sa.and_(keys[0] == values[0], _after(keys[1:], values[1:])))


class Queries:
    """The query half of the simulator (a mixin: the listener holds the state)."""

    engine: Engine
    profile: Profile
    max_quantity: int
    _writer: _Writer

    # -- replies

    def _ack(self, request: _Request, code: Literal["AA", "AE", "AR"], err_code: str | None,
             text: str | None, extra: str = "", where: str | None = None) -> bytes:
        """An ACK, written directly as ER7 (as ``messages.ack`` builds it with hl7apy, which
        costs milliseconds a message: too slow for the write fault tests' thousand creates).
        The error is a v2.4 ERR-1 ELD: segment, sequence, field position (``where``, as
        ``PID-3``), then the code: ``ERR|PID^1^3^205&<text>&HL70357``."""
        event = request.trigger if re.fullmatch(r"[A-Z0-9]{3}", request.trigger) else None
        segments = [_seg("MSA", {1: code, 2: _f(request.control_id), 3: _f(text) if text
                                 else None})]
        if err_code:
            seg, _, position = (where or "").partition("-")
            segments.append(_seg("ERR", {1: _f(seg or None, "1" if seg else None,
                                               position or None,
                                               (err_code, text or "", "HL70357"))}))
        if extra:
            segments.append(extra)
        return self._rsp(request, segments, f"ACK^{event}^ACK" if event else "ACK")

    def _rsp(self, request: _Request, segments: list[str], structure: str | None = None
             ) -> bytes:
        structure = structure or {"Q21": "RSP^K21^RSP_K21", "Q22": "RSP^K22^RSP_K22",
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
            return self._ack(request, exc.ack, exc.code, exc.text, where=exc.where)
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
        profile = self.profile
        criteria = _criteria(qpd, _PID_FIELDS | _PV1_FIELDS if visits else _PID_FIELDS)
        quantity = self._quantity(msg.segment("RCP"))
        qhash = _query_hash(request.trigger, criteria)
        dsc = msg.segment("DSC")
        pointer = dsc.value(1) if dsc is not None else None
        where = _patient_where(criteria, profile)
        keys: list[ColumnElement[Any]] = [pat.c.PATNT_REFNO]
        if visits:
            where += _visit_where(criteria)
            if not profile.cancelled_visits:
                where.append(sa.or_(spell.c.SPELL_STATUS.is_(None), spell.c.SPELL_STATUS != "C"))
            keys.append(spell.c.PRVSP_REFNO)
            source: sa.FromClause = pat.join(spell, spell.c.PATNT_REFNO == pat.c.PATNT_REFNO)
        else:
            source = pat
        after = (_read_pointer(pointer, qhash, len(keys), profile.pointer_ttl)
                 if pointer else None)
        seek = where + ([_after(keys, after)] if after else [])
        by_patient = visits and profile.visits == "pid-then-visits"

        def counted(conditions: list[ColumnElement[bool]]) -> sa.Select[Any]:
            what = (sa.func.count(sa.distinct(pat.c.PATNT_REFNO)) if by_patient
                    else sa.func.count())
            return sa.select(what).select_from(source).where(*conditions)

        with self.engine.connect() as conn:
            total = conn.execute(counted(where)).scalar_one()
            ahead_rows = conn.execute(sa.select(sa.func.count()).select_from(source)
                                      .where(*seek)).scalar_one()
            ahead = total if after is None else conn.execute(counted(seek)).scalar_one()
            rows: list[sa.Row[Any]] = []
            if quantity:
                stmt = (self._visit_select() if visits else sa.select(pat)).where(*seek)
                rows = list(conn.execute(stmt.order_by(*keys).limit(quantity)))
            groups = self._groups(conn, rows, visits=visits)
        remaining = ahead_rows - len(rows)
        returned = len({r.PATNT_REFNO for r in rows}) if by_patient else len(rows)
        next_pointer = None
        if rows and remaining > 0:
            last = rows[-1]
            key = [last.PATNT_REFNO] + ([last.PRVSP_REFNO] if visits else [])
            next_pointer = _pointer(qhash, key)
        shown_total = ahead if after is not None and profile.qak4 == "remaining" else total
        return self._rsp_ok(request, groups, shown_total, returned, remaining, next_pointer)

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
        together = visits and self.profile.visits == "pid-then-visits"
        previous = None
        n = visit = 0
        for row in rows:
            if not (together and row.PATNT_REFNO == previous):
                n += 1
                visit = 0
                out.append(self._writer.pid(n, row, rel))
                pd1 = self._writer.pd1(row.PATNT_REFNO, rel)
                if pd1:
                    out.append(pd1)
            previous = row.PATNT_REFNO
            if visits:
                visit += 1
                out.append(self._writer.pv1(visit if together else n, row))
                out.append("PV2")
        return out
