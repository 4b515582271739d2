"""BASELINE for bench/everything_bench.py: ``Patient/{id}/$everything`` written by hand.

Serves ``GET /STU3/Patient/{id}/$everything?_type=Patient,Encounter&_count=N`` — the patient
and its Encounters from the three demo sources (A&E, outpatient, inpatient spells), in the
gateway's order (source by source, key order), one page — with plain sqlite3 and
hand-written resource builders (no mapping engine), JSON by orjson. It runs the statements
the gateway runs for that request: the patient (one SELECT, then one per child table, from
bench/baseline_app.py) and one SELECT per Encounter source, ``LIMIT N+1``.

    python bench/everything_baseline.py --db bench/.data/demo-pas-10000.sqlite --port 8093
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_app import (
    IDX,
    MEDIA,
    CodeMap,
    Db,
    dttm12,
    dttm_iso,
    patient,
    text,
)

ENC = "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Encounter-1"
EXT = "https://fhir.hl7.org.uk/STU3/StructureDefinition/"
CON = [{"coding": [{"system": "http://hl7.org/fhir/v3/ParticipationType", "code": "CON",
                    "display": "consultant"}]}]
ATND = [{"coding": [{"system": "http://hl7.org/fhir/v3/ParticipationType", "code": "ATND",
                     "display": "attender"}]}]
STATUS_IP, CLASS_IP = CodeMap("encounter-status"), CodeMap("encounter-class-inpatient")
STATUS_OP, CLASS_OP = CodeMap("encounter-status-outpatient"), CodeMap("encounter-class-outpatient")
STATUS_AE, CLASS_AE = CodeMap("encounter-status-ae"), CodeMap("encounter-class-ae")
SPECIALTY, OUTCOME = CodeMap("specialty"), CodeMap("outcome-of-attendance")
ADMET, DISMT = CodeMap("admission-method"), CodeMap("discharge-method")
ADSOR, DISDE = CodeMap("source-of-admission"), CodeMap("discharge-destination")

SQL_AE = ('SELECT e."AEATT_REFNO", e."AE_NUMBER", e."AE_STATUS", e."ATTCAT_CODE", '
          'e."PATNT_REFNO", e."PROCA_REFNO", e."ARRIVAL_DTTM", e."DEPART_DTTM", '
          'e."LOCTN_REFNO", e."MODIF_DTTM" FROM "AE_ATTENDANCES" AS e '
          'WHERE e."DEL_FLAG" = ? AND e."PATNT_REFNO" = ? ORDER BY e."AEATT_REFNO" ASC LIMIT ?')
SQL_OP = ('SELECT o."OPATT_REFNO", o."ATTENDANCE_ID", o."ATTND_CODE", o."OUTCM_CODE", '
          'o."MAIN_SPECT_CODE", o."PATNT_REFNO", o."PROCA_REFNO", o."APPT_DTTM", '
          'o."LOCTN_REFNO", o."MODIF_DTTM" FROM "OUTPATIENT_ATTENDANCES" AS o '
          'WHERE o."PATNT_REFNO" = ? ORDER BY o."OPATT_REFNO" ASC LIMIT ?')
SQL_IP = ('SELECT s."PRVSP_REFNO", s."SPELL_NUMBER", s."SPELL_STATUS", s."PATCL_CODE", '
          's."MAIN_SPECT_CODE", s."PATNT_REFNO", s."PROCA_REFNO", s."ADMIT_DTTM", '
          's."DISCH_DTTM", s."ADMET_CODE", s."DISMT_CODE", s."ADSOR_CODE", s."DISDE_CODE", '
          's."LOCTN_REFNO", s."MODIF_DTTM" FROM "PROVIDER_SPELLS" AS s '
          'WHERE s."PATNT_REFNO" = ? ORDER BY s."PRVSP_REFNO" ASC LIMIT ?')


def _meta(modif: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"profile": [ENC]}
    lu = dttm_iso(modif)
    if lu is not None:
        meta["lastUpdated"] = lu
    return meta


def _ref(kind: str, v: Any) -> dict[str, Any] | None:
    s = text(v)
    return None if s is None else {"reference": f"{kind}/{s}"}


def _minutes(start: str | None, end: str | None) -> int | None:
    if not start or not end:
        return None
    m = int((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start))
            .total_seconds() // 60)
    return m if m >= 0 else None


def _coding(cm: CodeMap, v: Any) -> dict[str, Any] | None:
    t = cm.target(v)
    if t is None:
        return None
    out = {"system": cm.system, "code": t[0]}
    if t[1]:
        out["display"] = t[1]
    return out


def _common(out: dict[str, Any], patnt: Any, proca: Any, kind: list[Any], start: str | None,
            end: str | None, loctn: Any) -> None:
    subject = _ref("Patient", patnt)
    if subject:
        out["subject"] = subject
    who = _ref("Practitioner", proca)
    if who:
        out["participant"] = [{"type": kind, "individual": who}]
    per = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    if per:
        out["period"] = per


def _tail(out: dict[str, Any], loctn: Any) -> None:
    loc = _ref("Location", loctn)
    if loc:
        out["location"] = [{"location": loc}]
    out["serviceProvider"] = {"reference": "Organization/1"}


def ae(r: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Encounter", "id": f"ae-{r[0]}", "meta": _meta(r[9])}
    if text(r[1]):
        out["identifier"] = [{"system": "https://fhir.demo-trust.nhs.uk/Id/ae-attendance-number",
                              "value": text(r[1])}]
    out["status"] = STATUS_AE.code(r[2])
    out["class"] = _coding(CLASS_AE, r[3])
    start, end = dttm12(r[6]), dttm12(r[7])
    _common(out, r[4], r[5], ATND, start, end, r[8])
    minutes = _minutes(start, end)
    if minutes is not None:
        out["length"] = {"value": minutes, "unit": "min", "system": "http://unitsofmeasure.org",
                         "code": "min"}
    _tail(out, r[8])
    return out


def op(r: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Encounter", "id": f"op-{r[0]}", "meta": _meta(r[9])}
    outcome = OUTCOME.concept(r[3])
    if outcome:
        out["extension"] = [{"url": EXT + "Extension-CareConnect-OutcomeOfAttendance-1",
                             "valueCodeableConcept": outcome}]
    if text(r[1]):
        out["identifier"] = [{"system": "https://fhir.demo-trust.nhs.uk/Id/attendance-number",
                              "value": text(r[1])}]
    out["status"] = STATUS_OP.code(r[2])
    out["class"] = _coding(CLASS_OP, r[2])
    spec = SPECIALTY.concept(r[4])
    if spec:
        out["type"] = [spec]
    _common(out, r[5], r[6], CON, dttm12(r[7]), None, r[8])
    _tail(out, r[8])
    return out


def ip(r: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Encounter", "id": str(r[0]), "meta": _meta(r[14])}
    if text(r[1]):
        out["identifier"] = [{"system": "https://fhir.demo-trust.nhs.uk/Id/spell-number",
                              "value": text(r[1])}]
    out["status"] = STATUS_IP.code(r[2])
    cls = _coding(CLASS_IP, r[3])
    if cls:
        out["class"] = cls
    spec = SPECIALTY.concept(r[4])
    if spec:
        out["type"] = [spec]
    start, end = dttm12(r[7]), dttm12(r[8])
    _common(out, r[5], r[6], CON, start, end, r[13])
    minutes = _minutes(start, end)
    if minutes is not None:
        out["length"] = {"value": minutes, "unit": "min", "system": "http://unitsofmeasure.org",
                         "code": "min"}
    hosp: dict[str, Any] = {}
    ext = []
    for cm, name, v in ((ADMET, "AdmissionMethod", r[9]), (DISMT, "DischargeMethod", r[10])):
        cc = cm.concept(v)
        if cc:
            ext.append({"url": f"{EXT}Extension-CareConnect-{name}-1",
                        "valueCodeableConcept": cc})
    if ext:
        hosp["extension"] = ext
    for key, cm, v in (("admitSource", ADSOR, r[11]), ("dischargeDisposition", DISDE, r[12])):
        cc = cm.concept(v)
        if cc:
            hosp[key] = cc
    if hosp:
        out["hospitalization"] = hosp
    _tail(out, r[13])
    return out


# --- the whole record (no ``_type``) -----------------------------------------------------------
#
# Every type of the patient's compartment, in the gateway's order (type, then source, then key),
# then the Practitioners/Organizations/Locations/Medications they refer to. Patient and
# Encounter resources are built by the hand-written code above. For the other types (nine
# clinical types and the four referenced ones) this baseline does NOT hand-write the field
# mapping: it calls the mapping's generated row function (gateway/mapping/codegen.py, one
# Python function per mapping, what a hand-written builder would be) on the plain sqlite3 row.
# The SQL text of each statement is taken once, at start-up, from the gateway's SQL compiler
# (the same statements, by construction); per request everything else is written here: plain
# sqlite3 on one connection, the envelope (id, meta), the references (from each type's known
# reference paths), the Bundle, orjson. No middleware, auth, audit, planning or compartment
# checks.

SECTION_TYPES = ("AllergyIntolerance", "Condition", "Encounter", "Flag", "Immunization",
                 "MedicationRequest", "MedicationStatement", "Observation", "Procedure")
REFERENCED = ("Practitioner", "Organization", "Location", "Medication")
_SENTINEL = 987_654_321


class _Stmt:
    """One statement: its SQL text and how a request's values are laid out."""

    def __init__(self, stmt: Any, dialect: Any) -> None:
        from adapters.sql import _Direct

        direct = _Direct.compile(stmt, dialect)
        assert direct is not None and direct.order is not None
        self.sql = direct.sql
        self.order = direct.order
        self.fixed = direct.fixed

    def args(self, values: dict[str, Any]) -> list[Any]:
        return [values[n] if n in values else self.fixed[n] for n in self.order]


