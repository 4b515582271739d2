"""An independent consumer's check of the search parameters the CapabilityStatement claims.

Shares no code with the gateway (httpx and the standard library only): it reads `/metadata`,
takes real values from the served resources, and for every claimed parameter of every
clinical type asks the gateway over HTTP and compares the answer with its own evaluation of
the STU3 search semantics (the element paths below are the STU3 SearchParameter expressions,
written out here, not taken from the gateway's mappings). It also asks for STU3 parameters
the CapabilityStatement does *not* claim and expects a 400 OperationOutcome naming them.

Runs against any base URL: ``python -m tests.e2e.claimed_search http://127.0.0.1:8080/STU3
--token $TOKEN`` prints one line per finding (exit status 1 if there are any).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

# STU3 SearchParameter paths, per type: parameter -> element paths (choice types spelled out).
# Reference parameters whose STU3 expression restricts the target ('context.where(resolve()
# is Encounter)') carry the target type after a colon.
PATHS: dict[str, dict[str, list[str]]] = {
    "AllergyIntolerance": {
        "asserter": ["asserter"], "category": ["category"],
        "clinical-status": ["clinicalStatus"], "code": ["code", "reaction.substance"],
        "criticality": ["criticality"], "date": ["assertedDate"],
        "identifier": ["identifier"], "last-date": ["lastOccurrence"],
        "manifestation": ["reaction.manifestation"], "onset": ["reaction.onset"],
        "patient": ["patient"], "recorder": ["recorder"], "route": ["reaction.exposureRoute"],
        "severity": ["reaction.severity"], "type": ["type"],
        "verification-status": ["verificationStatus"],
    },
    "Condition": {
        "abatement-date": ["abatementDateTime", "abatementPeriod"],
        "asserted-date": ["assertedDate"], "asserter": ["asserter"], "body-site": ["bodySite"],
        "category": ["category"], "clinical-status": ["clinicalStatus"], "code": ["code"],
        "context": ["context"], "encounter": ["context:Encounter"], "evidence": ["evidence.code"],
        "identifier": ["identifier"], "onset-date": ["onsetDateTime", "onsetPeriod"],
        "patient": ["subject:Patient"], "severity": ["severity"], "stage": ["stage.summary"],
        "subject": ["subject"], "verification-status": ["verificationStatus"],
    },
    "Encounter": {
        "appointment": ["appointment"], "class": ["class"], "date": ["period"],
        "diagnosis": ["diagnosis.condition"], "episodeofcare": ["episodeOfCare"],
        "identifier": ["identifier"], "incomingreferral": ["incomingReferral"],
        "location": ["location.location"], "part-of": ["partOf"],
        "participant": ["participant.individual"], "participant-type": ["participant.type"],
        "patient": ["subject:Patient"], "practitioner": ["participant.individual:Practitioner"],
        "reason": ["reason"], "service-provider": ["serviceProvider"],
        "special-arrangement": ["hospitalization.specialArrangement"], "status": ["status"],
        "subject": ["subject"], "type": ["type"],
    },
    "Flag": {
        "author": ["author"], "date": ["period"], "encounter": ["encounter"],
        "identifier": ["identifier"], "patient": ["subject:Patient"], "status": ["status"],
        "subject": ["subject"],
    },
    "Immunization": {
        "date": ["date"], "dose-sequence": ["vaccinationProtocol.doseSequence"],
        "identifier": ["identifier"], "location": ["location"], "lot-number": ["lotNumber"],
        "manufacturer": ["manufacturer"], "notgiven": ["notGiven"], "patient": ["patient"],
        "practitioner": ["practitioner.actor"], "reaction": ["reaction.detail"],
        "reaction-date": ["reaction.date"], "reason": ["explanation.reason"],
        "reason-not-given": ["explanation.reasonNotGiven"], "status": ["status"],
        "vaccine-code": ["vaccineCode"],
    },
    "Medication": {
        "code": ["code"], "container": ["package.container"], "form": ["form"],
        "ingredient": ["ingredient.itemReference"],
        "ingredient-code": ["ingredient.itemCodeableConcept"], "manufacturer": ["manufacturer"],
        "over-the-counter": ["isOverTheCounter"], "package-item": ["package.content.itemReference"],
        "package-item-code": ["package.content.itemCodeableConcept"], "status": ["status"],
    },
    "MedicationRequest": {
        "authoredon": ["authoredOn"], "category": ["category"],
        "code": ["medicationCodeableConcept"], "context": ["context"],
        "date": ["dosageInstruction.timing.event"], "identifier": ["identifier"],
        "intended-dispenser": ["dispenseRequest.performer"], "intent": ["intent"],
        "medication": ["medicationReference"], "patient": ["subject:Patient"],
        "priority": ["priority"], "requester": ["requester.agent"], "status": ["status"],
        "subject": ["subject"],
    },
    "MedicationStatement": {
        "category": ["category"], "code": ["medicationCodeableConcept"], "context": ["context"],
        "effective": ["effectiveDateTime", "effectivePeriod"], "identifier": ["identifier"],
        "medication": ["medicationReference"], "part-of": ["partOf"],
        "patient": ["subject:Patient"], "source": ["informationSource"], "status": ["status"],
        "subject": ["subject"],
    },
    "Observation": {
        "based-on": ["basedOn"], "category": ["category"], "code": ["code"],
        "code-value-quantity": [], "combo-code": [], "component-code": ["component.code"],
        "context": ["context"], "data-absent-reason": ["dataAbsentReason"],
        "date": ["effectiveDateTime", "effectivePeriod"], "device": ["device"],
        "encounter": ["context:Encounter"], "identifier": ["identifier"], "method": ["method"],
        "patient": ["subject:Patient"], "performer": ["performer"], "related-target": [],
        "specimen": ["specimen"], "status": ["status"], "subject": ["subject"],
        "value-concept": ["valueCodeableConcept"], "value-date": ["valueDateTime", "valuePeriod"],
        "value-quantity": ["valueQuantity"], "value-string": ["valueString"],
    },
    "PractitionerRole": {
        "active": ["active"], "date": ["period"], "email": [], "endpoint": ["endpoint"],
        "identifier": ["identifier"], "location": ["location"], "organization": ["organization"],
        "phone": [], "practitioner": ["practitioner"], "role": ["code"],
        "service": ["healthcareService"], "specialty": ["specialty"], "telecom": ["telecom"],
    },
    "Procedure": {
        "based-on": ["basedOn"], "category": ["category"], "code": ["code"],
        "context": ["context"], "date": ["performedDateTime", "performedPeriod"],
        "definition": ["definition"], "encounter": ["context:Encounter"],
        "identifier": ["identifier"], "location": ["location"], "part-of": ["partOf"],
        "patient": ["subject:Patient"], "performer": ["performer.actor"], "status": ["status"],
        "subject": ["subject"],
    },
}
# What the Care Connect explore pages (../shared/careconnect-api/explore/api_*.md) list for
# each type, SHALL, SHOULD and MAY alike: the issue asks for every one of them.
EXPLORE: dict[str, set[str]] = {
    "AllergyIntolerance": {"clinical-status", "date", "patient"},
    "Condition": {"asserted-date", "category", "clinical-status", "patient"},
    "Procedure": {"date", "patient", "subject"},
    "Observation": {"category", "code", "date", "patient"},
    "PractitionerRole": {"identifier", "organization", "practitioner"},
    "Immunization": {"date", "patient", "status"},
    "Medication": {"code"},
    "MedicationRequest": {"authoredon", "code", "medication", "patient", "status"},
    "MedicationStatement": {"effective", "patient", "status"},
    "Encounter": {"date", "patient"},
    "Flag": {"date", "patient", "status"},
}
# Types searched within one patient at a time (the population a search is compared against is
# that patient's records of the type); the others are walked whole.
PATIENT_PARAM = {"AllergyIntolerance": "patient", "Condition": "patient", "Encounter": "patient",
                 "Flag": "patient", "Immunization": "patient", "MedicationRequest": "patient",
                 "MedicationStatement": "patient", "Observation": "patient",
                 "Procedure": "patient"}
WHOLE = ("Medication", "PractitionerRole")
MAX_WALK = 3000  # resources walked per population, a bound on the checker's own traffic
VALUES_PER_PARAM = 3


@dataclass
class Report:
    requests: int = 0
    checks: int = 0
    findings: list[str] = field(default_factory=list)
    covered: dict[str, set[str]] = field(default_factory=dict)

    def gap(self, text: str) -> None:
        self.findings.append(text)


class Consumer:
    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base = base.rstrip("/")
        self.http = httpx.Client(headers=headers or {}, timeout=60)
        self.report = Report()

    def get(self, path: str, params: list[tuple[str, str]] | None = None) -> httpx.Response:
        self.report.requests += 1
        url = path if path.startswith("http") else f"{self.base}/{path}"
        for _ in range(20):
            r = self.http.get(url, params=params)
            if r.status_code != 429:
                return r
            # a well-behaved client: wait as told (bounded), then ask again
            time.sleep(min(float(r.headers.get("retry-after", "1") or 1), 5.0))
        return r

    def walk(self, rtype: str, params: list[tuple[str, str]],
             limit: int = MAX_WALK) -> tuple[list[dict[str, Any]], str | None]:
        """Every match of a search, following `next` (the error text instead if any page fails)."""
        r = self.get(rtype, [*params, ("_count", "100")])
        found: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            if r.status_code != 200:
                return found, f"{r.status_code} {r.text[:300]}"
            bundle = r.json()
            for e in bundle.get("entry", []):
                if e.get("search", {}).get("mode", "match") != "match":
                    if e["resource"]["resourceType"] == "OperationOutcome":
                        return found, f"200 with outcome {e['resource']}"
                    continue
                res = e["resource"]
                if res["id"] in seen:
                    return found, f"{res['id']} returned twice while paging"
                seen.add(res["id"])
                found.append(res)
            nxt = [x["url"] for x in bundle.get("link", []) if x["relation"] == "next"]
            if not nxt or len(found) >= limit:
                return found, None
            r = self.get(nxt[0])


# ---- the consumer's own evaluation of STU3 search semantics --------------------------------

def elements(resource: dict[str, Any], path: str) -> list[Any]:
    """Values at a dotted path (lists flattened); 'path:Type' keeps references to Type only."""
    path, _, only = path.partition(":")
    values: list[Any] = [resource]
    for step in path.split("."):
        nxt: list[Any] = []
        for v in values:
            if isinstance(v, dict) and step in v:
                got = v[step]
                nxt.extend(got if isinstance(got, list) else [got])
        values = nxt
    if only:
        values = [v for v in values
                  if isinstance(v, dict) and str(v.get("reference", "")).startswith(only + "/")]
    return values


# Medications by id, filled by the walk: `code` of MedicationRequest/MedicationStatement is
# the medicine's code, which a resource with a medicationReference holds in the Medication.
MEDICATIONS: dict[str, dict[str, Any]] = {}


def values_of(resource: dict[str, Any], rtype: str, param: str) -> list[Any]:
    values = [v for p in PATHS[rtype][param] for v in elements(resource, p)]
    if param == "code" and rtype in ("MedicationRequest", "MedicationStatement"):
        for ref in elements(resource, "medicationReference"):
            med = MEDICATIONS.get(str(ref.get("reference", "")).rpartition("/")[2])
            values.extend(elements(med, "code") if med else [])
    return values


def token_candidates(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and "coding" in value:
        return [f"{c['system']}|{c['code']}" for c in value["coding"] if "system" in c] + [
            c["code"] for c in value["coding"][:1]]
    if isinstance(value, dict) and "code" in value:  # Coding
        return [f"{value['system']}|{value['code']}", value["code"]]
    if isinstance(value, dict) and "value" in value and "system" in value:  # Identifier
        return [f"{value['system']}|{value['value']}", str(value["value"])]
    return []


def token_matches(value: Any, query: str) -> bool:
    system, bar, code = query.rpartition("|")
    if isinstance(value, bool):
        return query == ("true" if value else "false")
    if isinstance(value, str):
        return not bar and value == query
    codings: list[dict[str, Any]] = []
    if isinstance(value, dict) and "coding" in value:
        codings = value["coding"]
    elif isinstance(value, dict) and "code" in value:
        codings = [value]
    elif isinstance(value, dict) and "value" in value:
        codings = [{"system": value.get("system"), "code": str(value["value"])}]
    return any(c.get("code") == code and (not bar or c.get("system") == system)
               for c in codings)


def fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def string_matches(value: Any, query: str) -> bool:
    return isinstance(value, str) and fold(value).startswith(fold(query))


_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")
Range = tuple[float, float]
INF = float("inf")


def date_range(text: str, tz: dt.tzinfo) -> Range:
    """[start, end) in epoch seconds of a FHIR date/dateTime at its precision; a value without
    an offset is read in ``tz``."""
    m = _DATE.match(text)
    if not m:
        raise ValueError(text)
    y, mo, d, h, mi, s, off = m.groups()
    zone = tz
    if off:
        zone = dt.UTC if off == "Z" else dt.timezone(dt.timedelta(
            hours=int(off[1:3]), minutes=int(off[4:6])) * (1 if off[0] == "+" else -1))
    start = dt.datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0),
                        int(s or 0), tzinfo=zone)
    if s is not None:
        end = start + dt.timedelta(seconds=1)
    elif mi is not None:
        end = start + dt.timedelta(minutes=1)
    elif d is not None:
        end = start + dt.timedelta(days=1)
    elif mo is not None:
        end = (start.replace(year=start.year + 1, month=1) if start.month == 12
               else start.replace(month=start.month + 1))
    else:
        end = start.replace(year=start.year + 1)
    return start.timestamp(), end.timestamp()


def target_range(value: Any, tz: dt.tzinfo) -> Range | None:
    if isinstance(value, str):
        return date_range(value, tz)
    if isinstance(value, dict) and ("start" in value or "end" in value):
        lo = date_range(value["start"], tz)[0] if "start" in value else -INF
        hi = date_range(value["end"], tz)[1] if "end" in value else INF
        return lo, hi
    return None


def point_of_open_period(value: Any, tz: dt.tzinfo) -> Range | None:
    """A Period with a start only, read as the point it often is in a legacy source (an
    outpatient appointment's time) rather than as ongoing: a consumer cannot tell which."""
    if isinstance(value, dict) and "start" in value and "end" not in value:
        return date_range(value["start"], tz)
    return None


def date_compare(prefix: str, target: Range, search: Range) -> bool:
    # STU3 search page, "prefix": gt/lt are the ranges above/below the search value
    # intersecting the target's; ge/le are those, or the search range containing the target
    (lo, hi), (slo, shi) = target, search
    within = slo <= lo and hi <= shi
    return {
        "eq": within,
        "ne": not within,
        "gt": hi > shi,
        "lt": lo < slo,
        "ge": hi > shi or within,
        "le": lo < slo or within,
    }[prefix]


def date_matches(value: Any, query: str) -> bool | None:
    """True/False, or None when the answer depends on the time zone the server reads a value
    without an offset in (UTC or the UK's), or on whether a start-only Period is ongoing or a
    point: such a resource is neither required nor refused."""
    prefix, text = (query[:2], query[2:]) if query[:2].isalpha() else ("eq", query)
    answers = set()
    for tz in (dt.UTC, dt.timezone(dt.timedelta(hours=1))):
        for target in (target_range(value, tz), point_of_open_period(value, tz)):
            if target is not None:
                answers.add(date_compare(prefix, target, date_range(text, tz)))
    if len(answers) != 1:
        return None if answers else False
    return answers.pop()


def quantity_matches(value: Any, query: str) -> bool:
    if not isinstance(value, dict) or "value" not in value:
        return False
    number, _, rest = query.partition("|")
    system, _, code = rest.partition("|")
    prefix = number[:2] if number[:2].isalpha() else "eq"
    number = number[2:] if number[:2].isalpha() else number
    if system and value.get("system") != system:
        return False
    if code and code not in (value.get("code"), value.get("unit")):
        return False
    v, q = Decimal(str(value["value"])), Decimal(number)
    half = Decimal(5).scaleb(q.as_tuple().exponent - 1)  # type: ignore[operator]
    return {"eq": q - half <= v < q + half, "gt": v > q, "lt": v < q, "ge": v >= q,
            "le": v <= q, "ne": not (q - half <= v < q + half)}[prefix]


def reference_matches(value: Any, query: str) -> bool:
    ref = value.get("reference", "") if isinstance(value, dict) else ""
    return bool(ref) and (ref == query or ref.endswith("/" + query))


def matches(resource: dict[str, Any], rtype: str, param: str, ptype: str,
            query: str) -> bool | None:
    """Does ``resource`` match ``param=query`` (comma: any of the values)?"""
    verdicts: list[bool | None] = []
    for one in query.split(","):
        for value in values_of(resource, rtype, param):
            if ptype == "token":
                verdicts.append(token_matches(value, one))
            elif ptype == "string":
                verdicts.append(string_matches(value, one))
            elif ptype == "date":
                verdicts.append(date_matches(value, one))
            elif ptype == "quantity":
                verdicts.append(quantity_matches(value, one))
            elif ptype == "reference":
                verdicts.append(reference_matches(value, one))
    if True in verdicts:
        return True
    return None if None in verdicts else False


def queries_for(value: Any, ptype: str) -> list[str]:
    """Search values a consumer would send to find ``value`` (from a served resource)."""
    if ptype == "token":
        return token_candidates(value)
    if ptype == "string" and isinstance(value, str) and value:
        return [value, value[: max(1, len(value) // 2)].lower()]
    if ptype == "reference" and isinstance(value, dict) and "/" in value.get("reference", ""):
        ref = value["reference"]
        return [ref, ref.rpartition("/")[2]]
    if ptype == "quantity" and isinstance(value, dict) and "value" in value:
        tail = f"|{value.get('system', '')}|{value.get('code', '')}"
        return [f"{value['value']}{tail}", f"gt{value['value']}{tail}",
                f"le{value['value']}{tail}"]
    if ptype == "date":
        text = value.get("start") if isinstance(value, dict) else value
        if not isinstance(text, str):
            return []
        day = text[:10]
        out = [f"ge{day}", f"lt{day}", f"le{day[:7]}", f"gt{day[:4]}"]
        if isinstance(value, str):
            out.insert(0, value if len(value) <= 10 or "+" in value or "Z" in value else day)
            out.append(f"eq{day}")
        return out
    return []


def short(resources: Iterable[dict[str, Any]]) -> list[str]:
    return sorted(r["id"] for r in resources)[:10]


# ---- the walk ---------------------------------------------------------------------------------

def claimed(capability: dict[str, Any]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for res in capability["rest"][0]["resource"]:
        out[res["type"]] = {p["name"]: p["type"] for p in res.get("searchParam", [])}
    return out


def check_type(c: Consumer, rtype: str, params: dict[str, str],
               scope: list[tuple[str, str]]) -> None:
    """Every claimed parameter of ``rtype``, within the population ``scope`` selects."""
    population, error = c.walk(rtype, scope)
    where = "&".join(f"{k}={v}" for k, v in scope) or "(all)"
    if error:
        c.report.gap(f"{rtype}?{where}: {error}")
        return
    if not population:
        return
    by_id = {r["id"]: r for r in population}
    if "identifier" not in params and any(r.get("identifier") for r in population):
        # the obvious one: a consumer given a record's identifier can find the record by it
        c.report.gap(f"{rtype} serves identifier but 'identifier' is not a search parameter")
    for param, ptype in sorted(params.items()):
        if param == "_id" or param not in PATHS.get(rtype, {}):
            if param != "_id":
                c.report.gap(f"{rtype}: claimed parameter {param!r} is not an STU3 parameter "
                             "this checker knows")
            continue
        queries: list[str] = []
        for res in population:
            for value in values_of(res, rtype, param):
                for q in queries_for(value, ptype):
                    if q not in queries:
                        queries.append(q)
            if len(queries) >= 4 * VALUES_PER_PARAM:
                break
        if not queries:
            continue  # nothing in this population holds the element
        c.report.covered.setdefault(rtype, set()).add(param)
        # a few distinct values, the comma (OR) form of two of them too
        picked = queries[: 4 * VALUES_PER_PARAM:max(1, len(queries) // (3 * VALUES_PER_PARAM))]
        if ptype in ("token", "reference") and len(queries) > 1:
            picked.append(f"{queries[0]},{queries[-1]}")
        for q in picked:
            c.report.checks += 1
            got, error = c.walk(rtype, [*scope, (param, q)])
            request = f"GET {rtype}?{where}&{param}={q}"
            if error:
                c.report.gap(f"{request} -> {error}")
                continue
            required = {i for i, r in by_id.items()
                        if matches(r, rtype, param, ptype, q) is True}
            allowed = required | {i for i, r in by_id.items()
                                  if matches(r, rtype, param, ptype, q) is None}
            ids = {r["id"] for r in got}
            if not required <= ids or not ids <= allowed:
                c.report.gap(f"{request} -> missing {short(by_id[i] for i in required - ids)}"
                             f", unexpected {sorted(ids - allowed)[:10]}")


def check_unclaimed(c: Consumer, rtype: str, params: dict[str, str],
                    scope: list[tuple[str, str]]) -> None:
    unclaimed = [*sorted(set(PATHS.get(rtype, {})) - set(params)), "patinet"]
    for param in unclaimed:
        c.report.checks += 1
        r = c.get(rtype, [*scope, (param, "x")])
        request = f"GET {rtype}?{param}=x"
        body = r.json() if r.headers.get("content-type", "").startswith(
            "application/fhir+json") else {}
        code = body.get("issue", [{}])[0].get("details", {}).get("coding", [{}])[0].get("code")
        text = body.get("issue", [{}])[0].get("diagnostics", "")
        if (r.status_code != 400 or body.get("resourceType") != "OperationOutcome"
                or code != "UNKNOWN_PARAMETER" or param not in text):
            c.report.gap(f"{request} (not claimed) -> {r.status_code} {r.text[:200]}")


def check_includes(c: Consumer, rtype: str, includes: list[str],
                   scope: list[tuple[str, str]]) -> None:
    """Each claimed ``_include``: the page's included resources are exactly those its matches
    refer to through that parameter (to the named target type, if any)."""
    for inc in includes:
        _, param, *target = inc.split(":")
        if param not in PATHS.get(rtype, {}):
            c.report.gap(f"{rtype}: claimed _include {inc} on a parameter this checker "
                         "does not know")
            continue
        c.report.checks += 1
        r = c.get(rtype, [*scope, ("_count", "10"), ("_include", inc)])
        request = f"GET {rtype}?{'&'.join(f'{k}={v}' for k, v in scope)}&_include={inc}"
        if r.status_code != 200:
            c.report.gap(f"{request} -> {r.status_code} {r.text[:200]}")
            continue
        entries = r.json().get("entry", [])
        refs = {v["reference"] for e in entries if e["search"]["mode"] == "match"
                for v in values_of(e["resource"], rtype, param)
                if isinstance(v, dict) and "/" in v.get("reference", "")}
        if target:
            refs = {x for x in refs if x.startswith(target[0] + "/")}
        got = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries
               if e["search"]["mode"] == "include"}
        if got != refs:
            c.report.gap(f"{request} -> included {sorted(got)[:10]}, referenced "
                         f"{sorted(refs)[:10]}")


def check_revincludes(c: Consumer, rtype: str, revincludes: list[str], rid: str) -> None:
    """Each claimed ``_revinclude`` onto ``rtype/rid``: exactly the resources whose parameter
    refers to it (as that type's own search finds them), or a capped subset said so."""
    for rev in revincludes:
        source, param = rev.split(":")[:2]
        c.report.checks += 1
        scope = [("_id", rid)]
        r = c.get(rtype, [*scope, ("_revinclude", rev)])
        request = f"GET {rtype}?_id={rid}&_revinclude={rev}"
        if r.status_code != 200:
            c.report.gap(f"{request} -> {r.status_code} {r.text[:200]}")
            continue
        entries = r.json().get("entry", [])
        got = {e["resource"]["id"] for e in entries if e["search"]["mode"] == "include"
               and e["resource"]["resourceType"] == source}
        capped = any(i.get("details", {}).get("coding", [{}])[0].get("code") == "INCLUDE_LIMIT"
                     for e in entries if e["search"]["mode"] == "outcome"
                     for i in e["resource"]["issue"])
        # a Patient search needs a second parameter (Care Connect): one that matches everyone
        everyone = [("gender", "male,female,other,unknown")] if source == "Patient" else []
        expected, error = c.walk(source, [(param, f"{rtype}/{rid}"), *everyone])
        if error:
            c.report.gap(f"GET {source}?{param}={rtype}/{rid} -> {error}")
            continue
        want = {x["id"] for x in expected}
        if not (got <= want if capped else got == want):
            c.report.gap(f"{request} -> {len(got)} included, {len(want)} refer to it"
                         f"{' (capped)' if capped else ''}: missing {sorted(want - got)[:5]}, "
                         f"unexpected {sorted(got - want)[:5]}")


def patients_with_records(c: Consumer, count: int) -> list[str]:
    """Patients to sample: the documented rich one, then whoever has the most types."""
    chosen = ["100001"]
    for rtype in ("Immunization", "AllergyIntolerance", "Procedure", "Flag"):
        r = c.get(rtype, [("_count", "50")])
        for e in r.json().get("entry", []):
            ref = (values_of(e["resource"], rtype, "patient") or [{}])[0].get("reference", "")
            pid = ref.rpartition("/")[2]
            if pid and pid not in chosen:
                chosen.append(pid)
                break
        if len(chosen) >= count:
            break
    return chosen


def run(base: str, headers: dict[str, str] | None = None, patients: int = 3) -> Report:
    c = Consumer(base, headers)
    cap = c.get("metadata")
    if cap.status_code != 200:
        c.report.gap(f"GET metadata -> {cap.status_code}")
        return c.report
    claims = claimed(cap.json())
    resources = {r["type"]: r for r in cap.json()["rest"][0]["resource"]}
    if "Medication" in claims:
        medications, error = c.walk("Medication", [])
        if error:
            c.report.gap(f"GET Medication -> {error}")
        MEDICATIONS.update((m["id"], m) for m in medications)
    for pid in patients_with_records(c, patients):
        for rtype, pparam in PATIENT_PARAM.items():
            if rtype not in claims:
                c.report.gap(f"{rtype} is not in the CapabilityStatement")
                continue
            if pparam not in claims[rtype]:
                c.report.gap(f"{rtype}: no {pparam} search claimed")
                continue
            check_type(c, rtype, claims[rtype], [(pparam, pid)])
            if pid == "100001":
                check_unclaimed(c, rtype, claims[rtype], [(pparam, pid)])
    for rtype in WHOLE:
        if rtype not in claims:
            c.report.gap(f"{rtype} is not in the CapabilityStatement")
            continue
        check_type(c, rtype, claims[rtype], [])
        check_unclaimed(c, rtype, claims[rtype], [])
    for rtype, wanted in sorted(EXPLORE.items()):
        missing = sorted(wanted - set(claims.get(rtype, {})))
        if missing:
            c.report.gap(f"{rtype}: the explore page's parameters not claimed: {missing}")
    for rtype, pparam in PATIENT_PARAM.items():
        check_includes(c, rtype, resources.get(rtype, {}).get("searchInclude", []),
                       [(pparam, "100001")])
    for rtype in WHOLE:
        check_includes(c, rtype, resources.get(rtype, {}).get("searchInclude", []), [])
    # revincludes onto a record every one of them can point at: the rich patient's, and
    # what its first resources refer to
    targets = {"Patient": "100001"}
    for rtype in ("Observation", "MedicationRequest", "Encounter"):
        first = c.get(rtype, [("patient", "100001"), ("_count", "3")])
        for e in first.json().get("entry", []) if first.status_code == 200 else []:
            text = str(e["resource"])
            for kind in ("Practitioner", "Organization", "Location", "Medication", "Encounter"):
                found = re.search(rf"'{kind}/([A-Za-z0-9.-]+)'", text)
                if found and kind not in targets:
                    targets[kind] = found.group(1)
    for rtype, rid in sorted(targets.items()):
        check_revincludes(c, rtype, resources.get(rtype, {}).get("searchRevInclude", []), rid)
        c.report.covered.setdefault("_revinclude", set()).add(rtype)
    for rtype in [*PATIENT_PARAM, *WHOLE]:
        never = sorted(set(claims.get(rtype, {})) - {"_id"} - c.report.covered.get(rtype, set()))
        if never:
            c.report.gap(f"{rtype}: claimed parameters with no value in the sampled data, "
                         f"not exercised: {never}")
    c.http.close()
    return c.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="FHIR base URL, e.g. http://127.0.0.1:8080/STU3")
    parser.add_argument("--token", help="bearer token")
    parser.add_argument("--patients", type=int, default=3)
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    report = run(args.base, headers, args.patients)
    for line in report.findings:
        print(line)
    print(f"{report.checks} checks, {report.requests} requests, "
          f"{len(report.findings)} findings", file=sys.stderr)
    return 1 if report.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
