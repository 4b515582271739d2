"""Care Connect profile validation: a resource (plain dict) against a compiled profile.

``load_profiles()`` reads the vendored conformance resources once (JSON, milliseconds) and
compiles every profile into lookup trees (gateway.profiles.structure). ``validate()`` walks a
resource with them and returns issues:

* cardinality (min/max, slices included), unknown elements, empty objects/arrays/strings,
  JSON shape (array or not) and STU3 primitive formats;
* fixed[x]/pattern[x] values; choice types as the profile narrows them;
* reference target types (targetProfile → resource type);
* extensions by url, each against its own Extension StructureDefinition; slices discriminated
  by value (identifier system, name use); the NHS number check digit;
* bindings: ``required`` → error, ``extensible`` → warning when the code is not in the
  ValueSet; a ValueSet that cannot be expanded locally → ``information`` "binding not checked";
* cheap base invariants: ext-1 (value or extensions, not both), per-1 (start ≤ end), lst-1
  and cmp-2 (an emptyReason only on an empty List or Composition section), cmp-1 (a section
  has text, entries or sub-sections).

Messages name elements, types and ValueSets — never a value from the resource.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from gateway import nhs_number
from gateway.profiles.structure import (
    COMPLEX,
    PRIMITIVE,
    RESOURCE,
    Binding,
    Compiler,
    Complex,
    Element,
    Prop,
    Slice,
)
from gateway.profiles.terminology import Terminology

DATA_DIR = Path(__file__).resolve().parent / "data"
NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
_REFERENCE = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


@dataclass(frozen=True, slots=True)
class Issue:
    severity: str  # error | warning | information
    code: str  # FHIR IssueType
    message: str
    expression: str

    def outcome_issue(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "diagnostics": self.message,
                "expression": [self.expression], "location": [self.expression]}


@dataclass(frozen=True, slots=True)
class ProfileInfo:
    url: str
    name: str
    type: str
    elements: list[dict[str, Any]]
    """The snapshot elements (compact form), in order: for coverage reports."""


BASE_SD = "http://hl7.org/fhir/StructureDefinition/"


class Profiles:
    """The compiled Care Connect profiles, extensions and terminology."""

    def __init__(self, data_dir: Path = DATA_DIR) -> None:
        started = time.perf_counter()
        sd_data = orjson.loads((data_dir / "structuredefinitions.json").read_bytes())
        base = orjson.loads((data_dir / "base-stu3.json").read_bytes())["types"]
        self.terminology = Terminology(
            orjson.loads((data_dir / "terminology.json").read_bytes()))
        self.compiler = Compiler(base, self.terminology, sd_data["profileTypes"])
        sds: dict[str, Any] = sd_data["structureDefinitions"]
        self.info: dict[str, ProfileInfo] = {}
        self._roots: dict[str, Complex] = {}
        self.default_by_type: dict[str, str] = {}
        extensions = [sd for sd in sds.values() if sd["type"] == "Extension"]
        # Extensions first (and those used by other extensions before them), then resources.
        for _ in range(2):
            for sd in extensions:
                self.compiler.extension(sd)
        for url, sd in sds.items():
            self.info[url] = ProfileInfo(url, sd["name"], sd["type"], sd["elements"])
            if sd["type"] != "Extension":
                self._roots[url] = self.compiler.resource(sd)
                self.default_by_type.setdefault(sd["type"], url)
        self.load_seconds = time.perf_counter() - started

    def __contains__(self, url: str) -> bool:
        return url in self._roots or self._base_of(url) is not None

    def root(self, url: str) -> Complex:
        root = self._roots.get(url) or self._base_of(url)
        if root is None:
            raise KeyError(url)
        return root

    def _base_of(self, url: object) -> Complex | None:
        """A core STU3 resource's own canonical URL (a type Care Connect has no profile for,
        such as DocumentReference): validated against the base resource definition."""
        if not isinstance(url, str) or not url.startswith(BASE_SD):
            return None
        return self.base_resource(url[len(BASE_SD):])

    def extension(self, url: object) -> Prop | None:
        return self.compiler.extensions.get(url) if isinstance(url, str) else None

    def base_resource(self, resource_type: str) -> Complex | None:
        cx = self.compiler.base(resource_type)
        return cx if cx is not None and cx.resource else None

    def profile_for(self, resource: dict[str, Any]) -> str | None:
        """The profile a resource claims (meta.profile) if known, else its type's default."""
        meta = resource.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("profile"), list):
            for url in meta["profile"]:
                if isinstance(url, str) and url in self:
                    return url
        rt = resource.get("resourceType")
        return self.default_by_type.get(rt) if isinstance(rt, str) else None