class _Type:
    def __init__(self, provider: Any, dialect: Any) -> None:
        from adapters.base import Compare, Query, SortKey
        from adapters.sql import _child_statement, _page_statement

        m = provider.mapping
        self.rtype, self.prefix, self.profile = provider.resource_type, provider.id_prefix, \
            provider.profile
        self.build_row, self.build_id, self.build_lu = m.build, m.build_id, m.build_last_updated
        self.p = p = m.prepared
        self.dialect = dialect
        self.key = provider.key
        self.key_storage = m.storage(provider.key)
        self.nfields = len(p.layout.fields)
        self.sort = (SortKey(provider.key),)
        self.refs = [(tuple(part.split("[", 1)[0] for part in path.split(".")), target)
                     for path, target, _child in m.references if target in REFERENCED]
        if self.rtype == "Encounter":  # a literal reference in the mapping (Organization/1)
            self.refs.append((("serviceProvider", "reference"), "Organization"))
        self.section: _Stmt | None = None
        pref = next((prm.reference_targets()["Patient"] for prm in provider.params.values()
                     if prm.type == "reference" and "Patient" in prm.reference_targets()), None)
        if pref is not None:
            stmt, params, _ = _page_statement(p, Query(Compare(pref, "=", _SENTINEL),
                                                       self.sort, 1), dialect.name)
            assert params == {"v0": _SENTINEL, "v1": 2}, params
            self.section = _Stmt(stmt, dialect)
        self.children = []
        for name, fields in p.layout.children:
            spec = p.source.children[name]
            (child_col, parent_col), = spec.link.items()
            self.children.append((name, spec, fields, child_col,
                                  p.positions[parent_col]))
        self._child_stmts: dict[tuple[str, int], _Stmt] = {}
        self._by_key: dict[int, _Stmt] = {}
        self._child_statement = _child_statement

    def child_stmt(self, i: int, size: int) -> _Stmt:
        name, spec, fields, child_col, _at = self.children[i]
        found = self._child_stmts.get((name, size))
        if found is None:
            found = self._child_stmts[(name, size)] = _Stmt(
                self._child_statement(self.p, name, spec, fields, child_col, size), self.dialect)
        return found

    def by_key_stmt(self, size: int) -> _Stmt:
        from adapters.base import In, Query
        from adapters.sql import _page_statement

        found = self._by_key.get(size)
        if found is None:
            stmt, _params, _ = _page_statement(
                self.p, Query(In(self.key, tuple(range(size))), self.sort, size),
                self.dialect.name)
            found = self._by_key[size] = _Stmt(stmt, self.dialect)
        return found

    def with_children(self, c: sqlite3.Connection, rows: list[tuple[Any, ...]]
                      ) -> list[tuple[Any, ...]]:
        from adapters.sql import _BUCKET_OF

        if not self.children or not rows:
            return rows
        extra = []
        for i, (_name, _spec, _fields, _col, at) in enumerate(self.children):
            parents = list({r[at] for r in rows} - {None})
            by_parent: dict[Any, list[Any]] = {}
            size = _BUCKET_OF[len(parents)]
            padded = parents + [parents[-1]] * (size - len(parents))
            st = self.child_stmt(i, size)
            for row in c.execute(st.sql, st.args({f"k{j}": v for j, v in enumerate(padded)})):
                by_parent.setdefault(row[-1], []).append(row)
            extra.append([tuple(by_parent.get(r[at], ())) for r in rows])
        return [r + tuple(x) for r, *x in zip(rows, *extra, strict=True)] if extra else rows

    def resource(self, rec: tuple[Any, ...]) -> dict[str, Any]:
        meta: dict[str, Any] = {"profile": [self.profile]}
        if self.build_lu is not None:
            lu = self.build_lu(rec)
            if lu is not None:
                meta["lastUpdated"] = lu
        out = {"resourceType": self.rtype, "id": self.prefix + str(self.build_id(rec)),
               "meta": meta}
        out.update(self.build_row(rec))
        return out

    def references(self, res: dict[str, Any], into: dict[str, dict[str, None]]) -> None:
        for path, target in self.refs:
            nodes: list[Any] = [res]
            for part in path:
                nxt: list[Any] = []
                for n in nodes:
                    v = n.get(part) if isinstance(n, dict) else None
                    if isinstance(v, list):
                        nxt += v
                    elif v is not None:
                        nxt.append(v)
                nodes = nxt
            for v in nodes:
                if isinstance(v, str):
                    t, _, rid = v.partition("/")
                    if t == target and rid:
                        into.setdefault(t, {})[rid] = None


