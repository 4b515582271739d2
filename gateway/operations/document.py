"""``$document``: a FHIR document Bundle generated on demand from declared sections.

``<mapping dir>/documents/*.yaml`` each declare one document type: whom it is about
(``subject: Encounter`` — ``Encounter/[id]/$document``, e.g. a discharge summary — or
``subject: Patient``), its Composition type, and its sections: each one resource type,
linked to the encounter (``encounter``: the section type's Encounter reference parameter)
or to the patient, narrowed by fixed search values, sorted and counted, with the columns
its narrative table shows. The resources come from the registry's providers and the same
compiled mappings as any search; each source is restricted to the patient (the
compartment's own link) as ``$everything`` is.

The answer is a ``document`` Bundle: the Composition (CareConnect-Composition-1) first,
then the patient, the encounter, every section's resources and what they refer to, and the
gateway as the Composition's author (a Device: the document is machine-generated). A facade
stores nothing: ``persist=true`` is 422. Narratives (Composition and each section) are
generated XHTML; ``_format=html`` or ``Accept: text/html`` returns an HTML page of it.

Deterministic: the same request over unchanged data gives the same bytes. Ids (Bundle,
Composition, Device) are UUIDv5 of the document type, the subject and the content;
``Bundle.meta.lastUpdated`` and ``Composition.date`` are the latest ``meta.lastUpdated`` of
the resources in it (for a discharge summary at least the encounter's end), never the clock.

An empty section says why in ``emptyReason``, as a structured record's List does (the same
function, record.declared_section): ``nilknown`` (its only records are the declared "nothing
known" one: shown in the narrative and carried in the Bundle, but not listed as entries —
STU3 cmp-2), ``notasked`` (it declares ``nothing_known`` and the patient has no record of
the type at all), ``no-content-recorded``, ``unavailable``.

A section whose source does not answer does not fail the document (as a multi-source search
and ``$everything``): the section says so — ``emptyReason`` ``unavailable`` when it has
nothing, an "Incomplete" line in its narrative when other sources gave entries — the
Composition's narrative lists what is missing, and its status is ``preliminary`` (STU3: the
content may be incomplete), never ``final``. A client that wants all or nothing sends
``Prefer: handling=strict`` and gets the source's 502/503/504. The source of a referenced
Practitioner/Organization/Location/Medication not answering is that error whatever the
client prefers: a document holds what it refers to (its sections' entries would refer to
nothing, a prescription to no drug).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway import audit, compartment
from gateway.auth import authorize
from gateway.errors import (
    InvalidParameter,
    NotFound,
    ResourceInvalid,
    UnknownParameter,
)
from gateway.formats import wants_html
from gateway.mapping.loader import MappingError, Problem, read_model
from gateway.mapping.yamlfile import line_of
from gateway.operations import narrative, record
from gateway.operations.base import Context, Invocation, Operation, Parameter
from gateway.operations.params import input_pairs
from gateway.operations.structured import EMPTY_REASONS, CodingSpec, NothingKnown
from gateway.registry import Registry

DOCUMENTS_DIR = "documents"
COMPOSITION_PROFILE = ("https://fhir.hl7.org.uk/STU3/StructureDefinition/"
                       "CareConnect-Composition-1")
DOCUMENT_ID_SYSTEM = "https://careconnect-gateway.github.io/fhir/Id/document"
_NS = uuid.UUID("0f4c7a52-3b1e-5d2a-9c6e-3f1a2b4c5d6e")
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_KNOWN = frozenset({"type", "persist", "_format", "_pretty"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(_Strict):
    header: str
    element: str
    """A dotted element path of the section's resource (``code``, ``onset``, ``dosage.text``)."""


class DocSection(_Strict):
    title: str
    code: CodingSpec | None = None
    resource: str
    encounter: str | None = None
    """The type's Encounter reference search parameter: the section holds what was recorded
    in the document's encounter; unset: everything of the patient's (narrowed by search)."""
    search: dict[str, str] = Field(default_factory=dict)
    sort: str | None = None
    count: int = Field(default=100, ge=1, le=1000)
    columns: list[Column]
    nothing_known: NothingKnown | None = None


class DocumentFile(_Strict):
    name: str
    title: str
    description: str | None = None
    subject: Literal["Encounter", "Patient"]
    default: bool = False
    """The document ``[subject]/[id]/$document`` returns without ``type``."""
    type: CodingSpec
    sections: list[DocSection]


