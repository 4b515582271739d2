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

    async def everything(request: Request) -> Response:
        pid = request.path_params["id"]
        count = int(request.query_params.get("_count", "20"))
        if not pid.isdigit():
            return Response(status_code=404)
        resources = await run_in_threadpool(work, int(pid), count)
        if resources is None:
            return Response(status_code=404)
        base = str(request.base_url).rstrip("/") + "/STU3"
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        body = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": now},
                "type": "searchset",
                "link": [{"relation": "self", "url": f"{base}/Patient/{pid}/$everything?"
                          + str(request.query_params)}],
                "entry": [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                           "search": {"mode": "match"}} for r in resources]}
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