class Record:
    """The mappings loaded once (for their SQL text and row functions, see above)."""

    def __init__(self, db_path: str) -> None:
        import os

        os.environ.setdefault("CCG_PAS_URL", f"sqlite:///{Path(db_path).resolve()}")
        from adapters import registry as adapter_registry
        from gateway.mapping.loader import load_directory
        from gateway.providers import Provider
        from gateway.settings import Settings

        settings = Settings.from_env()
        loaded = load_directory(settings.mappings_dir, adapter_registry.create)
        providers = [Provider(m) for m in loaded.mappings]
        dialect = providers[0].mapping.adapter.engine.dialect
        self.sections: list[tuple[_Type, Any]] = []  # (type, hand-written (sql, values, builder))
        for rtype in SECTION_TYPES:
            for pr in providers:  # the gateway's source order: the mapping files' order
                if pr.resource_type != rtype:
                    continue
                t = _Type(pr, dialect)
                assert t.section is not None
                hand = None
                if rtype == "Encounter":  # hand-written SQL and builders (above)
                    hand = {"ae-": (SQL_AE, ("N",), ae), "op-": (SQL_OP, (), op),
                            "": (SQL_IP, (), ip)}[pr.id_prefix]
                self.sections.append((t, hand))
        self.referenced = {pr.resource_type: _Type(pr, dialect) for pr in providers
                           if pr.resource_type in REFERENCED}
        # the Patient's own references (GP practice, GP): its reference paths only
        self.patient = _Type(next(pr for pr in providers if pr.resource_type == "Patient"),
                             dialect)
        self.engines = [pr.mapping.adapter for pr in providers]

    async def aclose(self) -> None:
        for a in self.engines:
            await a.aclose()