def load_documents(directory: Path, registry: Registry) -> list[DocumentFile]:
    problems: list[Problem] = []
    out: list[DocumentFile] = []
    for path in sorted((directory / DOCUMENTS_DIR).glob("*.yaml")):
        found = read_model(path, DocumentFile, problems)
        if found is None:
            continue
        doc, spec = found

        def bad(loc: list[Any], message: str, path: Path = path, doc: Any = doc) -> None:
            problems.append(Problem(path, line_of(doc, loc),
                                    f"{'.'.join(str(p) for p in loc)}: {message}"))

        if spec.subject not in registry:
            bad(["subject"], f"{spec.subject} is not served by this mapping directory")
        if any(d.name == spec.name for d in out):
            bad(["name"], f"document type {spec.name!r} is declared twice")
        for i, sec in enumerate(spec.sections):
            at: list[Any] = ["sections", i]
            if sec.resource not in registry:
                bad([*at, "resource"], f"{sec.resource} is not served by this mapping directory")
                continue
            tp = registry.get(sec.resource)
            if not any(compartment.link(s).kind == "reference" for s in tp.sources):
                bad([*at, "resource"], f"{sec.resource} is not linked to a patient")
            for pname in sec.search:
                if pname not in tp.params:
                    bad([*at, "search", pname],
                        f"{sec.resource} has no search parameter {pname!r}")
            if sec.encounter and sec.encounter not in tp.params:
                bad([*at, "encounter"], f"{sec.resource} has no search parameter "
                                        f"{sec.encounter!r}")
            if sec.encounter and spec.subject != "Encounter":
                bad([*at, "encounter"], "only an Encounter document links sections to it")
            if sec.sort is not None and sec.sort.lstrip("-") not in tp.sortable:
                bad([*at, "sort"], f"{sec.resource} cannot be sorted by {sec.sort!r}")
        out.append(spec)
    for subject in ("Encounter", "Patient"):
        if sum(1 for d in out if d.subject == subject and d.default) > 1:
            problems.append(Problem(directory / DOCUMENTS_DIR, 1,
                                    f"more than one default document for {subject}"))
    if problems:
        raise MappingError(problems)
    return out


class Document(Operation):
    name = "document"
    levels = frozenset({"instance"})

    def __init__(self, documents: list[DocumentFile]) -> None:
        self.documents = documents
        self.resource_types = tuple(sorted({d.subject for d in documents}))
        self.definition_url = "OperationDefinition/document"
        names = ", ".join(f"{d.name} ({d.subject})" for d in documents)
        self.parameters = (
            Parameter("type", "code", documentation=f"The document type: {names}"),
            Parameter("persist", "boolean",
                      documentation="Only false: this server stores nothing"),
            Parameter("return", "Bundle", use="out", min=1,
                      documentation="A document Bundle, the Composition first"),
        )
        types = sorted({s.resource for d in documents for s in d.sections})
        self.scopes = ("read of the subject (Encounter or Patient), of Patient, and of every "
                       f"type the document's sections hold: {', '.join(types)}")

    def definition_reference(self, base_url: str) -> str:
        return f"{base_url}/OperationDefinition/document"

    def definition(self, base_url: str) -> dict[str, Any] | None:
        return {
            "resourceType": "OperationDefinition", "id": "document",
            "url": self.definition_reference(base_url), "name": "Generate a document",
            "status": "active", "kind": "operation", "idempotent": True, "code": "document",
            "description": "; ".join(f"{d.name}: {d.title}" for d in self.documents),
            "resource": sorted({d.subject for d in self.documents}), "system": False, "type": False,
            "instance": True, "parameter": [p.definition() for p in self.parameters]}

    def _choose(self, subject: str, pairs: list[tuple[str, str]], strict: bool) -> DocumentFile:
        wanted: str | None = None
        for name, raw in pairs:
            if name not in _KNOWN:
                if strict:
                    raise UnknownParameter(f"unknown parameter '{name[:64]}' for $document")
            elif name == "persist" and raw != "false":
                if raw == "true":
                    raise ResourceInvalid([("persist", "this server does not store documents "
                                                       "(a facade): only persist=false")])
                raise InvalidParameter("'persist' is true or false")
            elif name == "type":
                wanted = raw
        mine = [d for d in self.documents if d.subject == subject]
        if wanted is None:
            found = next((d for d in mine if d.default), mine[0] if len(mine) == 1 else None)
            if found is None:
                raise InvalidParameter("'type' is required here: "
                                       + ", ".join(d.name for d in mine))
            return found
        for d in mine:
            if d.name == wanted:
                return d
        raise InvalidParameter(f"no document type of that name for {subject}: "
                               + ", ".join(d.name for d in mine))

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request, rid, provider = call.request, call.rid, call.provider
        assert rid is not None and provider is not None
        html = wants_html(request.headers.get("accept"), request.query_params.get("_format"))
        if not html:
            fmt = ctx.fmt(request)
        subject = provider.resource_type
        strict = ctx.strict(request)
        spec = self._choose(subject, await input_pairs(request, ctx.settings.max_body_bytes),
                            strict)
        # Every type the document holds, checked before anything is read.
        principal = authorize.require(request, subject, "r")
        for rtype in sorted({"Patient", *(s.resource for s in spec.sections)}):
            authorize.require(request, rtype, "r")
        encounter: dict[str, Any] | None = None
        if subject == "Encounter":
            encounter = await provider.read(rid)
            if encounter is None:
                raise NotFound("Encounter with that id was not found")
            ref = (encounter.get("subject") or {}).get("reference", "")
            pid = ref.partition("/")[2] if ref.startswith("Patient/") else ""
            if not pid:
                raise NotFound("the Encounter has no patient")
        else:
            pid = rid
        patient = await ctx.registry.get("Patient").read(pid)
        if patient is None:
            raise NotFound("Patient with that id was not found")
        failed: list[str] = []
        found: list[tuple[DocSection, list[dict[str, Any]], str | None]] = []
        for sec in spec.sections:
            items, reason = await _section(ctx, sec, pid, rid if encounter else None,
                                           ctx.whole(request), failed)
            found.append((sec, items, reason))
        held: dict[tuple[str, str], dict[str, Any]] = {}
        for _, items, _ in found:
            for r in items:
                held.setdefault((r["resourceType"], r["id"]), r)
        resources = list(held.values())
        cited = [*resources, *([encounter] if encounter else [])]
        # A document holds what it refers to: as for its sections, every type needs read
        # (a 403 naming it), never a document with references silently left dangling.
        wanted = record.referenced_ids(cited)
        for rtype in record.referenced_denied(ctx.registry, wanted, principal, None):
            authorize.require(request, rtype, "r")
        # A referenced type whose source does not answer is its 502/503/504, unlike a
        # section (which leaves no reference behind): a document of prescriptions whose
        # Medications are missing would hold references to nothing, and drug names lost.
        included = await record.referenced_of(ctx.registry, wanted, principal, None)
        body = build(spec, ctx.base_url(request), patient, encounter, found, resources,
                     included, failed)
        audit.note_operation("document", pid, list(dict.fromkeys(
            ["Patient", subject, *(r["resourceType"] for r in [*resources, *included])])))
        if html:
            comp = body["entry"][0]["resource"]
            return Response(narrative.page(comp["title"], comp), media_type="text/html; "
                            "charset=utf-8", headers={
                                "Content-Security-Policy": "default-src 'none'; "
                                                           "style-src 'unsafe-inline'",
                                "X-Content-Type-Options": "nosniff"})
        return ctx.respond(body, fmt)


