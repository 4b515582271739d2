"""BASELINE for bench/everything_bench.py: ``Patient/{id}/$everything`` written by hand.

Serves ``GET /STU3/Patient/{id}/$everything?_count=N`` — the patient, every resource of its
record in the gateway's order (type, then source, then key), one page of at most N matches,
then the Practitioners, Organizations, Locations and Medications they refer to — with plain
sqlite3, hand-written SQL and hand-written resource builders, JSON by orjson. It shares no
code with the gateway: each builder below was written by reading the mapping file of its type
(mappings/demo-pas/*.sql.yaml); the code maps are read from the same data files
(mappings/codemaps/*.yaml, by bench/baseline_app.py's CodeMap); the Patient builder, the value
conversions and the connection settings are bench/baseline_app.py's (hand-written too).

Per request, on one connection in one worker-thread call: the patient (one SELECT, then one
per child table), one SELECT per section (a source of a type) while the page has room (``LIMIT
room+1``; AllergyIntolerance's reactions in one more ``IN (...)`` query), then one ``IN (...)``
SELECT per referenced type. The ids referred to are collected while building (each builder
knows where it writes a reference). No middleware, auth, audit, planning or compartment checks.

    python bench/everything_baseline.py --db bench/.data/demo-pas-10000.sqlite --port 8093
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import re
import sys
import uuid
from collections.abc import Callable
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
    date8,
    dttm12,
    dttm_iso,
    patient,
    text,
    title,
)

SD = "https://fhir.hl7.org.uk/STU3/StructureDefinition/"
TRUST = "https://fhir.demo-trust.nhs.uk/"
SNOMED = "http://snomed.info/sct"
UCUM_SYSTEM = "http://unitsofmeasure.org"

Refs = dict[str, set[Any]]
"""Referenced type → the keys the page's resources refer to."""

# --- small hand-written helpers ------------------------------------------------------------------

_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")


def decimal(v: Any) -> int | float | None:
    s = text(v)
    if s is None or not _DECIMAL.fullmatch(s):
        return None  # "<0.1", "POSITIVE": no number
    return float(s) if "." in s else int(s)


def yes_no(v: Any) -> bool | None:
    s = text(v)
    if s is None:
        return None
    s = s.upper()
    if s in ("Y", "YES", "1", "T", "TRUE"):
        return True
    if s in ("N", "NO", "0", "F", "FALSE"):
        return False
    return None


def code(cm: CodeMap, v: Any) -> str | None:
    t = cm.target(v)
    return None if t is None else t[0]


def coding(cm: CodeMap, v: Any) -> dict[str, Any] | None:
    t = cm.target(v)
    if t is None:
        return None
    out = {"system": cm.system, "code": t[0]}
    if t[1]:
        out["display"] = t[1]
    return out


def sha1_base64(v: Any) -> str | None:
    s = text(v)
    if s is None or len(s) != 40:
        return None
    try:
        return base64.b64encode(binascii.unhexlify(s)).decode("ascii")
    except (binascii.Error, ValueError):
        return None


def ref(kind: str, v: Any) -> dict[str, str] | None:
    return None if v is None else {"reference": f"{kind}/{v}"}


def encounter(prvsp: Any, opatt: Any) -> dict[str, str] | None:
    """The spell, else the outpatient attendance (whose Encounter ids are prefixed op-)."""
    if prvsp is not None:
        return ref("Encounter", prvsp)
    return None if opatt is None else ref("Encounter", f"op-{opatt}")


def put(out: dict[str, Any], key: str, v: Any) -> None:
    if v is not None and v != [] and v != {}:
        out[key] = v


def some(*items: Any) -> list[Any]:
    return [x for x in items if x is not None]


def period(start: str | None, end: str | None) -> dict[str, str] | None:
    out = {}
    if start is not None:
        out["start"] = start
    if end is not None:
        out["end"] = end
    return out or None


def envelope(rtype: str, profile: str, rid: str, modif: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"profile": [profile]}
    lu = dttm_iso(modif)
    if lu is not None:
        meta["lastUpdated"] = lu
    return {"resourceType": rtype, "id": rid, "meta": meta}


def note_ref(refs: Refs, kind: str, v: Any) -> None:
    if v is not None:
        refs[kind].add(v)


UCUM = CodeMap("ucum-unit")


def quantity(value: Any, unit: Any, comparator: Any = None) -> dict[str, Any] | None:
    v = decimal(value)
    if v is None:  # the mapping requires a value
        return None
    q: dict[str, Any] = {"value": v}
    put(q, "comparator", text(comparator))
    u = text(unit)
    if u is not None:
        q["unit"] = u
        t = UCUM.target(u)
        if t is not None:
            q["system"] = UCUM.system
            q["code"] = t[0]
    return q


# --- AllergyIntolerance (mappings/demo-pas/AllergyIntolerance.sql.yaml) ------------------------

ALLERGY_PROFILE = SD + "CareConnect-AllergyIntolerance-1"
AL_CLINICAL, AL_VERIF = CodeMap("allergy-clinical-status"), CodeMap("allergy-verification-status")
AL_TYPE, AL_CATEGORY = CodeMap("allergy-type"), CodeMap("allergy-category")
AL_CRIT, AL_SUBST = CodeMap("allergy-criticality"), CodeMap("allergy-substance")
AL_MANIF, AL_SEVERITY = CodeMap("allergy-manifestation"), CodeMap("reaction-severity")

SQL_ALLERGIES = (
    'SELECT "ALLGY_REFNO", "PATNT_REFNO", "ALLTY_CODE", "ALCAT_CODE", "SUBST_CODE", "SUBST_DESC", '
    '"CRITY_CODE", "VERIF_CODE", "ALLGY_STATUS", "ONSET_DATE", "RECORDED_DTTM", "END_DATE", '
    '"END_REASON", "PROCA_REFNO", "NOTE_TEXT", "MODIF_DTTM" FROM "ALLERGIES" '
    'WHERE "DELETED_FLAG" = \'N\' AND "PATNT_REFNO" = ? ORDER BY "ALLGY_REFNO" LIMIT ?')


