"""The terminology operations: ``ConceptMap/$translate``, ``ValueSet/$expand``,
``ValueSet/$validate-code`` and ``CodeSystem/$lookup`` (FHIR STU3), over the terminology
providers (gateway.terminology.provider).

Inputs come as the URL's query, a form, or a ``Parameters`` resource (where a ``coding`` or
``codeableConcept`` may be given as such). Each needs read of its type (``r``): terminology is
not patient data, but it is served under the same scope rules as every other type.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from gateway import writes
from gateway.auth import authorize
from gateway.errors import BadRequest, NotFound, UnknownCode
from gateway.operations.base import Context, Invocation, Operation, Parameter
from gateway.operations.params import input_pairs, parameter_list
from gateway.randomness import uuid4
from gateway.terminology import conceptmaps
from gateway.terminology.content import Catalogue, Concept, Definition
from gateway.terminology.provider import ConceptMapProvider, TerminologyProvider

if TYPE_CHECKING:
    from gateway.registry import Registry

HL7 = "http://hl7.org/fhir/OperationDefinition/"
MAX_EXPANSION = 1000
Coding = dict[str, str]


async def _inputs(request: Request, ctx: Context) -> tuple[dict[str, list[str]], list[Coding]]:
    """Simple inputs by name, and the codings given as ``coding``/``codeableConcept``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    codings: list[Coding] = []
    if request.method == "POST" and ctype != "application/x-www-form-urlencoded" and ctype:
        body = await writes.read_body(request, ctx.settings.max_body_bytes)
        if body.get("resourceType") != "Parameters":
            raise BadRequest("the operation takes a Parameters resource (or a form)")
        pairs = list(request.query_params.multi_items())
        for p in parameter_list(body):
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise BadRequest("every Parameters.parameter needs a name")
            if isinstance(p.get("valueCoding"), dict):
                codings.append(_coding(p["valueCoding"]))
            elif isinstance(p.get("valueCodeableConcept"), dict):
                listed = p["valueCodeableConcept"].get("coding") or []
                if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
                    raise BadRequest("valueCodeableConcept.coding is not a list of Codings")
                codings += [_coding(c) for c in listed]
            else:
                value = next((p[k] for k in p if k.startswith("value")), None)
                if value is None or isinstance(value, (dict, list)):
                    raise BadRequest(f"parameter '{p['name'][:64]}' has no simple value")
                pairs.append((p["name"], ("true" if value else "false")
                              if isinstance(value, bool) else str(value)))
    else:
        pairs = await input_pairs(request, ctx.settings.max_body_bytes)
    out: dict[str, list[str]] = {}
    for k, v in pairs:
        out.setdefault(k, []).append(v)
    return out, codings


def _coding(c: dict[str, Any]) -> Coding:
    out: dict[str, Any] = {k: c[k] for k in ("system", "code", "display", "version") if k in c}
    if not isinstance(out.get("code"), str) or not all(isinstance(v, str) for v in out.values()):
        raise BadRequest("a Coding needs a code; its system, code, display and version are "
                         "strings")
    return out


def _one(inputs: dict[str, list[str]], name: str) -> str | None:
    values = inputs.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"parameter '{name}' is given more than once")
    return values[0]


def _provider(ctx: Context, rtype: str) -> TerminologyProvider:
    found = ctx.registry.terminology(rtype)
    assert found is not None  # the operation is registered only beside its provider
    return found


class _TerminologyOperation(Operation):
    methods = ("GET", "POST")

    def _code(self, inputs: dict[str, list[str]], codings: list[Coding]) -> list[Coding]:
        """The codings to work on: ``code`` + ``system`` (+ ``display``), or ``coding``."""
        code = _one(inputs, "code")
        if code is not None:
            given = {"code": code}
            for key in ("system", "display", "version"):
                value = _one(inputs, key)
                if value is not None:
                    given[key] = value
            codings = [given, *codings]
        if not codings:
            raise BadRequest(f"${self.name} needs a code (code and system, or a coding)")
        return codings