def full_work(db: Db, rec: Record, pid: int, count: int
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool] | None:
    """(matches, included, more) of page 1 of the whole record, or None (no patient)."""
    rows, _more, children = db.patients('p."PATNT_REFNO" IN (?)', [pid], 1)
    if not rows:
        return None
    key = rows[0][IDX["PATNT_REFNO"]]
    out = [patient(rows[0], *children[key])]
    c = db.conn()
    room, more = count, False
    wanted: dict[str, dict[str, None]] = {}
    rec.patient.references(out[0], wanted)
    for t, hand in rec.sections:
        if room <= 0:
            more = True  # the gateway links on to the next section (it may be empty)
            break
        if hand is not None:
            sql, fixed, make = hand
            found = c.execute(sql, [*fixed, pid, room + 1]).fetchall()
        else:
            st = t.section
            assert st is not None
            found = c.execute(st.sql, st.args({"v0": pid, "v1": room + 1})).fetchall()
        if len(found) > room:
            more = True
        found = t.with_children(c, found[:room])
        for r in found:
            res = make(r) if hand is not None else t.resource(r)
            t.references(res, wanted)
            out.append(res)
        room -= len(found)
        if more:
            break
    included: list[dict[str, Any]] = []
    for rtype in REFERENCED:
        ids = wanted.get(rtype)
        if not ids:
            continue
        t = rec.referenced[rtype]
        keys = []
        for i in ids:
            if t.prefix and not i.startswith(t.prefix):
                continue
            try:
                keys.append(t.key_storage.parse_key(i[len(t.prefix):]))
            except ValueError:
                continue
        if not keys:
            continue
        st = t.by_key_stmt(len(keys))  # `key IN (...)` of exactly these, as read_many asks
        values = {f"v{j}": k for j, k in enumerate(keys)}
        values[f"v{len(keys)}"] = len(keys) + 1
        for r in c.execute(st.sql, st.args(values)).fetchall()[:len(keys)]:
            included.append(t.resource(r))
    return out, included, more