async def _section(ctx: Context, sec: DocSection, pid: str, eid: str | None, strict: bool,
                   failed: list[str]) -> tuple[list[dict[str, Any]], str | None]:
    """The section's resources and why it is empty, as a structured record's List
    (record.declared_section): ``nilknown``, ``notasked``, ``no-content-recorded``,
    ``unavailable``."""
    tp = ctx.registry.get(sec.resource)
    pairs = [*sec.search.items(), ("_count", str(sec.count))]
    if sec.encounter and eid is not None:
        pairs.append((sec.encounter, f"Encounter/{eid}"))
    if sec.sort:
        pairs.append(("_sort", sec.sort))
    s = ctx.settings
    items, reason = await record.declared_section(
        ctx.registry, tp, pairs, sec.count, pid, title=sec.title,
        nothing_known=sec.nothing_known, whole=strict, failed=failed,
        default_count=s.default_count, max_count=s.max_count)
    if not sec.sort:  # a stable order whatever the backend's
        items.sort(key=lambda r: r["id"])
    return items, reason


def _coding(c: CodingSpec) -> dict[str, Any]:
    out = {"system": c.system, "code": c.code}
    if c.display:
        out["display"] = c.display
    return out


def _updated(r: dict[str, Any]) -> str:
    return str((r.get("meta") or {}).get("lastUpdated") or "")