class Translate(_TerminologyOperation):
    name = "translate"
    levels = frozenset({"type", "instance"})
    resource_types = ("ConceptMap",)
    parameters = (
        Parameter("url", "uri", documentation="The ConceptMap to use (type level)"),
        Parameter("code", "code", documentation="The code to translate"),
        Parameter("system", "uri", documentation="The system of the code"),
        Parameter("coding", "Coding", documentation="The code as a Coding"),
        Parameter("target", "uri", documentation=(
            "A ValueSet held here (its url): only translations into its codes count (one "
            "defined by a filter cannot be expanded here: 422)")),
        Parameter("targetsystem", "uri", documentation="The system to translate into"),
        Parameter("reverse", "boolean",
                  documentation="Target to source: every local code that maps to the code"),
        Parameter("dependency", "string", documentation=(
            "Not accepted: the code maps have no dependencies (dependsOn); 400")),
        Parameter("result", "boolean", use="out", min=1),
        Parameter("message", "string", use="out"),
    )
    scopes = "read of ConceptMap"
    definition_url = HL7 + "ConceptMap-translate"

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request = call.request
        fmt = ctx.fmt(request)
        authorize.require(request, "ConceptMap", "r")
        provider = _provider(ctx, "ConceptMap")
        assert isinstance(provider, ConceptMapProvider)
        inputs, codings = await _inputs(request, ctx)
        if inputs.get("dependency"):
            raise BadRequest("$translate takes no dependency here: the code maps behind these "
                             "ConceptMaps translate a code on its own (no dependsOn)")
        target_url = _one(inputs, "target")
        members: set[tuple[str, str]] | None = None
        if target_url is not None:  # before any map is chosen: a bad target is the answer
            held = ctx.registry.terminology("ValueSet")
            catalogue: Catalogue | None = getattr(held, "catalogue", None)
            target_vs = catalogue.value_set(target_url) if catalogue is not None else None
            if catalogue is None or target_vs is None:
                raise NotFound("no ValueSet held here has the target's url")
            members = {(c.system, c.code) for c in catalogue.expand(target_vs)}
        reverse_raw = (_one(inputs, "reverse") or "false").lower()
        if reverse_raw not in ("true", "false"):
            raise BadRequest("reverse must be true or false")
        reverse = reverse_raw == "true"
        coding = self._code(inputs, codings)[0]
        system, code = coding.get("system"), coding["code"]
        target_system = _one(inputs, "targetsystem")
        base = ctx.base_url(request)
        if call.level == "instance":
            assert call.rid is not None
            cmap = provider.codemaps.get(call.rid)
            if cmap is None:
                raise NotFound("ConceptMap with that id was not found")
            candidates = [cmap]
        else:
            url = _one(inputs, "url")
            candidates = [c for c in provider.codemaps.values()
                          if url is None or conceptmaps.url(c, base) == url]
            if url is not None and not candidates:
                raise NotFound("no ConceptMap has that url")
            if system is None and url is None:
                raise BadRequest("$translate on the type needs the code's system (or a url)")
        # The direction decides which side the system and targetsystem name.
        frm = (lambda c: c.target_system) if reverse else conceptmaps.source_system
        to = conceptmaps.source_system if reverse else (lambda c: c.target_system)
        chosen = [c for c in candidates
                  if (system is None or frm(c) == system)
                  and (target_system is None or to(c) == target_system)]
        if not chosen:
            answer: dict[str, Any] = {"resourceType": "Parameters", "parameter": [
                {"name": "result", "valueBoolean": False},
                {"name": "message", "valueString": "no concept map here translates from that "
                                                   "system" + (" to that target system"
                                                               if target_system else "")}]}
            return ctx.respond(answer, fmt)
        answers = [conceptmaps.translate(c, code, reverse, base) for c in chosen]
        if members is not None:
            answers = [_within(a, members, target_url or "") for a in answers]
        if len(answers) == 1:
            return ctx.respond(answers[0], fmt)
        # Several maps from one system: every map's matches; true if any translated.
        params: list[dict[str, Any]] = [{"name": "result", "valueBoolean": any(
            p["parameter"][0]["valueBoolean"] for p in answers)}]
        messages = [m["valueString"] for a in answers for m in a["parameter"]
                    if m["name"] == "message"]
        if messages:
            params.append({"name": "message", "valueString": "; ".join(messages)})
        params += [m for a in answers for m in a["parameter"] if m["name"] == "match"]
        return ctx.respond({"resourceType": "Parameters", "parameter": params}, fmt)


