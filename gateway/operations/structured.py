"""Declared "structured record" operations: a fixed, parameterised extract of a patient's record
(the Care Connect guidance's ``$getAll`` idea), declared in YAML by the trust.

``<mapping dir>/operations/*.yaml`` each declare one operation, invoked as
``Patient/[id]/$<name>`` (GET or POST): its parameters (boolean, integer or date, with
defaults and bounds) and its sections. Each section is one resource type of the patient's
compartment, narrowed by fixed search values, a date parameter and a count, sorted by a
declared ``_sort`` key; it becomes a ``List`` (CareConnect-List-1) in a ``collection``
Bundle, with the patient, the section's resources and what they refer to. A type with
several sources is merged across them (gateway.multisource), one statement per source.

An empty section says why (``List.emptyReason``):

* ``nilknown`` (STU3 list-empty-reason) when every record found is the source's explicit
  "nothing known" record, which the section declares (``nothing_known``: a code on an
  element, e.g. SNOMED 716186003 No known allergy on ``code``);
* ``notasked`` (STU3 list-empty-reason) when the section declares ``nothing_known`` (the
  source records "nothing known" explicitly, so its absence means something) and the patient
  has no record of the type at all — not even one the section's filters leave out;
* ``no-content-recorded`` (CareConnect-ListEmptyReasonCode-1) when nothing the section asks
  for is recorded — which is not the same as "none";
* ``withheld`` when the client's scopes do not allow reading the type;
* ``unavailable`` when a source did not answer (with a warning entry; under the client's
  explicit ``Prefer: handling=strict``: the source's 502/503/504, as a multi-source search).

A referenced Practitioner/Organization/Location/Medication whose source does not answer is
left out with a ``SOURCE_UNAVAILABLE`` warning naming it, as in ``$everything`` (strict: the
502/503/504).

Everything is checked when the gateway starts (``careconnect-gateway mappings check``
too), every problem reported as ``file:line: key: message``. The OperationDefinition is
generated from the declaration and served at ``OperationDefinition/<name>``.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from gateway import audit, compartment
from gateway.auth import authorize
from gateway.errors import InvalidParameter, NotFound, UnknownParameter
from gateway.mapping.loader import MappingError, Problem, read_model
from gateway.mapping.yamlfile import line_of
from gateway.operations import record
from gateway.operations.base import Context, Invocation, Operation, Parameter
from gateway.operations.params import input_pairs
from gateway.providers import source_name
from gateway.randomness import uuid4
from gateway.registry import Registry

OPERATIONS_DIR = "operations"
LIST_PROFILE = "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-List-1"
CC_EMPTY = "https://fhir.hl7.org.uk/STU3/CodeSystem/CareConnect-ListEmptyReasonCode-1"
FHIR_EMPTY = "http://hl7.org/fhir/list-empty-reason"
EMPTY_REASONS = {
    "nilknown": (FHIR_EMPTY, "nilknown", "Nil Known"),
    "notasked": (FHIR_EMPTY, "notasked", "Not Asked"),
    "no-content-recorded": (CC_EMPTY, "no-content-recorded", "No Content Recorded"),
    "withheld": (FHIR_EMPTY, "withheld", "Information Withheld"),
    "unavailable": (FHIR_EMPTY, "unavailable", "Unavailable"),
}
_NAME = re.compile(r"^[a-z][A-Za-z0-9-]{0,63}$")
_FHIR_TYPES = {"boolean": "boolean", "integer": "integer", "date": "date"}


# --- the file ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Strict):
    type: Literal["boolean", "integer", "date"]
    default: bool | int | str | None = None
    min: int | None = None
    max: int | None = None
    documentation: str | None = None

    @model_validator(mode="after")
    def _fits(self) -> ParamSpec:
        if (self.min is not None or self.max is not None) and self.type != "integer":
            raise ValueError("min and max are for integer parameters")
        if self.default is None:
            return self
        ok = {"boolean": isinstance(self.default, bool),
              "integer": isinstance(self.default, int) and not isinstance(self.default, bool),
              "date": isinstance(self.default, str)}[self.type]
        if not ok:
            raise ValueError(f"default must be a {self.type}")
        return self


class CodingSpec(_Strict):
    system: str
    code: str
    display: str | None = None


class NothingKnown(_Strict):
    """The source's explicit "nothing known" record: ``element`` (a CodeableConcept or Coding
    of the resource, e.g. ``code``) holding this system and code."""

    element: str
    system: str
    code: str


class SectionSpec(_Strict):
    title: str
    resource: str
    code: CodingSpec | None = None
    search: dict[str, str] = Field(default_factory=dict)
    """Fixed search values (the type's own search parameters), e.g. ``{class: IMP,SS}``."""
    include_if: str | None = None
    """A boolean parameter: the section is left out when it is false."""
    count: int | str = 50
    """How many (at most): a number or an integer parameter."""
    sort: str | None = None
    """A ``_sort`` key of the type (``-date``: the most recent first)."""
    from_date: str | None = None
    """A date parameter: only resources whose ``date_search`` is on or after it."""
    date_search: str = "date"
    """The type's date search parameter ``from_date`` narrows (``effective``, ``authoredon``)."""
    nothing_known: NothingKnown | None = None


class OperationFile(_Strict):
    name: str
    title: str
    description: str | None = None
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    sections: list[SectionSpec]


def load_operations(directory: Path, registry: Registry) -> list[StructuredRecord]:
    """Every ``operations/*.yaml`` of a mapping directory, checked against what the registry
    serves; MappingError (file:line for every problem) if any is wrong."""
    problems: list[Problem] = []
    out: list[StructuredRecord] = []
    names: dict[str, Path] = {}
    for path in sorted((directory / OPERATIONS_DIR).glob("*.yaml")):
        found = read_model(path, OperationFile, problems)
        if found is None:
            continue
        doc, spec = found
        before = len(problems)
        _check(path, doc, spec, registry, problems)
        if spec.name in names:
            problems.append(Problem(path, line_of(doc, ["name"]),
                                    f"name: {spec.name!r} is declared by {names[spec.name].name}"))
        names[spec.name] = path
        if len(problems) == before:
            out.append(StructuredRecord(spec))
    if problems:
        raise MappingError(problems)
    return out


def _check(path: Path, doc: Any, spec: OperationFile, registry: Registry,
           problems: list[Problem]) -> None:
    def bad(loc: list[Any], message: str) -> None:
        where = ".".join(str(p) for p in loc)
        problems.append(Problem(path, line_of(doc, loc), f"{where}: {message}"))

    if not _NAME.match(spec.name):
        bad(["name"], "a name is a letter then letters, digits or '-' (it becomes $name)")
    if spec.name in ("everything", "validate"):
        bad(["name"], f"${spec.name} is built in")
    for pname in spec.parameters:
        if not _NAME.match(pname):
            bad(["parameters", pname], "a parameter name is a letter then letters, digits, '-'")
    for i, sec in enumerate(spec.sections):
        at: list[Any] = ["sections", i]
        if sec.resource not in registry:
            bad([*at, "resource"], f"{sec.resource} is not served by this mapping directory")
            continue
        tp = registry.get(sec.resource)
        if not any(compartment.link(s).kind == "reference" for s in tp.sources):
            bad([*at, "resource"], f"{sec.resource} is not linked to a patient (no Patient "
                                   "reference search parameter)")
        for pname in sec.search:
            if pname not in tp.params:
                bad([*at, "search", pname], f"{sec.resource} has no search parameter {pname!r}"
                                            " (on every source)")
        for key, want in (("include_if", "boolean"), ("from_date", "date")):
            ref = getattr(sec, key)
            if ref is not None and (ref not in spec.parameters
                                    or spec.parameters[ref].type != want):
                bad([*at, key], f"{ref!r} is not a declared {want} parameter")
        if isinstance(sec.count, str) and (sec.count not in spec.parameters
                                           or spec.parameters[sec.count].type != "integer"):
            bad([*at, "count"], f"{sec.count!r} is not a declared integer parameter")
        if isinstance(sec.count, int) and not 1 <= sec.count <= 1000:
            bad([*at, "count"], "a count is between 1 and 1000")
        if sec.sort is not None and sec.sort.lstrip("-") not in tp.sortable:
            bad([*at, "sort"], f"{sec.resource} cannot be sorted by {sec.sort.lstrip('-')!r} "
                               f"(sortable: {', '.join(tp.sortable) or 'nothing'})")
        if sec.from_date is not None and (sec.date_search not in tp.params
                                          or tp.params[sec.date_search].type != "date"):
            bad([*at, "date_search" if "date_search" in doc["sections"][i] else "from_date"],
                f"{sec.resource} has no date search parameter {sec.date_search!r}")


# --- the operation ----------------------------------------------------------------------------


class StructuredRecord(Operation):
    levels = frozenset({"instance"})
    resource_types = ("Patient",)

    def __init__(self, spec: OperationFile) -> None:
        self.spec = spec
        self.name = spec.name
        self.definition_url = f"OperationDefinition/{spec.name}"
        self.parameters = (
            *(Parameter(n, _FHIR_TYPES[p.type], documentation=p.documentation or "")
              for n, p in spec.parameters.items()),
            Parameter("return", "Bundle", use="out", min=1,
                      documentation="A collection Bundle: the patient, a List per section, "
                                    "the resources listed and what they refer to"),
        )
        types = sorted({s.resource for s in spec.sections})
        self.scopes = ("read of Patient; a section whose type the scopes do not allow is an "
                       f"empty List (withheld). Types: {', '.join(types)}")

    def definition_reference(self, base_url: str) -> str:
        return f"{base_url}/OperationDefinition/{self.spec.name}"

    def definition(self, base_url: str) -> dict[str, Any] | None:
        out: dict[str, Any] = {
            "resourceType": "OperationDefinition",
            "id": self.spec.name,
            "url": self.definition_reference(base_url),
            "name": self.spec.title,
            "status": "active",
            "kind": "operation",
            "idempotent": True,
            "code": self.spec.name,
            "resource": ["Patient"],
            "system": False,
            "type": False,
            "instance": True,
            "parameter": [p.definition() for p in self.parameters],
        }
        if self.spec.description:
            out["description"] = self.spec.description
        return out

    def _inputs(self, pairs: list[tuple[str, str]], strict: bool) -> dict[str, Any]:
        values: dict[str, Any] = {n: p.default for n, p in self.spec.parameters.items()}
        for name, raw in pairs:
            if name in ("_format", "_pretty"):
                continue
            spec = self.spec.parameters.get(name)
            if spec is None:
                if strict:
                    raise UnknownParameter(f"unknown parameter '{name[:64]}' for ${self.name}")
                continue
            if spec.type == "boolean":
                if raw not in ("true", "false"):
                    raise InvalidParameter(f"'{name}' is true or false")
                values[name] = raw == "true"
            elif spec.type == "integer":
                if not re.fullmatch(r"-?\d{1,9}", raw):
                    raise InvalidParameter(f"'{name}' is an integer")
                n = int(raw)
                if (spec.min is not None and n < spec.min) or (spec.max is not None
                                                               and n > spec.max):
                    raise InvalidParameter(f"'{name}' is between {spec.min} and {spec.max}")
                values[name] = n
            else:
                values[name] = record.parse_day(name, raw)
        return values

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request, pid = call.request, call.rid
        assert pid is not None
        fmt = ctx.fmt(request)
        principal = authorize.require(request, "Patient", "r")
        strict = ctx.strict(request)
        values = self._inputs(await input_pairs(request, ctx.settings.max_body_bytes), strict)
        patient = await ctx.registry.get("Patient").read(pid)
        if patient is None:
            raise NotFound("Patient with that id was not found")
        base = ctx.base_url(request)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        lists: list[dict[str, Any]] = []
        listed: dict[tuple[str, str], dict[str, Any]] = {}
        failed: list[str] = []
        touched: dict[str, None] = {"Patient": None}
        for sec in self.spec.sections:
            if sec.include_if is not None and not values.get(sec.include_if):
                continue
            asked = len(failed)
            found, reason = await self._section(ctx, sec, pid, values, principal,
                                                ctx.whole(request), failed)
            items = []
            for res in found:
                listed[(res["resourceType"], res["id"])] = res
                touched[res["resourceType"]] = None
                if reason is None:
                    items.append({"item": {"reference": f"{res['resourceType']}/{res['id']}"}})
            # A List with entries but a source missing says so itself, not only the Bundle.
            lists.append(_list(sec, pid, now, items, reason,
                               failed[asked:] if reason is None else []))
        resources = list(listed.values())
        # Referenced types the scopes do not allow are said (never a silent gap), as in
        # $everything: the extract holds references the client cannot follow.
        wanted = record.referenced_ids(resources)
        unread = record.referenced_denied(ctx.registry, wanted, principal, None)
        # A referenced type whose source does not answer is left out and said, as a section
        # is (strict: its error is the answer).
        gaps: list[str] = []
        included = await record.referenced_of(ctx.registry, wanted, principal, None,
                                              None if ctx.whole(request) else gaps)
        failed += [f"{g}; the resources of that type the record refers to are not included"
                   for g in gaps]
        for r in included:
            touched[r["resourceType"]] = None
        entries = [{"fullUrl": f"{base}/Patient/{pid}", "resource": patient}]
        entries += [{"fullUrl": f"urn:uuid:{uuid4()}", "resource": lst} for lst in lists]
        entries += [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r}
                    for r in [*resources, *included]]
        notes = record.warnings(failed)
        notes += record.warnings([record.unread_note(unread)] if unread else [], "NOT_INCLUDED")
        for w in notes:
            entries.append({"fullUrl": f"urn:uuid:{uuid4()}", "resource": w["resource"]})
        audit.note_operation(self.name, pid, list(touched))
        body = {"resourceType": "Bundle", "id": uuid4(), "meta": {"lastUpdated": now},
                "type": "collection", "entry": entries}
        return ctx.respond(body, fmt)

    async def _section(self, ctx: Context, sec: SectionSpec, pid: str, values: dict[str, Any],
                       principal: Any, strict: bool, failed: list[str]
                       ) -> tuple[list[dict[str, Any]], str | None]:
        """The section's resources, and why its List is empty (None: it is not); ``strict``:
        a source that does not answer fails the request rather than the section."""
        tp = ctx.registry.get(sec.resource)
        if not principal.allows(sec.resource, "r"):
            return [], "withheld"
        count = values.get(sec.count) if isinstance(sec.count, str) else sec.count
        pairs = [*sec.search.items(), ("_count", str(count or 1))]
        if sec.sort:
            pairs.append(("_sort", sec.sort))
        if sec.from_date and values.get(sec.from_date):
            pairs.append((sec.date_search, f"ge{values[sec.from_date]}"))
        s = ctx.settings
        return await record.declared_section(
            ctx.registry, tp, pairs, int(count or 1), pid, title=sec.title,
            nothing_known=sec.nothing_known, whole=strict, failed=failed,
            default_count=s.default_count, max_count=s.max_count)


def _list(sec: SectionSpec, pid: str, now: str, items: list[dict[str, Any]],
          reason: str | None, missing: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "List",
        "meta": {"profile": [LIST_PROFILE]},
        "status": "current",
        "mode": "snapshot",
        "title": sec.title,
    }
    if sec.code is not None:
        coding = {"system": sec.code.system, "code": sec.code.code}
        if sec.code.display:
            coding["display"] = sec.code.display
        out["code"] = {"coding": [coding]}
    out["subject"] = {"reference": f"Patient/{pid}"}
    out["date"] = now
    if missing:
        out["note"] = [{"text": "Incomplete: " + "; ".join(missing)}]
    if items:
        out["entry"] = items
    else:
        system, code, display = EMPTY_REASONS[reason or "no-content-recorded"]
        out["emptyReason"] = {"coding": [{"system": system, "code": code, "display": display}],
                              "text": display}
    return out


__all__ = ["EMPTY_REASONS", "OPERATIONS_DIR", "StructuredRecord", "load_operations",
           "source_name"]