def sql_reactions(n: int) -> str:
    return ('SELECT "ALLGY_REFNO", "MANIF_CODE", "MANIF_DESC", "ONSET_DATE", "SEVRT_CODE" '
            'FROM "ALLERGY_REACTIONS" WHERE "ALLGY_REFNO" IN (' + ", ".join("?" * n) + ') '
            'AND "DELETED_FLAG" = \'N\' ORDER BY "ALLGY_REFNO", "ALREA_REFNO"')


def allergy(r: tuple[Any, ...], reactions: list[tuple[Any, ...]], refs: Refs) -> dict[str, Any]:
    (refno, patnt, allty, alcat, subst, subst_desc, crity, verif, status, onset, recorded,
     end, end_reason, proca, note, modif) = r
    out = envelope("AllergyIntolerance", ALLERGY_PROFILE, str(refno), modif)
    ended = some(*(({"url": k, kind: v} if v is not None else None) for k, kind, v in (
        ("endDate", "valueDateTime", date8(end)),
        ("reasonEnded", "valueString", text(end_reason)))))
    if ended:
        out["extension"] = [{"url": SD + "Extension-CareConnect-AllergyIntoleranceEnd-1",
                             "extension": ended}]
    out["identifier"] = [{"system": TRUST + "Id/allergy-id", "value": str(refno)}]
    put(out, "clinicalStatus", code(AL_CLINICAL, status))
    put(out, "verificationStatus", code(AL_VERIF, verif))
    put(out, "type", code(AL_TYPE, allty))
    put(out, "category", some(code(AL_CATEGORY, alcat)))
    put(out, "criticality", code(AL_CRIT, crity))
    cc: dict[str, Any] = {}
    put(cc, "coding", some(coding(AL_SUBST, subst)))
    put(cc, "text", text(subst_desc))
    put(out, "code", cc)
    put(out, "patient", ref("Patient", patnt))
    put(out, "onsetDateTime", date8(onset))
    put(out, "assertedDate", dttm12(recorded))
    put(out, "recorder", ref("Practitioner", proca))
    note_ref(refs, "Practitioner", proca)
    note_text = text(note)
    if note_text is not None:
        out["note"] = [{"text": note_text}]
    reaction = []
    for _parent, manif, manif_desc, r_onset, severity in reactions:
        item: dict[str, Any] = {}
        m: dict[str, Any] = {}
        put(m, "coding", some(coding(AL_MANIF, manif)))
        put(m, "text", text(manif_desc))
        if m:
            item["manifestation"] = [m]
        put(item, "onset", date8(r_onset))
        put(item, "severity", code(AL_SEVERITY, severity))
        if item:
            reaction.append(item)
    put(out, "reaction", reaction)
    return out


# --- Condition (Condition.sql.yaml) --------------------------------------------------------------

CONDITION_PROFILE = SD + "CareConnect-Condition-1"
CO_EPISODE, CO_CLINICAL = CodeMap("condition-episodicity"), CodeMap("condition-clinical-status")
CO_CATEGORY = CodeMap("condition-category")
READ_SNOMED, CTV3_SNOMED = CodeMap("readv2-snomed"), CodeMap("ctv3-snomed")

SQL_PROBLEMS = (
    'SELECT "PROBL_REFNO", "PATNT_REFNO", "PRVSP_REFNO", "PROBL_TYPE", "READ_CODE", "CTV3_CODE", '
    '"PROBL_DESC", "PROBL_STATUS", "EPISD_CODE", "ONSET_DATE", "RESOLVED_DATE", "RECORDED_DTTM", '
    '"PROCA_REFNO", "MODIF_DTTM" FROM "PROBLEMS" '
    'WHERE "DELETED_FLAG" = \'N\' AND "PATNT_REFNO" = ? ORDER BY "PROBL_REFNO" LIMIT ?')