def build(db_path: str) -> Starlette:
    db = Db(db_path)

    def work(pid: int, count: int) -> list[dict[str, Any]] | None:
        rows, _more, children = db.patients('p."PATNT_REFNO" IN (?)', [pid], 1)
        if not rows:
            return None
        key = rows[0][IDX["PATNT_REFNO"]]
        out = [patient(rows[0], *children[key])]
        c = db.conn()
        room = count
        for sql, params, make in ((SQL_AE, ["N", pid], ae), (SQL_OP, [pid], op),
                                  (SQL_IP, [pid], ip)):
            if room <= 0:
                break
            found = c.execute(sql, [*params, room + 1]).fetchall()[:room]
            out += [make(r) for r in found]
            room -= len(found)
        return out

    rec = Record(db_path)

    async def everything(request: Request) -> Response:
        pid = request.path_params["id"]
        count = int(request.query_params.get("_count", "20"))
        if not pid.isdigit():
            return Response(status_code=404)
        included: list[dict[str, Any]] = []
        more = False
        if "_type" in request.query_params:  # Patient,Encounter only (the older comparison)
            resources = await run_in_threadpool(work, int(pid), count)
        else:
            found = await run_in_threadpool(full_work, db, rec, int(pid), count)
            resources = None if found is None else found[0]
            if found is not None:
                _, included, more = found
        if resources is None:
            return Response(status_code=404)
        base = str(request.base_url).rstrip("/") + "/STU3"
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self_url = f"{base}/Patient/{pid}/$everything?" + str(request.query_params)
        links = [{"relation": "self", "url": self_url}]
        if more:  # a signed position, as the gateway's link carries one
            token = hmac.new(b"baseline", f"{pid}|{len(resources)}".encode(),
                             hashlib.sha256).hexdigest()
            links.append({"relation": "next", "url": f"{self_url}&_page={token}"})
        entries = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                    "search": {"mode": "match"}} for r in resources]
        entries += [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                     "search": {"mode": "include"}} for r in included]
        body = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": now},
                "type": "searchset", "link": links, "entry": entries}
        return Response(orjson.dumps(body), media_type=MEDIA)

    async def health(request: Request) -> Response:
        return Response(b'{"status":"pass"}', media_type="application/json")

    return Starlette(routes=[Route("/STU3/Patient/{id}/$everything", everything),
                             Route("/_health", health)])


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--port", type=int, default=8093)
    args = ap.parse_args()
    uvicorn.run(build(args.db), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