@lru_cache(maxsize=1)
def load_profiles() -> Profiles:
    return Profiles()


def validate(resource: dict[str, Any], profile_url: str | None = None,
             profiles: Profiles | None = None) -> list[Issue]:
    """Validate a resource against ``profile_url`` (default: its claimed or type profile)."""
    p = profiles or load_profiles()
    if not isinstance(resource, dict):
        return [Issue("error", "structure", "a resource must be a JSON object", "(resource)")]
    rt = resource.get("resourceType")
    if not isinstance(rt, str) or not rt:
        return [Issue("error", "required", "resourceType is missing", "(resource)")]
    issues: list[Issue] = []
    if profile_url is not None:
        if profile_url not in p:
            return [Issue("error", "not-supported",
                          f"profile {profile_url} is not available locally", rt)]
        root = p.root(profile_url)
        if root.type != rt:
            return [Issue("error", "invalid", f"the profile is for {root.type}, not this "
                          "resource type", f"{rt}.resourceType")]
    else:
        url = p.profile_for(resource)
        if url is not None:
            root = p.root(url)
        else:
            base = p.base_resource(rt)
            if base is None:
                return [Issue("error", "not-supported", "unknown resource type",
                              "(resource).resourceType")]
            root = base
    _Walker(p, issues, resource).object(resource, root, rt)
    return issues