def _within(answer: dict[str, Any], members: set[tuple[str, str]], vs_url: str
            ) -> dict[str, Any]:
    """``answer`` with only the matches whose concept is in the target ValueSet."""
    params = answer["parameter"]
    matches = [m for m in params if m["name"] == "match"]
    kept = [m for m in matches if _concept_key(m) in members]
    if len(kept) == len(matches):
        return answer
    message = (f"{len(matches) - len(kept)} translation(s) left out: not in the target "
               f"ValueSet {vs_url}")
    messages = [p["valueString"] for p in params if p["name"] == "message"] + [message]
    return {"resourceType": "Parameters", "parameter": [
        {"name": "result", "valueBoolean": bool(kept)},
        {"name": "message", "valueString": "; ".join(messages)}, *kept]}


def _concept_key(match: dict[str, Any]) -> tuple[str, str]:
    concept = next(p["valueCoding"] for p in match["part"] if p["name"] == "concept")
    return concept.get("system", ""), concept["code"]


def _value_set(ctx: Context, call: Invocation, inputs: dict[str, list[str]]
               ) -> tuple[Catalogue, dict[str, Any]]:
    provider = _provider(ctx, "ValueSet")
    catalogue: Catalogue = provider.catalogue  # type: ignore[attr-defined]
    if call.level == "instance":
        assert call.rid is not None
        vs = provider.read(call.rid, ctx.base_url(call.request))
        if vs is None:
            raise NotFound("ValueSet with that id was not found")
        return catalogue, vs
    url = _one(inputs, "url")
    if url is None:
        raise BadRequest("on the type, the operation needs the ValueSet's url")
    found = catalogue.value_set(url)
    if found is None:
        raise NotFound("no ValueSet held here has that url")
    return catalogue, found


class Expand(_TerminologyOperation):
    name = "expand"
    levels = frozenset({"type", "instance"})
    resource_types = ("ValueSet",)
    parameters = (
        Parameter("url", "uri", documentation="The ValueSet to expand (type level)"),
        Parameter("filter", "string", documentation=(
            "Codes whose display contains the text (case-insensitive), or whose code starts "
            "with it")),
        Parameter("offset", "integer", documentation="Paging: codes to skip"),
        Parameter("count", "integer", documentation=f"Paging: codes to return (at most "
                                                    f"{MAX_EXPANSION})"),
        Parameter("activeOnly", "boolean", documentation=(
            "Leave out concepts their CodeSystem marks inactive (property inactive, or status "
            "retired/inactive)")),
        Parameter("includeDesignations", "boolean", documentation=(
            "Each code's designations (the ValueSet's, else its CodeSystem's)")),
        Parameter("displayLanguage", "code", documentation=(
            "The display from a designation in this language, where there is one")),
        Parameter("return", "ValueSet", use="out", min=1),
    )
    scopes = "read of ValueSet"
    definition_url = HL7 + "ValueSet-expand"

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request = call.request
        fmt = ctx.fmt(request)
        authorize.require(request, "ValueSet", "r")
        inputs, _ = await _inputs(request, ctx)
        catalogue, vs = _value_set(ctx, call, inputs)
        text = _one(inputs, "filter")
        offset = _number(inputs, "offset", 0)
        count = min(_number(inputs, "count", MAX_EXPANSION), MAX_EXPANSION)
        active_only = _flag(inputs, "activeOnly")
        designations = _flag(inputs, "includeDesignations")
        language = _one(inputs, "displayLanguage")
        concepts = catalogue.expand(vs)
        if text:
            concepts = [c for c in concepts if matches_filter(c, text)]
        if active_only:
            concepts = [c for c in concepts if not catalogue.inactive(c)]
        params: list[dict[str, Any]] = []
        if text:
            params.append({"name": "filter", "valueString": text})
        params += [{"name": "offset", "valueInteger": offset},
                   {"name": "count", "valueInteger": count}]
        if active_only:
            params.append({"name": "activeOnly", "valueBoolean": True})
        if designations:
            params.append({"name": "includeDesignations", "valueBoolean": True})
        if language:
            params.append({"name": "displayLanguage", "valueCode": language})
        expansion: dict[str, Any] = {
            "identifier": f"urn:uuid:{uuid4()}",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "total": len(concepts),
            "offset": offset,
            "parameter": params,
        }
        page = concepts[offset:offset + count]
        if page:
            expansion["contains"] = [_contains(c, designations, language) for c in page]
        out = {k: v for k, v in vs.items() if k != "compose"}
        out["expansion"] = expansion
        return ctx.respond(out, fmt)


