"""The Care Connect ValueSets and CodeSystems the profiles bind to, and what is computed from
them: expansions, code validation and look-ups.

The content is package data (``data/careconnect.json``, made by ``python -m
gateway.terminology.vendor``). An expansion is computed only from what is here: concepts a
ValueSet lists, whole local CodeSystems and imported local ValueSets. A ValueSet defined by a
filter (the SNOMED CT intensional ones) or drawing on a code system not held here cannot be
expanded locally: that is a 422 ``VALUESET_NOT_EXPANDABLE``, never an empty expansion.

What a CodeSystem says about each concept beyond its display — its definition, designations,
properties (``inactive``, ``status``...), and its place in a hierarchy (nested concepts, or
``parent``/``child`` properties) — is kept for ``$lookup`` and for ``$expand``'s
``activeOnly``, ``includeDesignations`` and ``displayLanguage``. (The Care Connect
CodeSystems held today are flat, with definitions but no designations or properties; the
code is general, so content that has them is served as published.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from gateway.errors import ValueSetNotExpandable as NotExpandable

DATA = Path(__file__).resolve().parent / "data" / "careconnect.json"


@dataclass(frozen=True, slots=True)
class Concept:
    system: str
    code: str
    display: str | None
    designation: tuple[dict[str, Any], ...] = ()

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


def walk(concepts: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for c in concepts:
        yield c
        yield from walk(c.get("concept") or [])


def _with_parents(concepts: list[dict[str, Any]], parent: str | None = None
                  ) -> Iterator[tuple[dict[str, Any], str | None]]:
    for c in concepts:
        yield c, parent
        yield from _with_parents(c.get("concept") or [], c["code"])


INACTIVE_STATUS = frozenset({"retired", "inactive"})


@dataclass(frozen=True, slots=True)
class Definition:
    """A concept as its CodeSystem defines it (``$lookup``)."""

    concept: dict[str, Any]
    parents: tuple[str, ...]
    children: tuple[str, ...]

    @property
    def properties(self) -> list[dict[str, Any]]:
        """The concept's own ``property`` entries other than parent/child (STU3 shape)."""
        return [p for p in self.concept.get("property") or ()
                if isinstance(p, dict) and p.get("code") not in ("parent", "child")]

    @property
    def inactive(self) -> bool:
        for p in self.concept.get("property") or ():
            if p.get("code") == "inactive" and p.get("valueBoolean") is True:
                return True
            if p.get("code") == "status" and p.get("valueCode") in INACTIVE_STATUS:
                return True
        return False


class Catalogue:
    """The held ValueSets and CodeSystems, by id and by canonical url."""

    def __init__(self, content: dict[str, Any]) -> None:
        self.value_sets: list[dict[str, Any]] = content["valueSets"]
        self.code_systems: list[dict[str, Any]] = content["codeSystems"]
        self._vs_url = {v["url"]: v for v in self.value_sets}
        self._cs_url = {c["url"]: c for c in self.code_systems}
        self._concepts: dict[str, dict[str, Concept]] = {
            c["url"]: {x["code"]: Concept(c["url"], x["code"], x.get("display"),
                                          tuple(x.get("designation") or ()))
                       for x in walk(c.get("concept") or [])}
            for c in self.code_systems}
        self._definitions = {c["url"]: _definitions(c) for c in self.code_systems}

    def value_set(self, url: str) -> dict[str, Any] | None:
        return self._vs_url.get(url)

    def code_system(self, url: str) -> dict[str, Any] | None:
        return self._cs_url.get(url)

    def concept(self, system: str, code: str) -> Concept | None:
        return self._concepts.get(system, {}).get(code)

    def definition(self, system: str, code: str) -> Definition | None:
        return self._definitions.get(system, {}).get(code)

    def inactive(self, concept: Concept) -> bool:
        held = self.definition(concept.system, concept.code)
        return held is not None and held.inactive

    def expand(self, vs: dict[str, Any]) -> list[Concept]:
        """Every code the ValueSet holds, in the order it states them (raises NotExpandable)."""
        return self._expand(vs, ())

    def _expand(self, vs: dict[str, Any], seen: tuple[str, ...]) -> list[Concept]:
        if vs["url"] in seen:
            raise NotExpandable(f"ValueSet {vs['id']} imports itself")
        compose = vs.get("compose") or {}
        out: dict[tuple[str, str], Concept] = {}
        for part in compose.get("include") or []:
            for c in self._part(vs, part, (*seen, vs["url"])):
                out.setdefault((c.system, c.code), c)
        for part in compose.get("exclude") or []:
            for c in self._part(vs, part, (*seen, vs["url"])):
                out.pop((c.system, c.code), None)
        return list(out.values())

    def _part(self, vs: dict[str, Any], part: dict[str, Any], seen: tuple[str, ...]
              ) -> list[Concept]:
        why = f"ValueSet {vs['id']} cannot be expanded by this server"
        if part.get("filter"):
            raise NotExpandable(f"{why}: it is defined by a filter on {part.get('system')} "
                                "(an intensional definition needs a terminology server)")
        found: list[Concept] | None = None
        system = part.get("system")
        if system and part.get("concept"):
            found = []
            for c in part["concept"]:
                held = self.concept(system, c["code"])
                display = c.get("display") or (held.display if held else None)
                # the ValueSet's own designations, else the CodeSystem's
                designation = c.get("designation") or (held.designation if held else ())
                found.append(Concept(system, c["code"], display, tuple(designation)))
        elif system:
            if system not in self._concepts:
                raise NotExpandable(f"{why}: it includes all of {system}, which is not held here")
            if (self._cs_url[system].get("content") or "complete") != "complete":
                raise NotExpandable(f"{why}: the CodeSystem {system} held here is not complete")
            found = list(self._concepts[system].values())
        for imported in part.get("valueSet") or []:
            other = self.value_set(imported)
            if other is None:
                raise NotExpandable(f"{why}: it imports {imported}, which is not held here")
            inner = {(c.system, c.code): c for c in self._expand(other, seen)}
            if found is None:
                found = list(inner.values())
            else:  # system and valueSet together: the intersection
                found = [c for c in found if (c.system, c.code) in inner]
        return found or []


def _definitions(cs: dict[str, Any]) -> dict[str, Definition]:
    """Each concept with its parents and children: nesting, and parent/child properties."""
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    raw: dict[str, dict[str, Any]] = {}
    for c, parent in _with_parents(cs.get("concept") or []):
        code = c["code"]
        raw[code] = c
        if parent is not None:
            parents.setdefault(code, []).append(parent)
            children.setdefault(parent, []).append(code)
        for p in c.get("property") or ():
            other = p.get("valueCode") if isinstance(p, dict) else None
            if p.get("code") == "parent" and other:
                parents.setdefault(code, []).append(other)
                children.setdefault(other, []).append(code)
            elif p.get("code") == "child" and other:
                children.setdefault(code, []).append(other)
                parents.setdefault(other, []).append(code)
    return {code: Definition(c, tuple(dict.fromkeys(parents.get(code, ()))),
                             tuple(dict.fromkeys(children.get(code, ()))))
            for code, c in raw.items()}


@cache
def catalogue(path: Path = DATA) -> Catalogue:
    return Catalogue(json.loads(path.read_text(encoding="utf-8")))
