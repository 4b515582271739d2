"""Compile StructureDefinition snapshots (and the STU3 base) into lookup trees, once.

The validator never reads a StructureDefinition: it walks a resource with these trees, where
every JSON key an object may have is one dict lookup away.

* A ``Complex`` is what an object of some type may contain: JSON key → ``Prop``, plus the
  elements whose cardinality must be counted.
* A ``Prop`` is one JSON key of one element with one type (``deceasedBoolean`` and
  ``deceasedDateTime`` are two props of the element ``Patient.deceased[x]``), carrying the
  primitive check, the child tree, binding, fixed/pattern value and reference targets.
* An ``Element`` carries cardinality and slicing, shared by its props.

Elements a profile leaves unconstrained (``Patient.identifier.period.start``) come from the
base STU3 definitions, compiled lazily per type and shared by every profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.profiles.primitives import CHECKS, PRIMITIVE_TYPES, Check
from gateway.profiles.terminology import Expansion, Terminology

PRIMITIVE, COMPLEX, RESOURCE = 0, 1, 2


@dataclass(eq=False, slots=True)
class Binding:
    strength: str
    url: str | None
    """None: the code list of a FHIR core element (from the base definitions)."""
    expansion: Expansion | None
    """None: the ValueSet cannot be expanded locally."""


@dataclass(eq=False, slots=True)
class Element:
    id: str
    name: str
    min: int
    max: int | None
    array: bool
    must_support: bool = False
    slicing: Slicing | None = None


@dataclass(eq=False, slots=True)
class Prop:
    key: str
    element: Element
    type: str
    kind: int
    check: Check | None = None
    complex: Complex | None = None
    binding: Binding | None = None
    fixed: Any = None
    pattern: Any = None
    targets: frozenset[str] | None = None
    profile: str | None = None


@dataclass(eq=False, slots=True)
class Slice:
    name: str
    element: Element
    prop: Prop
    values: tuple[tuple[str, Any], ...] | None
    """(discriminator path, value) pairs; None: takes what no other slice does."""


@dataclass(eq=False, slots=True)
class Slicing:
    paths: tuple[str, ...]
    rules: str
    slices: list[Slice]

    def match(self, item: dict[str, Any]) -> Slice | None:
        fallback = None
        for s in self.slices:
            if s.values is None:
                fallback = fallback or s
            elif all(item.get(p) == v for p, v in s.values):
                return s
        return fallback


@dataclass(eq=False, slots=True)
class Complex:
    type: str
    resource: bool = False
    props: dict[str, Prop] = field(default_factory=dict)
    checked: list[Element] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    """Choice prefix → its element name (``value`` → ``value[x]``), for type messages."""


@dataclass
class _Node:
    el: dict[str, Any]
    children: dict[str, _Node] = field(default_factory=dict)
    slices: list[_Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        path: str = self.el["path"]
        return path.rsplit(".", 1)[-1]


def _cap(code: str) -> str:
    return code[:1].upper() + code[1:]


def _max(value: str | None) -> int | None:
    return None if value is None or value == "*" else int(value)


def _tree(elements: list[dict[str, Any]]) -> _Node:
    root = _Node(elements[0])
    by_id = {elements[0]["id"]: root}
    for el in elements[1:]:
        eid: str = el["id"]
        parent_id, _, last = eid.rpartition(".")
        parent = by_id.get(parent_id)
        if parent is None:
            continue
        node = _Node(el)
        by_id[eid] = node
        name = node.name
        slice_name = el.get("sliceName")
        if slice_name and last == f"{name}:{slice_name}" and name in parent.children:
            parent.children[name].slices.append(node)
        else:  # an element, or value[x] renamed to one type (valueCodeableConcept:...)
            parent.children[name] = node
    return root


class Compiler:
    """Builds Complex trees from the base definitions and from snapshots."""

    def __init__(self, base: dict[str, Any], terminology: Terminology,
                 profile_types: dict[str, str]) -> None:
        self.base_types: dict[str, Any] = base
        self.terminology = terminology
        self.profile_types = profile_types
        self._base: dict[str, Complex] = {}
        self.extensions: dict[str, Prop] = {}

    # -- base definitions

    def base(self, type_code: str) -> Complex | None:
        cx = self._base.get(type_code)
        if cx is not None:
            return cx
        spec = self.base_types.get(type_code)
        if spec is None or spec["kind"] == "primitive":
            return None
        cx = Complex(type_code, resource=spec["kind"] == "resource")
        self._base[type_code] = cx  # before filling: types refer to themselves
        self._fill_base(cx, type_code, spec["elements"])
        return cx

    def _fill_base(self, cx: Complex, owner: str, elements: dict[str, Any]) -> None:
        for name, spec in elements.items():
            for prop in self._base_props(owner, name, spec):
                cx.props[prop.key] = prop
            if name.endswith("[x]"):
                cx.choices[name[:-3]] = name
        cx.checked = _checked(cx)

    def _base_props(self, owner: str, name: str, spec: dict[str, Any]) -> list[Prop]:
        eid = f"{owner}.{name}"
        element = Element(eid, name, spec["min"], _max(spec["max"]), spec["max"] != "1")
        binding = None
        if spec.get("codes"):
            binding = Binding("required", None, _codes(eid, spec["codes"]))
        props = []
        for t in spec["types"]:
            code = t["code"]
            key = name[:-3] + _cap(code) if name.endswith("[x]") else name
            prop = self._typed(key, element, code, binding)
            if code == "BackboneElement":
                cx = Complex("BackboneElement")
                self._fill_base(cx, eid, spec.get("elements", {}))
                prop.complex = cx
            if t.get("targets"):
                prop.targets = frozenset(t["targets"])
            props.append(prop)
        return props

    def _typed(self, key: str, element: Element, code: str, binding: Binding | None) -> Prop:
        if code in PRIMITIVE_TYPES:
            return Prop(key, element, code, PRIMITIVE, check=CHECKS[code], binding=binding)
        if code == "Resource":
            return Prop(key, element, code, RESOURCE)
        return Prop(key, element, code, COMPLEX, complex=None if code == "BackboneElement"
                    else self.base(code), binding=binding)

    # -- snapshots

    def extension(self, sd: dict[str, Any]) -> Prop:
        """An Extension StructureDefinition: the prop an extension item is checked with."""
        root = _tree(sd["elements"])
        el = root.el
        element = Element(el["id"], "extension", el["min"], _max(el["max"]), True)
        cx = self._complex(root, "Extension", self.base_types["Extension"]["elements"])
        prop = Prop("extension", element, "Extension", COMPLEX, complex=cx, profile=sd["url"])
        self.extensions[sd["url"]] = prop
        return prop

    def resource(self, sd: dict[str, Any]) -> Complex:
        root = _tree(sd["elements"])
        cx = self._complex(root, sd["type"], self.base_types[sd["type"]]["elements"])
        cx.resource = True
        return cx

    def _complex(self, node: _Node, type_code: str, base_elements: dict[str, Any]) -> Complex:
        cx = Complex(type_code)
        for bname, spec in base_elements.items():
            if bname in node.children:
                continue
            if bname.endswith("[x]"):
                prefix = bname[:-3]
                if any(n.startswith(prefix) and n not in base_elements for n in node.children):
                    continue  # the profile narrows value[x] to named types
            for prop in self._base_props(node.el["id"], bname, spec):
                cx.props[prop.key] = prop
        cx.choices = {b[:-3]: b for b in base_elements if b.endswith("[x]")}
        for name, child in node.children.items():
            spec = base_elements.get(name)
            if spec is None:
                spec = next((s for b, s in base_elements.items()
                             if b.endswith("[x]") and name.startswith(b[:-3])), None)
            if spec is None:
                continue  # not a base element: nothing valid can carry it
            for prop in self._element(child, spec):
                cx.props[prop.key] = prop
        cx.checked = _checked(cx)
        return cx

    def _element(self, node: _Node, base_spec: dict[str, Any]) -> list[Prop]:
        el = node.el
        name = node.name
        base_max = el.get("baseMax") or base_spec["max"]
        element = Element(el["id"], name, el["min"], _max(el["max"]), base_max != "1",
                          bool(el.get("mustSupport")))
        binding = None
        b = el.get("binding")
        if b and b["strength"] in ("required", "extensible") and b.get("valueSet"):
            binding = Binding(b["strength"], b["valueSet"],
                              self.terminology.expand(b["valueSet"]))
        elif base_spec.get("codes") and not b:
            binding = Binding("required", None, _codes(el["id"], base_spec["codes"]))
        grouped: dict[str, list[dict[str, Any]]] = {}
        for t in el.get("types", []):
            grouped.setdefault(t["code"], []).append(t)
        props = []
        for code, types in grouped.items():
            key = name[:-3] + _cap(code) if name.endswith("[x]") else name
            prop = self._typed(key, element, code, binding)
            if prop.kind == COMPLEX:
                if code == "BackboneElement" or (code == "Element" and "elements" in base_spec):
                    # STU3 snapshots type a data type's own backbone (Timing.repeat) "Element"
                    prop.complex = self._complex(node, "BackboneElement",
                                                 base_spec.get("elements", {}))
                elif node.children:
                    prop.complex = self._complex(node, code, self.base_types[code]["elements"])
            if "fixed" in el:
                prop.fixed = el["fixed"]["value"]
            if "pattern" in el:
                prop.pattern = el["pattern"]["value"]
            if code == "Reference":
                targets = [self.profile_types.get(t.get("targetProfile", ""), "")
                           for t in types]
                if all(targets) and "Resource" not in targets:
                    prop.targets = frozenset(targets)
            if code == "Extension" and types[0].get("profile"):
                prop.profile = types[0]["profile"]
                ext = self.extensions.get(prop.profile)
                if ext is not None:
                    prop.complex = ext.complex
            props.append(prop)
        slicing = el.get("slicing")
        if slicing and node.slices:
            paths = tuple(d[1] for d in slicing["discriminator"])
            element.slicing = Slicing(paths, slicing["rules"],
                                      [self._slice(s, base_spec, paths) for s in node.slices])
        return props

    def _slice(self, node: _Node, base_spec: dict[str, Any], paths: tuple[str, ...]) -> Slice:
        prop = self._element(node, base_spec)[0]
        values: list[tuple[str, Any]] = []
        for path in paths:
            value = None
            if path == "url" and prop.profile:
                value = prop.profile
            else:
                child = node.children.get(path)
                if child is not None:
                    fixed = child.el.get("fixed") or child.el.get("pattern")
                    value = fixed["value"] if fixed else None
            if value is None:
                return Slice(node.el.get("sliceName", ""), prop.element, prop, None)
            values.append((path, value))
        return Slice(node.el.get("sliceName", ""), prop.element, prop, tuple(values))


def _codes(eid: str, codes: list[str]) -> Expansion:
    return Expansion(eid, frozenset((None, c) for c in codes), frozenset(codes),
                     frozenset(codes))


def _checked(cx: Complex) -> list[Element]:
    seen: dict[int, Element] = {}
    for prop in cx.props.values():
        e = prop.element
        required_slice = e.slicing is not None and any(s.element.min > 0
                                                       for s in e.slicing.slices)
        if (e.min > 0 or (e.max is not None and (e.array or e.max == 0))
                or e.name.endswith("[x]") or required_slice):
            seen[id(e)] = e
    return list(seen.values())