def _contains(concept: Concept, designations: bool, language: str | None) -> dict[str, Any]:
    out = concept.entry()
    if language:
        display = in_language(concept, language)
        if display is not None:
            out["display"] = display
    if designations and concept.designation:
        out["designation"] = [{k: d[k] for k in ("language", "use", "value") if k in d}
                              for d in concept.designation]
    return out


def in_language(concept: Concept, language: str) -> str | None:
    """The concept's designation in ``language`` (``en`` also takes ``en-GB``), if any."""
    wanted = language.lower()
    for exact in (True, False):
        for d in concept.designation:
            lang = str(d.get("language") or "").lower()
            if d.get("value") and (lang == wanted if exact
                                   else lang.split("-")[0] == wanted.split("-")[0]):
                return str(d["value"])
    return None


def _flag(inputs: dict[str, list[str]], name: str) -> bool:
    raw = (_one(inputs, name) or "false").lower()
    if raw not in ("true", "false"):
        raise BadRequest(f"{name} must be true or false")
    return raw == "true"


def matches_filter(concept: Concept, text: str) -> bool:
    t = text.casefold()
    return concept.code.casefold().startswith(t) or t in (concept.display or "").casefold()


def _number(inputs: dict[str, list[str]], name: str, default: int) -> int:
    raw = _one(inputs, name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise BadRequest(f"{name} must be a whole number, 0 or more")
    return int(raw)


class ValidateCode(_TerminologyOperation):
    name = "validate-code"
    levels = frozenset({"type", "instance"})
    resource_types = ("ValueSet",)
    parameters = (
        Parameter("url", "uri", documentation="The ValueSet (type level)"),
        Parameter("code", "code", documentation="The code to validate"),
        Parameter("system", "uri", documentation="The system of the code"),
        Parameter("display", "string", documentation="The display to check"),
        Parameter("coding", "Coding", documentation="The code as a Coding"),
        Parameter("codeableConcept", "CodeableConcept",
                  documentation="Valid if any of its codings is"),
        Parameter("result", "boolean", use="out", min=1),
        Parameter("message", "string", use="out"),
        Parameter("display", "string", use="out"),
    )
    scopes = "read of ValueSet"
    definition_url = HL7 + "ValueSet-validate-code"

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request = call.request
        fmt = ctx.fmt(request)
        authorize.require(request, "ValueSet", "r")
        inputs, codings = await _inputs(request, ctx)
        catalogue, vs = _value_set(ctx, call, inputs)
        wanted = self._code(inputs, codings)
        held = {(c.system, c.code): c for c in catalogue.expand(vs)}
        by_code = {c.code: c for c in held.values()}
        messages: list[str] = []
        for coding in wanted:
            system = coding.get("system")
            hit = held.get((system, coding["code"])) if system else by_code.get(coding["code"])
            if hit is None:
                messages.append(f"the code is not in ValueSet {vs['id']}"
                                + ("" if system else " (no system was given)"))
                continue
            out: list[dict[str, Any]] = []
            display = coding.get("display")
            if display is not None and hit.display and display != hit.display:
                return ctx.respond(_validated(False, f"the display does not match: the code's "
                                                     f"display is '{hit.display}'",
                                              hit.display), fmt)
            out = _validated(True, None, hit.display)["parameter"]
            return ctx.respond({"resourceType": "Parameters", "parameter": out}, fmt)
        return ctx.respond(_validated(False, "; ".join(dict.fromkeys(messages)), None), fmt)


def _validated(result: bool, message: str | None, display: str | None) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "result", "valueBoolean": result}]
    if message:
        params.append({"name": "message", "valueString": message})
    if display:
        params.append({"name": "display", "valueString": display})
    return {"resourceType": "Parameters", "parameter": params}