def condition(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    (refno, patnt, prvsp, typ, read, ctv3, desc, status, episd, onset, resolved, recorded,
     proca, modif) = r
    out = envelope("Condition", CONDITION_PROFILE, str(refno), modif)
    episode = code(CO_EPISODE, episd)
    if episode is not None:
        out["extension"] = [{"url": SD + "Extension-CareConnect-ConditionEpisode-1",
                             "valueCode": episode}]
    out["identifier"] = [{"system": TRUST + "Id/problem-id", "value": str(refno)}]
    put(out, "clinicalStatus", code(CO_CLINICAL, status))
    put(out, "category", some(CO_CATEGORY.concept(typ)))
    read, ctv3 = text(read), text(ctv3)
    cc: dict[str, Any] = {}
    put(cc, "coding", some(
        {"system": "http://read.info/readv2", "code": read} if read is not None else None,
        {"system": "http://read.info/ctv3", "code": ctv3} if ctv3 is not None else None,
        coding(READ_SNOMED, read), coding(CTV3_SNOMED, ctv3)))
    put(cc, "text", text(desc))
    put(out, "code", cc)
    put(out, "subject", ref("Patient", patnt))
    put(out, "context", ref("Encounter", prvsp))
    put(out, "onsetDateTime", date8(onset))
    put(out, "abatementDateTime", date8(resolved))
    put(out, "assertedDate", dttm12(recorded))
    put(out, "asserter", ref("Practitioner", proca))
    note_ref(refs, "Practitioner", proca)
    return out


# --- DocumentReference (DocumentReference.sql.yaml) ----------------------------------------------

DOCUMENT_PROFILE = "http://hl7.org/fhir/StructureDefinition/DocumentReference"
DOC_STATUS, DOC_DOCSTATUS = CodeMap("document-reference-status"), CodeMap("document-doc-status")
DOC_TYPE, DOC_TYPE_SNOMED = CodeMap("document-type"), CodeMap("document-type-snomed")
SPECIALTY = CodeMap("specialty")

SQL_DOCUMENTS = (
    'SELECT "DOCMT_REFNO", "PATNT_REFNO", "PRVSP_REFNO", "DOCTY_CODE", "DOC_TITLE", "DOC_STATUS", '
    '"AUTHOR_REFNO", "SPECT_CODE", "CREATED_DTTM", "SERVICE_START_DTTM", "SERVICE_END_DTTM", '
    '"FILED_TS", "MIME_TYPE", "CONTENT_SIZE", "CONTENT_SHA1", "MODIF_DTTM" FROM "DOCUMENTS" '
    'WHERE "DELETED_FLAG" = \'N\' AND "PATNT_REFNO" = ? ORDER BY "DOCMT_REFNO" LIMIT ?')


def document(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    (refno, patnt, prvsp, docty, title_, status, author, spect, created, start, end, filed,
     mime, size, sha1, modif) = r
    out = envelope("DocumentReference", DOCUMENT_PROFILE, str(refno), modif)
    out["masterIdentifier"] = {"system": TRUST + "Id/document-id", "value": str(refno)}
    put(out, "status", code(DOC_STATUS, status))
    put(out, "docStatus", code(DOC_DOCSTATUS, status))
    name = text(title_)
    cc: dict[str, Any] = {}
    put(cc, "coding", some(coding(DOC_TYPE_SNOMED, docty), coding(DOC_TYPE, docty)))
    put(cc, "text", name)
    put(out, "type", cc)
    put(out, "subject", ref("Patient", patnt))
    made = dttm12(created)
    put(out, "created", made)
    put(out, "indexed", dttm_iso(filed))
    if author is not None:
        out["author"] = [{"reference": f"Practitioner/{author}"}]
        refs["Practitioner"].add(author)
    put(out, "description", name)
    attachment: dict[str, Any] = {}
    put(attachment, "contentType", text(mime))
    attachment["url"] = f"Binary/{refno}"
    put(attachment, "size", size)
    put(attachment, "hash", sha1_base64(sha1))
    put(attachment, "title", name)
    put(attachment, "creation", made)
    out["content"] = [{"attachment": attachment}]
    context: dict[str, Any] = {}
    put(context, "encounter", ref("Encounter", prvsp))
    put(context, "period", period(dttm12(start), dttm12(end)))
    put(context, "practiceSetting", SPECIALTY.concept(spect))
    put(out, "context", context)
    return out


# --- Encounter, three sources (Encounter.ae / .outpatient / .sql.yaml) ---------------------------

ENCOUNTER_PROFILE = SD + "CareConnect-Encounter-1"
CON = [{"coding": [{"system": "http://hl7.org/fhir/v3/ParticipationType", "code": "CON",
                    "display": "consultant"}]}]
ATND = [{"coding": [{"system": "http://hl7.org/fhir/v3/ParticipationType", "code": "ATND",
                     "display": "attender"}]}]
STATUS_IP, CLASS_IP = CodeMap("encounter-status"), CodeMap("encounter-class-inpatient")
STATUS_OP, CLASS_OP = CodeMap("encounter-status-outpatient"), CodeMap("encounter-class-outpatient")
STATUS_AE, CLASS_AE = CodeMap("encounter-status-ae"), CodeMap("encounter-class-ae")
OUTCOME = CodeMap("outcome-of-attendance")
ADMET, DISMT = CodeMap("admission-method"), CodeMap("discharge-method")
ADSOR, DISDE = CodeMap("source-of-admission"), CodeMap("discharge-destination")

SQL_AE = ('SELECT "AEATT_REFNO", "AE_NUMBER", "AE_STATUS", "ATTCAT_CODE", "PATNT_REFNO", '
          '"PROCA_REFNO", "ARRIVAL_DTTM", "DEPART_DTTM", "LOCTN_REFNO", "MODIF_DTTM" '
          'FROM "AE_ATTENDANCES" WHERE "DEL_FLAG" = \'N\' AND "PATNT_REFNO" = ? '
          'ORDER BY "AEATT_REFNO" LIMIT ?')
SQL_OP = ('SELECT "OPATT_REFNO", "ATTENDANCE_ID", "ATTND_CODE", "OUTCM_CODE", "MAIN_SPECT_CODE", '
          '"PATNT_REFNO", "PROCA_REFNO", "APPT_DTTM", "LOCTN_REFNO", "MODIF_DTTM" '
          'FROM "OUTPATIENT_ATTENDANCES" WHERE "PATNT_REFNO" = ? ORDER BY "OPATT_REFNO" LIMIT ?')
SQL_IP = ('SELECT "PRVSP_REFNO", "SPELL_NUMBER", "SPELL_STATUS", "PATCL_CODE", "MAIN_SPECT_CODE", '
          '"PATNT_REFNO", "PROCA_REFNO", "ADMIT_DTTM", "DISCH_DTTM", "ADMET_CODE", "DISMT_CODE", '
          '"ADSOR_CODE", "DISDE_CODE", "LOCTN_REFNO", "MODIF_DTTM" FROM "PROVIDER_SPELLS" '
          'WHERE "PATNT_REFNO" = ? ORDER BY "PRVSP_REFNO" LIMIT ?')


def _minutes(start: str | None, end: str | None) -> int | None:
    if not start or not end:
        return None
    m = int((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start))
            .total_seconds() // 60)
    return m if m >= 0 else None


def _encounter_common(out: dict[str, Any], patnt: Any, proca: Any, kind: list[Any],
                      start: str | None, end: str | None, refs: Refs) -> None:
    put(out, "subject", ref("Patient", patnt))
    if proca is not None:
        out["participant"] = [{"type": kind, "individual": {"reference": f"Practitioner/{proca}"}}]
        refs["Practitioner"].add(proca)
    put(out, "period", period(start, end))
    minutes = _minutes(start, end)
    if minutes is not None:
        out["length"] = {"value": minutes, "unit": "min", "system": UCUM_SYSTEM, "code": "min"}


def _encounter_tail(out: dict[str, Any], loctn: Any, refs: Refs) -> None:
    if loctn is not None:
        out["location"] = [{"location": {"reference": f"Location/{loctn}"}}]
        refs["Location"].add(loctn)
    out["serviceProvider"] = {"reference": "Organization/1"}  # a literal in the mapping files
    refs["Organization"].add(1)


def encounter_ae(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    refno, number, status, attcat, patnt, proca, arrival, depart, loctn, modif = r
    out = envelope("Encounter", ENCOUNTER_PROFILE, f"ae-{refno}", modif)
    number = text(number)
    if number is not None:
        out["identifier"] = [{"system": TRUST + "Id/ae-attendance-number", "value": number}]
    put(out, "status", code(STATUS_AE, status))
    put(out, "class", coding(CLASS_AE, attcat))
    _encounter_common(out, patnt, proca, ATND, dttm12(arrival), dttm12(depart), refs)
    _encounter_tail(out, loctn, refs)
    return out


def encounter_op(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    refno, number, attnd, outcm, spect, patnt, proca, appt, loctn, modif = r
    out = envelope("Encounter", ENCOUNTER_PROFILE, f"op-{refno}", modif)
    outcome = OUTCOME.concept(outcm)
    if outcome is not None:
        out["extension"] = [{"url": SD + "Extension-CareConnect-OutcomeOfAttendance-1",
                             "valueCodeableConcept": outcome}]
    number = text(number)
    if number is not None:
        out["identifier"] = [{"system": TRUST + "Id/attendance-number", "value": number}]
    put(out, "status", code(STATUS_OP, attnd))
    put(out, "class", coding(CLASS_OP, attnd))
    put(out, "type", some(SPECIALTY.concept(spect)))
    _encounter_common(out, patnt, proca, CON, dttm12(appt), None, refs)
    put(out, "period", period(dttm12(appt), dttm12(appt)))  # over: it ends where it starts
    _encounter_tail(out, loctn, refs)
    return out


def encounter_ip(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    (refno, number, status, patcl, spect, patnt, proca, admit, disch, admet, dismt, adsor, disde,
     loctn, modif) = r
    out = envelope("Encounter", ENCOUNTER_PROFILE, str(refno), modif)
    number = text(number)
    if number is not None:
        out["identifier"] = [{"system": TRUST + "Id/spell-number", "value": number}]
    put(out, "status", code(STATUS_IP, status))
    put(out, "class", coding(CLASS_IP, patcl))
    put(out, "type", some(SPECIALTY.concept(spect)))
    _encounter_common(out, patnt, proca, CON, dttm12(admit), dttm12(disch), refs)
    hosp: dict[str, Any] = {}
    ext = []
    for cm, name, v in ((ADMET, "AdmissionMethod", admet), (DISMT, "DischargeMethod", dismt)):
        cc = cm.concept(v)
        if cc is not None:
            ext.append({"url": f"{SD}Extension-CareConnect-{name}-1", "valueCodeableConcept": cc})
    put(hosp, "extension", ext)
    put(hosp, "admitSource", ADSOR.concept(adsor))
    put(hosp, "dischargeDisposition", DISDE.concept(disde))
    put(out, "hospitalization", hosp)
    _encounter_tail(out, loctn, refs)
    return out


# --- Flag (Flag.sql.yaml) ------------------------------------------------------------------------

FLAG_PROFILE = SD + "CareConnect-Flag-1"
FLAG_STATUS, ALERT_CATEGORY = CodeMap("flag-status"), CodeMap("alert-category")
ALERT_TYPE = CodeMap("alert-type")

SQL_ALERTS = (
    'SELECT "ALERT_REFNO", "PATNT_REFNO", "ALTYP_CODE", "ALERT_TEXT", "ALERT_STATUS", '
    '"START_DTTM", "END_DTTM", "PROCA_REFNO", "MODIF_DTTM" FROM "ALERTS" '
    'WHERE "ARCHV_FLAG" = \'N\' AND "PATNT_REFNO" = ? ORDER BY "ALERT_REFNO" LIMIT ?')


def flag(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    refno, patnt, altyp, alert_text, status, start, end, proca, modif = r
    out = envelope("Flag", FLAG_PROFILE, str(refno), modif)
    out["identifier"] = [{"system": TRUST + "Id/alert-id", "value": str(refno)}]
    put(out, "status", code(FLAG_STATUS, status))
    put(out, "category", ALERT_CATEGORY.concept(altyp))
    cc: dict[str, Any] = {}
    put(cc, "coding", some(coding(ALERT_TYPE, altyp)))
    put(cc, "text", text(alert_text))
    put(out, "code", cc)
    put(out, "subject", ref("Patient", patnt))
    put(out, "period", period(dttm12(start), dttm12(end)))
    put(out, "author", ref("Practitioner", proca))
    note_ref(refs, "Practitioner", proca)
    return out


# --- Immunization (Immunization.sql.yaml) --------------------------------------------------------

IMMUNIZATION_PROFILE = SD + "CareConnect-Immunization-1"
VACC_PROCEDURE, IMM_STATUS = CodeMap("vaccination-procedure"), CodeMap("immunization-status")
VACCINE, IMM_ORIGIN = CodeMap("vaccine"), CodeMap("immunization-origin")
VACC_SITE, ROUTE = CodeMap("vaccination-site"), CodeMap("medication-route")
IMM_REASON = CodeMap("immunization-reason")
IMM_NOT_GIVEN = CodeMap("immunization-not-given-reason")
AP = {"coding": [{"system": "http://hl7.org/fhir/v2/0443", "code": "AP",
                  "display": "Administering Provider"}]}

SQL_IMMUNISATIONS = (
    'SELECT "IMMUN_REFNO", "PATNT_REFNO", "VACC_CODE", "GIVEN_DTTM", "NOT_GIVEN", '
    '"NOT_GIVEN_CODE", "REASON_CODE", "BATCH_NO", "EXPIRY_DATE", "SITE_CODE", "ROUTE_CODE", '
    '"DOSE_VALUE", "DOSE_UNIT", "PRIMARY_SRC", "PROCA_REFNO", "LOCTN_REFNO", "RECORDED_DTTM", '
    '"DEL_FLAG", "MODIF_DTTM" FROM "IMMUNISATIONS" '
    'WHERE "DEL_FLAG" = \'N\' AND "PATNT_REFNO" = ? ORDER BY "IMMUN_REFNO" LIMIT ?')


def immunization(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    (refno, patnt, vacc, given, not_given, not_given_code, reason, batch, expiry, site, route,
     dose_value, dose_unit, primary, proca, loctn, recorded, del_flag, modif) = r
    out = envelope("Immunization", IMMUNIZATION_PROFILE, str(refno), modif)
    ext = []
    recorded_at = dttm12(recorded)
    if recorded_at is not None:
        ext.append({"url": SD + "Extension-CareConnect-DateRecorded-1",
                    "valueDateTime": recorded_at})
    procedure = VACC_PROCEDURE.concept(vacc)
    if procedure is not None:
        ext.append({"url": SD + "Extension-CareConnect-VaccinationProcedure-1",
                    "valueCodeableConcept": procedure})
    put(out, "extension", ext)
    put(out, "status", code(IMM_STATUS, del_flag))
    put(out, "notGiven", yes_no(not_given))
    vacc_code = text(vacc)
    vaccine = VACCINE.target(vacc)
    cc: dict[str, Any] = {}
    put(cc, "coding", some(
        coding(VACCINE, vacc),
        {"system": TRUST + "CodeSystem/vaccine", "code": vacc_code} if vacc_code else None))
    put(cc, "text", vaccine[1] if vaccine is not None else None)
    put(out, "vaccineCode", cc)
    put(out, "patient", ref("Patient", patnt))
    put(out, "date", dttm12(given))
    put(out, "primarySource", yes_no(primary))
    put(out, "reportOrigin", IMM_ORIGIN.concept(primary))
    put(out, "location", ref("Location", loctn))
    note_ref(refs, "Location", loctn)
    put(out, "lotNumber", text(batch))
    put(out, "expirationDate", date8(expiry))
    put(out, "site", VACC_SITE.concept(site))
    put(out, "route", ROUTE.concept(route))
    put(out, "doseQuantity", quantity(dose_value, dose_unit))
    if proca is not None:
        out["practitioner"] = [{"role": AP, "actor": {"reference": f"Practitioner/{proca}"}}]
        refs["Practitioner"].add(proca)
    explanation: dict[str, Any] = {}
    put(explanation, "reason", some(IMM_REASON.concept(reason)))
    put(explanation, "reasonNotGiven", some(IMM_NOT_GIVEN.concept(not_given_code)))
    put(out, "explanation", explanation)
    return out


# --- MedicationRequest (MedicationRequest.sql.yaml) ----------------------------------------------

MEDREQ_PROFILE = SD + "CareConnect-MedicationRequest-1"
RX_TYPE, MR_STATUS = CodeMap("prescription-type"), CodeMap("medication-request-status")
MR_CATEGORY, TIMING = CodeMap("medication-request-category"), CodeMap("timing-abbreviation")

SQL_PRESCRIPTIONS = (
    'SELECT m."PRESC_REFNO", m."PATNT_REFNO", m."DRUG_REFNO", m."ORDER_NUMBER", m."PRSTY_CODE", '
    'm."RXTYP_CODE", m."PRVSP_REFNO", m."PROCA_REFNO", m."ORDER_DTTM", m."START_DTTM", '
    'm."END_DTTM", m."STATUS_CODE", m."DOSE_TEXT", m."DOSE_VALUE", m."DOSE_UNIT", '
    'm."ROUTE_CODE", m."FREQ_CODE", m."FREQ_PER_DAY", m."PRN_FLAG", m."QTY_VALUE", m."QTY_UNIT", '
    'm."SUPPLY_DAYS", m."STOP_REASON", m."MODIF_DTTM", d."DRUG_NAME", m."OPATT_REFNO" '
    'FROM "PRESCRIPTIONS" AS m LEFT OUTER JOIN "DRUGS" AS d ON d."DRUG_REFNO" = m."DRUG_REFNO" '
    'WHERE m."DEL_FLAG" = \'N\' AND m."PATNT_REFNO" = ? ORDER BY m."PRESC_REFNO" LIMIT ?')


def medication_request(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    (refno, patnt, drug, order_number, prsty, rxtyp, prvsp, proca, ordered, start, end, status,
     dose_text, dose_value, dose_unit, route, freq_code, freq, prn, qty_value, qty_unit,
     supply_days, stop_reason, modif, drug_name, opatt) = r
    out = envelope("MedicationRequest", MEDREQ_PROFILE, str(refno), modif)
    rx = RX_TYPE.concept(rxtyp)
    if rx is not None:
        out["extension"] = [{"url": SD + "Extension-CareConnect-PrescriptionType-1",
                             "valueCodeableConcept": rx}]
    number = text(order_number)
    if number is not None:
        out["identifier"] = [{"system": TRUST + "Id/prescription-order-number",
                              "value": number}]
    put(out, "status", code(MR_STATUS, status))
    out["intent"] = "order"
    put(out, "category", MR_CATEGORY.concept(prsty))
    med: dict[str, Any] = {}
    if drug is not None:
        med["reference"] = f"Medication/{drug}"
        refs["Medication"].add(drug)
    put(med, "display", text(drug_name))
    put(out, "medicationReference", med)
    put(out, "subject", ref("Patient", patnt))
    put(out, "context", encounter(prvsp, opatt))
    put(out, "authoredOn", dttm12(ordered))
    if proca is not None:
        out["requester"] = {"agent": {"reference": f"Practitioner/{proca}"}}
        refs["Practitioner"].add(proca)
    reason = text(stop_reason)
    if reason is not None:
        out["note"] = [{"text": reason}]
    dosage: dict[str, Any] = {}
    put(dosage, "text", text(dose_text))
    timing: dict[str, Any] = {}
    if freq is not None:
        timing["repeat"] = {"frequency": freq, "period": 1, "periodUnit": "d"}
    put(timing, "code", TIMING.concept(freq_code))
    put(dosage, "timing", timing)
    put(dosage, "asNeededBoolean", yes_no(prn))
    put(dosage, "route", ROUTE.concept(route))
    put(dosage, "doseQuantity", quantity(dose_value, dose_unit))
    if dosage:
        out["dosageInstruction"] = [dosage]
    dispense: dict[str, Any] = {}
    put(dispense, "validityPeriod", period(dttm12(start), dttm12(end)))
    put(dispense, "quantity", quantity(qty_value, qty_unit))
    if supply_days is not None:
        dispense["expectedSupplyDuration"] = {"value": supply_days, "unit": "day",
                                              "system": UCUM_SYSTEM, "code": "d"}
    put(out, "dispenseRequest", dispense)
    return out


# --- MedicationStatement (MedicationStatement.sql.yaml) ------------------------------------------

MEDSTAT_PROFILE = SD + "CareConnect-MedicationStatement-1"
CHANGE_STATUS, CHANGE_REASON = CodeMap("medication-change-status"), \
    CodeMap("medication-change-reason")
MS_STATUS = CodeMap("medication-statement-status")

SQL_MEDICATION_LIST = (
    'SELECT l."MEDLS_REFNO", l."PATNT_REFNO", l."DRUG_REFNO", l."PRESC_REFNO", l."STATUS_CODE", '
    'l."PROCA_REFNO", l."START_DATE", l."END_DATE", l."RECORDED_DTTM", l."DOSE_TEXT", '
    'l."ROUTE_CODE", l."CHANGE_CODE", l."CHANGE_REASON", l."CHANGE_TEXT", l."CHANGE_DATE", '
    'l."LAST_ISSUE_DATE", l."MODIF_DTTM", d."DRUG_NAME" '
    'FROM "MEDICATION_LIST" AS l LEFT OUTER JOIN "DRUGS" AS d ON d."DRUG_REFNO" = l."DRUG_REFNO" '
    'WHERE l."DEL_FLAG" = \'N\' AND l."PATNT_REFNO" = ? ORDER BY l."MEDLS_REFNO" LIMIT ?')


def medication_statement(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    (refno, patnt, drug, presc, status, proca, start, end, recorded, dose_text, route,
     change_code, change_reason, change_text, change_date, last_issue, modif, drug_name) = r
    out = envelope("MedicationStatement", MEDSTAT_PROFILE, str(refno), modif)
    ext = []
    issued = date8(last_issue)
    if issued is not None:
        ext.append({"url": SD + "Extension-CareConnect-MedicationStatementLastIssueDate-1",
                    "valueDateTime": issued})
    change = []
    for url, kind, v in (("status", "valueCode", code(CHANGE_STATUS, change_code)),
                         ("indicationForChange", "valueCodeableConcept",
                          CHANGE_REASON.concept(change_reason)),
                         ("dateChanged", "valueDateTime", date8(change_date)),
                         ("detailsOfAmendment", "valueString", text(change_text))):
        if v is not None:
            change.append({"url": url, kind: v})
    if change:
        ext.append({"url": SD + "Extension-CareConnect-MedicationChangeSummary-1",
                    "extension": change})
    put(out, "extension", ext)
    if presc is not None:
        out["basedOn"] = [{"reference": f"MedicationRequest/{presc}"}]
    put(out, "status", code(MS_STATUS, status))
    med: dict[str, Any] = {}
    if drug is not None:
        med["reference"] = f"Medication/{drug}"
        refs["Medication"].add(drug)
    put(med, "display", text(drug_name))
    put(out, "medicationReference", med)
    put(out, "effectivePeriod", period(date8(start), date8(end)))
    put(out, "dateAsserted", dttm12(recorded))
    put(out, "informationSource", ref("Practitioner", proca))
    note_ref(refs, "Practitioner", proca)
    put(out, "subject", ref("Patient", patnt))
    out["taken"] = "y"
    dosage: dict[str, Any] = {}
    put(dosage, "text", text(dose_text))
    put(dosage, "route", ROUTE.concept(route))
    if dosage:
        out["dosage"] = [dosage]
    return out


# --- Observation (Observation.sql.yaml) ----------------------------------------------------------

OBSERVATION_PROFILE = SD + "CareConnect-Observation-1"
OBS_STATUS, OBS_CATEGORY = CodeMap("observation-status"), CodeMap("observation-category")
OBS_INTERPRETATION = CodeMap("observation-interpretation")

SQL_RESULTS = (
    'SELECT o."RESLT_REFNO", o."PATNT_REFNO", o."TEST_CODE", o."VALUE_NUM", o."COMPARATOR", '
    'o."VALUE_TEXT", o."UNITS", o."REF_LOW", o."REF_HIGH", o."REF_TEXT", o."ABN_FLAG", '
    'o."RESULT_STATUS", o."MODIF_DTTM", h."COLLECTED_DTTM", h."REPORTED_DTTM", h."PROCA_REFNO", '
    'h."ORGAN_REFNO", h."PRVSP_REFNO", t."TEST_NAME", t."OBSCT_CODE", t."SNOMED_CODE", '
    't."SNOMED_DESC", h."OPATT_REFNO" FROM "RESULTS" AS o '
    'LEFT OUTER JOIN "RESULT_REPORTS" AS h ON h."REPRT_REFNO" = o."REPRT_REFNO" '
    'LEFT OUTER JOIN "TEST_CODES" AS t ON t."TEST_CODE" = o."TEST_CODE" '
    'WHERE o."DEL_FLAG" = \'N\' AND o."PATNT_REFNO" = ? ORDER BY o."RESLT_REFNO" LIMIT ?')


def observation(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    (refno, patnt, test, value_num, comparator, value_text, units, ref_low, ref_high, ref_text,
     abn, status, modif, collected, reported, proca, organ, prvsp, test_name, obsct, snomed,
     snomed_desc, opatt) = r
    out = envelope("Observation", OBSERVATION_PROFILE, str(refno), modif)
    put(out, "status", code(OBS_STATUS, status))
    put(out, "category", some(OBS_CATEGORY.concept(obsct)))
    name = text(test_name)
    codings = []
    snomed = text(snomed)
    if snomed is not None:  # tests the trust has not mapped have the local code only
        c = {"system": SNOMED, "code": snomed}
        put(c, "display", text(snomed_desc))
        codings.append(c)
    local: dict[str, Any] = {}
    put(local, "code", text(test))
    put(local, "display", name)
    if local:
        codings.append({"system": TRUST + "CodeSystem/test-code", **local})
    cc: dict[str, Any] = {}
    put(cc, "coding", codings)
    put(cc, "text", name)
    put(out, "code", cc)
    put(out, "subject", ref("Patient", patnt))
    put(out, "context", encounter(prvsp, opatt))
    put(out, "effectiveDateTime", dttm12(collected))
    put(out, "issued", dttm12(reported))
    performer = []
    if proca is not None:
        performer.append({"reference": f"Practitioner/{proca}"})
        refs["Practitioner"].add(proca)
    if organ is not None:
        performer.append({"reference": f"Organization/{organ}"})
        refs["Organization"].add(organ)
    put(out, "performer", performer)
    put(out, "valueQuantity", quantity(value_num, units, comparator))
    put(out, "valueString", text(value_text))
    put(out, "interpretation", OBS_INTERPRETATION.concept(abn))
    rng: dict[str, Any] = {}
    put(rng, "low", quantity(ref_low, units))
    put(rng, "high", quantity(ref_high, units))
    put(rng, "text", text(ref_text))
    if rng:
        out["referenceRange"] = [rng]
    return out


# --- Procedure (Procedure.sql.yaml) --------------------------------------------------------------

PROCEDURE_PROFILE = SD + "CareConnect-Procedure-1"
PROC_STATUS, OPCS4, OPCS4_SNOMED = (CodeMap("procedure-status"), CodeMap("opcs4"),
                                    CodeMap("opcs4-snomed"))

SQL_PROCEDURES = (
    'SELECT "PROCD_REFNO", "PATNT_REFNO", "PRVSP_REFNO", "OPCS_CODE", "PROCD_DESC", '
    '"PROCD_STATUS", "PROC_DTTM", "PROCA_REFNO", "MODIF_DTTM" FROM "PROCEDURES" '
    'WHERE "DELETED_FLAG" = \'N\' AND "PATNT_REFNO" = ? ORDER BY "PROCD_REFNO" LIMIT ?')


def procedure(r: tuple[Any, ...], refs: Refs) -> dict[str, Any]:
    refno, patnt, prvsp, opcs, desc, status, when, proca, modif = r
    out = envelope("Procedure", PROCEDURE_PROFILE, str(refno), modif)
    out["identifier"] = [{"system": TRUST + "Id/procedure-id", "value": str(refno)}]
    put(out, "status", code(PROC_STATUS, status))
    cc: dict[str, Any] = {}
    put(cc, "coding", some(coding(OPCS4, opcs), coding(OPCS4_SNOMED, opcs)))
    put(cc, "text", text(desc))
    put(out, "code", cc)
    put(out, "subject", ref("Patient", patnt))
    put(out, "context", ref("Encounter", prvsp))
    put(out, "performedDateTime", dttm12(when))
    if proca is not None:
        out["performer"] = [{"actor": {"reference": f"Practitioner/{proca}"}}]
        refs["Practitioner"].add(proca)
    return out


# --- the referenced types (Practitioner / Organization / Location / Medication .sql.yaml) --------

SEX = CodeMap("sex")
ORG_TYPE = CodeMap("organisation-type")
LOC_SYSTEM, LOC_STATUS, LOC_TYPE = (CodeMap("location-code-system"), CodeMap("location-status"),
                                    CodeMap("location-type"))
MED_STATUS, MED_FORM = CodeMap("medication-status"), CodeMap("medication-form")


def _in(n: int) -> str:
    return "(" + ", ".join("?" * n) + ")"


def _work_address(l1: Any, l2: Any, l3: Any, pcode: Any) -> dict[str, Any] | None:
    a: dict[str, Any] = {}
    put(a, "line", some(title(l1), title(l2)))
    put(a, "city", title(l3))
    put(a, "postalCode", text(pcode))
    return {"use": "work", **a} if a else None


def _work_phone(v: Any) -> list[dict[str, Any]] | None:
    v = text(v)
    return None if v is None else [{"system": "phone", "use": "work", "value": v}]


def sql_clinicians(n: int) -> str:
    return ('SELECT c."PROCA_REFNO", c."TITLE", c."SURNAME", c."FORENAME", c."SEXXX_CODE", '
            'c."GMC_CODE", c."GMP_CODE", c."SDS_USER_ID", c."TEL_NO", c."ACTIVE_FLAG", '
            'c."MODIF_DTTM", o."ADDR_LINE1", o."ADDR_LINE2", o."ADDR_LINE3", o."PCODE" '
            'FROM "CLINICIANS" AS c LEFT OUTER JOIN "ORGANISATIONS" AS o '
            'ON o."ORGAN_REFNO" = c."ORGAN_REFNO" '
            'WHERE c."PROCA_REFNO" IN ' + _in(n) + ' ORDER BY c."PROCA_REFNO"')


def practitioner(r: tuple[Any, ...]) -> dict[str, Any]:
    (refno, title_, surname, forename, sex, gmc, gmp, sds, tel, active_flag, modif, l1, l2, l3,
     pcode) = r
    out = envelope("Practitioner", SD + "CareConnect-Practitioner-1", str(refno), modif)
    ident = []
    for system, v in (("https://fhir.nhs.uk/Id/sds-user-id", sds),
                      ("https://fhir.hl7.org.uk/Id/gmc-number", gmc),
                      ("https://fhir.hl7.org.uk/Id/gmp-number", gmp)):
        v = text(v)
        if v is not None:
            ident.append({"system": system, "value": v})
    put(out, "identifier", ident)
    put(out, "active", yes_no(active_flag))
    name: dict[str, Any] = {}
    put(name, "family", title(surname))
    put(name, "given", some(title(forename)))
    put(name, "prefix", some(title(title_)))
    if name:
        out["name"] = [{"use": "official", **name}]
    put(out, "telecom", _work_phone(tel))
    address = _work_address(l1, l2, l3, pcode)
    if address is not None:
        out["address"] = [address]
    put(out, "gender", code(SEX, sex))
    return out


def sql_organisations(n: int) -> str:
    return ('SELECT "ORGAN_REFNO", "ODS_CODE", "ORG_NAME", "ORGTY_CODE", "ADDR_LINE1", '
            '"ADDR_LINE2", "ADDR_LINE3", "PCODE", "TEL_NO", "PARENT_ODS", "ACTIVE_FLAG", '
            '"MODIF_DTTM" FROM "ORGANISATIONS" WHERE "ORGAN_REFNO" IN ' + _in(n)
            + ' ORDER BY "ORGAN_REFNO"')


def organization(r: tuple[Any, ...]) -> dict[str, Any]:
    refno, ods, name, orgty, l1, l2, l3, pcode, tel, parent, active_flag, modif = r
    out = envelope("Organization", SD + "CareConnect-Organization-1", str(refno), modif)
    ods = text(ods)
    if ods is not None:
        out["identifier"] = [{"system": "https://fhir.nhs.uk/Id/ods-organization-code",
                              "value": ods}]
    put(out, "active", yes_no(active_flag))
    put(out, "type", some(ORG_TYPE.concept(orgty)))
    put(out, "name", text(name))
    put(out, "telecom", _work_phone(tel))
    address = _work_address(l1, l2, l3, pcode)
    if address is not None:
        out["address"] = [address]
    parent = text(parent)
    if parent is not None:
        out["partOf"] = {"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code",
                                        "value": parent}}
    return out


def sql_locations(n: int) -> str:
    return ('SELECT "LOCTN_REFNO", "LOCTN_CODE", "LOCTN_NAME", "LOCTY_CODE", "PARENT_REFNO", '
            '"ORGAN_REFNO", "ADDR_LINE1", "ADDR_LINE2", "ADDR_LINE3", "PCODE", "TEL_NO", '
            '"ACTIVE_FLAG", "MODIF_DTTM" FROM "LOCATIONS" WHERE "LOCTN_REFNO" IN ' + _in(n)
            + ' ORDER BY "LOCTN_REFNO"')


def location(r: tuple[Any, ...]) -> dict[str, Any]:
    refno, loc_code, name, locty, parent, organ, l1, l2, l3, pcode, tel, active_flag, modif = r
    out = envelope("Location", SD + "CareConnect-Location-1", str(refno), modif)
    ident: dict[str, Any] = {}
    put(ident, "system", code(LOC_SYSTEM, locty))
    put(ident, "value", text(loc_code))
    if ident:
        out["identifier"] = [ident]
    put(out, "status", code(LOC_STATUS, active_flag))
    put(out, "name", text(name))
    put(out, "type", LOC_TYPE.concept(locty))
    put(out, "telecom", _work_phone(tel))
    put(out, "address", _work_address(l1, l2, l3, pcode))
    put(out, "managingOrganization", ref("Organization", organ))
    put(out, "partOf", ref("Location", parent))
    return out


def sql_drugs(n: int) -> str:
    return ('SELECT "DRUG_REFNO", "DRUG_CODE", "DRUG_NAME", "DMD_CODE", "FORM_CODE", '
            '"ACTIVE_FLAG", "MODIF_DTTM" FROM "DRUGS" WHERE "DRUG_REFNO" IN ' + _in(n)
            + ' ORDER BY "DRUG_REFNO"')


def medication(r: tuple[Any, ...]) -> dict[str, Any]:
    refno, drug_code, name, dmd, form, active_flag, modif = r
    out = envelope("Medication", SD + "CareConnect-Medication-1", str(refno), modif)
    name = text(name)
    codings = []
    dmd = text(dmd)
    if dmd is not None:  # a product the trust never mapped has no dm+d code
        c = {"system": SNOMED, "code": dmd}
        put(c, "display", name)
        codings.append(c)
    local: dict[str, Any] = {}
    put(local, "code", text(drug_code))
    put(local, "display", name)
    if local:
        codings.append({"system": TRUST + "CodeSystem/drug-code", **local})
    cc: dict[str, Any] = {}
    put(cc, "coding", codings)
    put(cc, "text", name)
    put(out, "code", cc)
    put(out, "status", code(MED_STATUS, active_flag))
    put(out, "form", MED_FORM.concept(form))
    return out


# --- the record ---------------------------------------------------------------------------------

Builder = Callable[[tuple[Any, ...], Refs], dict[str, Any]]

SECTIONS: list[tuple[str, Builder]] = [
    # the gateway's order: types by name, Encounter's sources in the mapping files' order
    (SQL_ALLERGIES, allergy),  # type: ignore[list-item]  # (reactions: see record())
    (SQL_PROBLEMS, condition),
    (SQL_DOCUMENTS, document),
    (SQL_AE, encounter_ae),
    (SQL_OP, encounter_op),
    (SQL_IP, encounter_ip),
    (SQL_ALERTS, flag),
    (SQL_IMMUNISATIONS, immunization),
    (SQL_PRESCRIPTIONS, medication_request),
    (SQL_MEDICATION_LIST, medication_statement),
    (SQL_RESULTS, observation),
    (SQL_PROCEDURES, procedure),
]
REFERENCED: list[tuple[str, Callable[[int], str], Callable[[tuple[Any, ...]], dict[str, Any]]]] = [
    ("Practitioner", sql_clinicians, practitioner),
    ("Organization", sql_organisations, organization),
    ("Location", sql_locations, location),
    ("Medication", sql_drugs, medication),
]


def record(db: Db, pid: int, count: int
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool] | None:
    """(matches, included, more) of page 1 of the patient's record, or None (no patient)."""
    rows, _more, children = db.patients('p."PATNT_REFNO" IN (?)', [pid], 1)
    if not rows:
        return None
    key = rows[0][IDX["PATNT_REFNO"]]
    ids, addrs, gps = children[key]
    refs: Refs = {kind: set() for kind, _, _ in REFERENCED}
    out = [patient(rows[0], ids, addrs, gps)]
    for organ, proca, _ in gps:  # its generalPractitioner references
        note_ref(refs, "Practitioner", proca)
        note_ref(refs, "Organization", organ)
    c = db.conn()
    room, more = count, False
    for sql, build in SECTIONS:
        if room <= 0:
            more = True  # the gateway links on to the next section (it may be empty)
            break
        found = c.execute(sql, (pid, room + 1)).fetchall()
        if len(found) > room:
            more = True
            del found[room:]
        if build is allergy and found:  # its reactions: one more query for the page
            keys = [r[0] for r in found]
            reactions: dict[Any, list[tuple[Any, ...]]] = {k: [] for k in keys}
            for row in c.execute(sql_reactions(len(keys)), keys):
                reactions[row[0]].append(row)
            out += [allergy(r, reactions[r[0]], refs) for r in found]
        else:
            out += [build(r, refs) for r in found]
        room -= len(found)
        if more:
            break
    included: list[dict[str, Any]] = []
    for kind, sql_of, build_one in REFERENCED:
        keys = sorted(refs[kind])
        if keys:
            included += [build_one(r) for r in c.execute(sql_of(len(keys)), keys)]
    return out, included, more


def memoise() -> None:
    """A stronger baseline (``--memo``): the value conversions (dates, date-times, title-cased
    names) cached per distinct value, as a hand-writer who profiled this page might — values
    repeat across the rows of a record, and the gateway's converters cache them too."""
    g = globals()
    for name in ("date8", "dttm12", "dttm_iso", "title"):
        g[name] = functools.lru_cache(maxsize=65536)(g[name])


def build(db_path: str, memo: bool = False) -> Starlette:
    if memo:
        memoise()
    db = Db(db_path)

    async def everything(request: Request) -> Response:
        pid = request.path_params["id"]
        count = int(request.query_params.get("_count", "20"))
        if not pid.isdigit():
            return Response(status_code=404)
        found = await run_in_threadpool(record, db, int(pid), count)
        if found is None:
            return Response(status_code=404)
        resources, included, more = found
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
    ap.add_argument("--memo", action="store_true", help="cache value conversions (memoise())")
    args = ap.parse_args()
    uvicorn.run(build(args.db, args.memo), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