class _Walker:
    __slots__ = ("issues", "profiles", "resource")

    def __init__(self, profiles: Profiles, issues: list[Issue], resource: dict[str, Any]) -> None:
        self.profiles = profiles
        self.issues = issues
        self.resource = resource

    def add(self, severity: str, code: str, message: str, expression: str) -> None:
        self.issues.append(Issue(severity, code, message, expression))

    # -- objects

    def object(self, obj: Any, cx: Complex, path: str) -> None:
        if not isinstance(obj, dict):
            self.add("error", "structure", f"must be a JSON object ({cx.type})", path)
            return
        if not obj:
            self.add("error", "structure", "empty objects are not allowed", path)
            return
        counts: dict[Element, int] = {}
        props = cx.props
        for key, value in obj.items():
            prop = props.get(key)
            if prop is None:
                self.other_key(obj, key, value, cx, counts, path)
                continue
            element = prop.element
            where = f"{path}.{key}"
            if element.array:
                if not isinstance(value, list):
                    self.add("error", "structure", f"{element.id} must be a JSON array", where)
                    continue
                if not value:
                    self.add("error", "structure", "empty arrays are not allowed", where)
                    continue
                counts[element] = counts.get(element, 0) + len(value)
                if element.slicing is not None or prop.type == "Extension":
                    self.sliced(value, prop, where)
                else:
                    for i, item in enumerate(value):
                        self.value(item, prop, f"{where}[{i}]")
            else:
                if isinstance(value, list):
                    self.add("error", "structure", f"{element.id} must not be an array", where)
                    continue
                counts[element] = counts.get(element, 0) + 1
                self.value(value, prop, where)
        for element in cx.checked:
            n = counts.get(element, 0)
            if n < element.min:
                self.add("error", "required",
                         f"{element.id}: minimum required = {element.min}, found {n}"
                         + _add_hint(cx, element),
                         f"{path}.{element.name}" if n == 0 else path)
            elif element.max is not None and n > element.max:
                self.add("error", "structure",
                         f"{element.id}: maximum allowed = {element.max}, found {n}", path)
            if n == 0 and element.min == 0 and element.slicing is not None:
                for s in element.slicing.slices:
                    if s.element.min > 0:
                        self.add("error", "required", f"{s.element.id}: minimum required = "
                                 f"{s.element.min}, found 0" + _slice_hint(element, s),
                                 f"{path}.{element.name}")
        rule = _RULES.get(cx.type)
        if rule is not None:
            rule(self, obj, path)

    def other_key(self, obj: dict[str, Any], key: str, value: Any, cx: Complex,
                  counts: dict[Element, int], path: str) -> None:
        where = f"{path}.{key}"
        if key == "resourceType" and cx.resource:
            if value != cx.type:
                self.add("error", "invalid", f"resourceType must be {cx.type}", where)
            return
        if key.startswith("_"):  # a primitive's id/extensions
            prop = cx.props.get(key[1:])
            if prop is not None and prop.kind == PRIMITIVE:
                self.primitive_element(value, prop, where)
                if key[1:] not in obj:
                    n = len(value) if isinstance(value, list) else 1
                    counts[prop.element] = counts.get(prop.element, 0) + n
                return
        for prefix, name in cx.choices.items():
            if key.startswith(prefix) and key[len(prefix):][:1].isupper():
                allowed = sorted(k for k in cx.props
                                 if k.startswith(prefix) and k[len(prefix):][:1].isupper())
                self.add("error", "structure",
                         f"{key} is not an allowed type for {cx.type}.{name}"
                         f" (allowed: {', '.join(allowed) or 'none'})", where)
                return
        self.add("error", "structure", f"unknown element {key!r} in {cx.type}", where)

    def primitive_element(self, value: Any, prop: Prop, where: str) -> None:
        element_cx = self.profiles.compiler.base("Element")
        assert element_cx is not None
        items = value if isinstance(value, list) and prop.element.array else [value]
        if isinstance(value, list) and not prop.element.array:
            self.add("error", "structure", "must not be an array", where)
            return
        for i, item in enumerate(items):
            if item is None and prop.element.array:
                continue
            self.object(item, element_cx, f"{where}[{i}]" if prop.element.array else where)

    # -- values

    def value(self, value: Any, prop: Prop, path: str) -> None:
        if value is None:
            self.add("error", "structure", "null is not allowed here", path)
            return
        kind = prop.kind
        if kind == PRIMITIVE:
            assert prop.check is not None
            problem = prop.check(value)
            if problem is not None:
                self.add("error", "value", f"{prop.element.id} ({prop.type}) {problem}", path)
                return
            if prop.fixed is not None and value != prop.fixed:
                self.add("error", "value",
                         f"{prop.element.id} must have the fixed value the profile sets", path)
            if prop.binding is not None and prop.type == "code":
                self.code(value, prop.binding, prop, path)
            return
        if kind == RESOURCE:
            self.contained(value, path)
            return
        cx = prop.complex
        if cx is None:
            return
        self.object(value, cx, path)
        if not isinstance(value, dict) or not value:
            return
        if prop.fixed is not None and value != prop.fixed:
            self.add("error", "value",
                     f"{prop.element.id} must have the fixed value the profile sets", path)
        if prop.pattern is not None and not _matches(value, prop.pattern):
            self.add("error", "value",
                     f"{prop.element.id} does not match the pattern the profile sets", path)
        if prop.binding is not None:
            if prop.type == "CodeableConcept":
                self.codeable_concept(value, prop.binding, prop, path)
            elif prop.type in ("Coding",):
                self.coding(value, prop.binding, prop, path)
        if prop.targets is not None:
            self.reference(value, prop, path)

    def contained(self, value: Any, path: str) -> None:
        rt = value.get("resourceType") if isinstance(value, dict) else None
        cx = self.profiles.base_resource(rt) if isinstance(rt, str) else None
        if cx is None:
            self.add("error", "structure", "a contained resource needs a known resourceType",
                     path)
            return
        self.object(value, cx, f"{path}")

    # -- extensions and other sliced arrays

    def sliced(self, items: list[Any], prop: Prop, path: str) -> None:
        slicing = prop.element.slicing
        counts: dict[Slice, int] = {}
        is_extension = prop.type == "Extension"
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            if not isinstance(item, dict) or not item:
                self.value(item, prop, where)
                continue
            target = prop
            found = slicing.match(item) if slicing is not None else None
            if found is not None:
                counts[found] = counts.get(found, 0) + 1
                target = found.prop
            elif is_extension:
                url = item.get("url")
                known = self.profiles.extension(url)
                if known is not None:
                    target = known
                elif isinstance(url, str) and url and "/" not in url and prop.element.name \
                        == "extension" and slicing is not None:
                    self.add("error", "structure", f"{prop.element.id}: this extension is not "
                             "defined here", where)
                elif prop.element.name == "modifierExtension":
                    self.add("error", "extension", "unknown modifier extension: its "
                             "definition is not available locally, so it cannot be "
                             "processed safely", where)
                else:
                    self.add("warning", "extension", "unknown extension: its definition is not "
                             "available locally, so only its structure was checked", where)
            elif slicing is not None and slicing.rules == "closed":
                self.add("error", "structure",
                         f"{prop.element.id}: item matches no slice and slicing is closed",
                         where)
            self.value(item, target, where)
        if slicing is None:
            return
        for s in slicing.slices:
            n = counts.get(s, 0)
            if n < s.element.min:
                self.add("error", "required",
                         f"{s.element.id}: minimum required = {s.element.min}, found {n}"
                         + _slice_hint(prop.element, s), path)
            elif s.element.max is not None and n > s.element.max:
                self.add("error", "structure",
                         f"{s.element.id}: maximum allowed = {s.element.max}, found {n}", path)

    # -- terminology

    def unchecked(self, binding: Binding, path: str) -> None:
        self.add("information", "informational",
                 f"binding not checked: ValueSet {binding.url} not available locally", path)

    def code(self, code: str, binding: Binding, prop: Prop, path: str) -> None:
        if binding.expansion is None:
            self.unchecked(binding, path)
        elif not binding.expansion.has_code(code):
            self.not_in(binding, prop, path)

    def coding(self, coding: dict[str, Any], binding: Binding, prop: Prop, path: str) -> None:
        if binding.expansion is None:
            self.unchecked(binding, path)
        elif not binding.expansion.has_coding(coding.get("system"), coding.get("code")):
            self.not_in(binding, prop, path)

    def codeable_concept(self, cc: dict[str, Any], binding: Binding, prop: Prop, path: str
                         ) -> None:
        if binding.expansion is None:
            self.unchecked(binding, path)
            return
        listed = cc.get("coding")  # not a list: the structure check reports it
        codings = [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
        if any(binding.expansion.has_coding(c.get("system"), c.get("code")) for c in codings):
            return
        if codings or binding.strength == "required":
            self.not_in(binding, prop, path)

    def not_in(self, binding: Binding, prop: Prop, path: str) -> None:
        vs = f"ValueSet {binding.url}" if binding.url else "the FHIR STU3 code list"
        if binding.strength == "required":
            self.add("error", "code-invalid",
                     f"{prop.element.id}: the code is not in {vs} (required binding)", path)
        else:
            self.add("warning", "code-invalid",
                     f"{prop.element.id}: the code is not in {vs} (extensible binding)", path)

    # -- references

    def reference(self, ref: dict[str, Any], prop: Prop, path: str) -> None:
        assert prop.targets is not None
        value = ref.get("reference")
        if not isinstance(value, str) or not value:
            return
        if value.startswith("#"):
            rtype = next((c.get("resourceType") for c in self.resource.get("contained") or ()
                          if isinstance(c, dict) and c.get("id") == value[1:]), None)
            if rtype is None:
                self.add("error", "not-found",
                         f"{prop.element.id}: the contained resource is not present", path)
                return
        else:
            m = _REFERENCE.search(value)
            if m is None:
                if not value.startswith(("urn:uuid:", "urn:oid:")):
                    self.add("warning", "invalid", f"{prop.element.id}: the reference is not "
                             "of the form [type]/[id]; its target type is not checked", path)
                return
            rtype = m.group(1)
        if rtype not in prop.targets and "Resource" not in prop.targets:  # Reference(Any)
            self.add("error", "invalid", f"{prop.element.id}: the reference must be to "
                     f"{' or '.join(sorted(prop.targets))}", f"{path}.reference")


def _matches(value: Any, pattern: Any) -> bool:
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            k in value and _matches(value[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and all(
            any(_matches(v, p) for v in value) for p in pattern)
    return bool(value == pattern)


# -- what to add, for a missing element ---------------------------------------------------------


def _value_hint(key: str, prop: Prop | None) -> str:
    if prop is not None:
        fixed = prop.fixed if prop.fixed is not None else prop.pattern
        if isinstance(fixed, str | int | bool):
            return f'"{key}": {orjson.dumps(fixed).decode()}'
        exp = prop.binding.expansion if prop.binding is not None else None
        if exp is not None and prop.binding is not None and prop.binding.strength == "required" \
                and 0 < len(exp.codes) <= 12:
            return f'"{key}" (one of: {", ".join(sorted(exp.codes))})'
    return f'"{key}"'


def _add_hint(cx: Complex, element: Element) -> str:
    """': add "use" (one of: ...)' for a missing element; the value only when fixed."""
    props = [p for p in cx.props.values() if p.element is element]
    if len(props) != 1:
        return f": add {element.name}[x]" if props else ""
    return f": add {_value_hint(props[0].key, props[0])}"


def _slice_hint(element: Element, s: Slice) -> str:
    """': add a name with "use": "official"' for a slice with too few items."""
    if not s.values:
        return ""
    keys = ", ".join(f'"{k}": {orjson.dumps(v).decode()}' for k, v in s.values)
    return f": add an item to {element.name} with {keys}"


# -- invariants and type rules ------------------------------------------------------------------


def _extension_rule(w: _Walker, obj: dict[str, Any], path: str) -> None:
    has_value = any(k.startswith("value") for k in obj)
    if has_value and "extension" in obj:
        w.add("error", "invariant",
              "ext-1: an extension must have either extensions or value[x], not both", path)


_YEAR = re.compile(r"^\d{4}$")
_MONTH = re.compile(r"^\d{4}-\d{2}$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _range(text: str, as_written: bool) -> tuple[dt.datetime, dt.datetime] | None:
    """[low, high) that a date / dateTime stands for; None when unreadable. ``as_written``:
    wall-clock time as written, the zone dropped (to compare with a date, which has none);
    otherwise instants in UTC."""
    try:
        if _YEAR.match(text):
            y = int(text)
            return dt.datetime(y, 1, 1), dt.datetime(y + 1, 1, 1)
        if _MONTH.match(text):
            y, m = int(text[:4]), int(text[5:7])
            return dt.datetime(y, m, 1), dt.datetime(y + (m == 12), m % 12 + 1, 1)
        if _DAY.match(text):
            lo = dt.datetime.fromisoformat(text)
            return lo, lo + dt.timedelta(days=1)
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if as_written:
        at = at.replace(tzinfo=None)
    elif at.tzinfo is None:
        return None  # a time without a zone is not valid FHIR; reported elsewhere
    return at, at + dt.timedelta(microseconds=1)


def _period_rule(w: _Walker, obj: dict[str, Any], path: str) -> None:
    """per-1 at every precision: the start may not lie wholly after the end ("2021" after
    "2020-12-31", a day after the day before it); ranges that overlap are not reversed.
    Against a date (no zone) a time is compared on the calendar as written."""
    start, end = obj.get("start"), obj.get("end")
    if not isinstance(start, str) or not isinstance(end, str):
        return
    as_written = "T" not in start or "T" not in end
    s_range, e_range = _range(start, as_written), _range(end, as_written)
    if s_range is not None and e_range is not None and s_range[0] >= e_range[1]:
        w.add("error", "invariant", "per-1: the period start must not be after its end", path)


def _identifier_rule(w: _Walker, obj: dict[str, Any], path: str) -> None:
    if obj.get("system") == NHS_NUMBER_SYSTEM:
        value = obj.get("value")
        if isinstance(value, str) and not nhs_number.is_valid(value):
            # The same words as gateway.writes, so a write reports the problem once.
            w.add("error", "value", "an NHS number must be 10 digits with a valid check digit",
                  f"{path}.value")


def _list_rule(w: _Walker, obj: dict[str, Any], path: str) -> None:
    if obj.get("emptyReason") and obj.get("entry"):
        w.add("error", "invariant",
              "lst-1: a list can only have an emptyReason if it is empty", path)


def _composition_rule(w: _Walker, obj: dict[str, Any], path: str) -> None:
    """cmp-1 and cmp-2 on every section, nested ones too (a section is a backbone element,
    so the rule is the Composition's)."""
    def sections(node: dict[str, Any], at: str) -> None:
        found = node.get("section")
        if not isinstance(found, list):
            return
        for i, sec in enumerate(found):
            if not isinstance(sec, dict):
                continue
            where = f"{at}.section[{i}]"
            if sec.get("emptyReason") and sec.get("entry"):
                w.add("error", "invariant",
                      "cmp-2: a section can only have an emptyReason if it is empty", where)
            if not (sec.get("text") or sec.get("entry") or sec.get("section")):
                w.add("error", "invariant",
                      "cmp-1: a section must have text, entries or sub-sections", where)
            sections(sec, where)

    sections(obj, path)


_RULES = {"Extension": _extension_rule, "Period": _period_rule, "Identifier": _identifier_rule,
          "List": _list_rule, "Composition": _composition_rule}

__all__ = ["COMPLEX", "Issue", "ProfileInfo", "Profiles", "load_profiles", "validate"]