class Lookup(_TerminologyOperation):
    name = "lookup"
    levels = frozenset({"type"})
    resource_types = ("CodeSystem",)
    parameters = (
        Parameter("code", "code", documentation="The code to look up"),
        Parameter("system", "uri", documentation="The code system", min=0),
        Parameter("coding", "Coding", documentation="The code as a Coding"),
        Parameter("property", "code", max="*", documentation=(
            "The properties wanted (definition, designation, parent, child, or a property "
            "the CodeSystem defines); none given: all there are")),
        Parameter("name", "string", use="out", min=1),
        Parameter("version", "string", use="out"),
        Parameter("display", "string", use="out", min=1),
    )
    scopes = "read of CodeSystem"
    definition_url = HL7 + "CodeSystem-lookup"

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request = call.request
        fmt = ctx.fmt(request)
        authorize.require(request, "CodeSystem", "r")
        inputs, codings = await _inputs(request, ctx)
        coding = self._code(inputs, codings)[0]
        system = coding.get("system")
        if not system:
            raise BadRequest("$lookup needs the code's system")
        catalogue: Catalogue = _provider(ctx, "CodeSystem").catalogue  # type: ignore[attr-defined]
        cs = catalogue.code_system(system)
        if cs is None:
            raise UnknownCode("that code system is not held by this server")
        concept = catalogue.concept(system, coding["code"])
        held = catalogue.definition(system, coding["code"])
        if concept is None or held is None:
            raise UnknownCode(f"the code is not defined in CodeSystem {cs['id']}")
        wanted = set(inputs.get("property") or ())
        params: list[dict[str, Any]] = [{"name": "name", "valueString": cs.get("name", "")}]
        if cs.get("version"):
            params.append({"name": "version", "valueString": cs["version"]})
        params.append({"name": "display", "valueString": concept.display or concept.code})
        for d in (concept.designation if not wanted or "designation" in wanted else ()):
            part: list[dict[str, Any]] = []
            if d.get("language"):
                part.append({"name": "language", "valueCode": d["language"]})
            if d.get("use"):
                part.append({"name": "use", "valueCoding": d["use"]})
            part.append({"name": "value", "valueString": d.get("value", "")})
            params.append({"name": "designation", "part": part})
        params += [p for p in _properties(held)
                   if not wanted or p["part"][0]["valueCode"] in wanted]
        return ctx.respond({"resourceType": "Parameters", "parameter": params}, fmt)


def _properties(held: Definition) -> list[dict[str, Any]]:
    """``$lookup``'s property parts: definition, parent, child, then the concept's own."""
    def prop(code: str, value: dict[str, Any]) -> dict[str, Any]:
        return {"name": "property", "part": [{"name": "code", "valueCode": code},
                                             {"name": "value", **value}]}

    out: list[dict[str, Any]] = []
    if held.concept.get("definition"):
        out.append(prop("definition", {"valueString": held.concept["definition"]}))
    out += [prop("parent", {"valueCode": c}) for c in held.parents]
    out += [prop("child", {"valueCode": c}) for c in held.children]
    for p in held.properties:
        value = {k: v for k, v in p.items() if k.startswith("value")}
        if p.get("code") and len(value) == 1:
            out.append(prop(str(p["code"]), value))
    return out


def operations() -> list[Operation]:
    return [Translate(), Expand(), ValidateCode(), Lookup()]


def served_operations(registry: Registry) -> list[Operation]:
    """The terminology operations whose type the registry serves as terminology."""
    return [op for op in operations()
            if op.resource_types and registry.terminology(op.resource_types[0]) is not None]