def build(spec: DocumentFile, base: str, patient: dict[str, Any],
          encounter: dict[str, Any] | None,
          found: list[tuple[DocSection, list[dict[str, Any]], str | None]],
          resources: list[dict[str, Any]], included: list[dict[str, Any]],
          failed: list[str]) -> dict[str, Any]:
    """The document Bundle (pure: the same inputs give the same Bundle)."""
    everything = [patient, *([encounter] if encounter else []), *resources, *included]
    # What the document says, without its own ids: its ids and date derive from it.
    digest = hashlib.sha256(orjson.dumps(
        [spec.name, base, everything, [(s.title, [r["id"] for r in items], why)
                                       for s, items, why in found], failed],
        option=orjson.OPT_SORT_KEYS)).hexdigest()
    bundle_id = str(uuid.uuid5(_NS, f"bundle/{digest}"))
    comp_id = str(uuid.uuid5(_NS, f"composition/{digest}"))
    device_id = str(uuid.uuid5(_NS, "device/careconnect-gateway"))
    dates = [d for d in map(_updated, everything) if d]
    if encounter is not None:
        end = (encounter.get("period") or {}).get("end")
        if end:
            dates.append(end)
    date = max(dates, key=_instant_key) if dates else (patient.get("birthDate") or "1900-01-01")
    pref = f"Patient/{patient['id']}"
    sections: list[dict[str, Any]] = []
    for sec, items, why in found:
        out: dict[str, Any] = {"title": sec.title}
        if sec.code is not None:
            out["code"] = {"coding": [_coding(sec.code)]}
        if items and why is None:
            div = narrative.table([(c.header, c.element) for c in sec.columns], items)
            missing = [m for m in failed if m.startswith(f"section '{sec.title}':")]
            if missing:  # entries, but a source's are missing: the section says so
                div.append(narrative.paragraph("Incomplete: " + "; ".join(missing))[0])
        else:
            shown = ("Nothing known (recorded as such)" if why == "nilknown"
                     else EMPTY_REASONS[why or "no-content-recorded"][2])
            div = (narrative.table([(c.header, c.element) for c in sec.columns], items)
                   if why == "nilknown" else narrative.paragraph(shown))
        out["text"] = {"status": "generated", "div": narrative.to_xhtml(div)}
        out["mode"] = "snapshot"
        if items and why is None:  # cmp-2: a section that says why it is empty lists nothing
            out["entry"] = [{"reference": f"{r['resourceType']}/{r['id']}"} for r in items]
        if why is not None:
            system, code, display = EMPTY_REASONS[why]
            out["emptyReason"] = {"coding": [{"system": system, "code": code,
                                              "display": display}], "text": display}
        sections.append(out)
    facts = [("Patient", narrative.text_of(patient.get("name", [None])[0]
                                           if patient.get("name") else None)),
             ("NHS number", next((i.get("value", "") for i in patient.get("identifier") or ()
                                  if i.get("system") == "https://fhir.nhs.uk/Id/nhs-number"),
                                 "")),
             ("Date of birth", str(patient.get("birthDate", ""))),
             ("Document date", date)]
    if encounter is not None:
        facts.append(("Stay", narrative.text_of(encounter.get("period"))))
        facts.append(("Encounter", narrative.text_of(encounter.get("type"))
                      or narrative.text_of(encounter.get("class"))))
    facts = [(k, v) for k, v in facts if v]
    if failed:
        facts.append(("Incomplete", "; ".join(failed)))
    comp: dict[str, Any] = {
        "resourceType": "Composition",
        "id": comp_id,
        "meta": {"profile": [COMPOSITION_PROFILE]},
        "text": {"status": "generated", "div": narrative.to_xhtml(narrative.summary(
            spec.title, facts, [s["title"] for s in sections]))},
        "identifier": {"system": DOCUMENT_ID_SYSTEM, "value": f"urn:uuid:{comp_id}"},
        # STU3: "preliminary ... the content may be incomplete" — a source did not answer.
        "status": "preliminary" if failed else "final",
        "type": {"coding": [_coding(spec.type)]},
        "subject": {"reference": pref},
        "date": date,
        "author": [{"reference": f"urn:uuid:{device_id}"}],
        "title": spec.title,
    }
    if encounter is not None:
        comp["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
    comp["section"] = sections
    device = {"resourceType": "Device", "id": device_id,
              "type": {"text": "Care Connect Gateway (document generator)"},
              "manufacturer": "careconnect-gateway"}
    entries = [{"fullUrl": f"urn:uuid:{comp_id}", "resource": comp},
               {"fullUrl": f"urn:uuid:{device_id}", "resource": device}]
    entries += [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r}
                for r in everything]
    head: dict[str, Any] = {"resourceType": "Bundle", "id": bundle_id}
    if _INSTANT.match(date):  # a date alone (no resource has a time) is not an instant
        head["meta"] = {"lastUpdated": date}
    return {**head,
            "identifier": {"system": DOCUMENT_ID_SYSTEM, "value": f"urn:uuid:{bundle_id}"},
            "type": "document", "entry": entries}


def _instant_key(value: str) -> str:
    """Comparable form of a FHIR date/dateTime/instant (UTC where a zone is given)."""
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment.isoformat()


__all__ = ["DOCUMENTS_DIR", "Document", "DocumentFile", "load_documents"]
