"""ValueSet expansion from the vendored terminology, once, at load time.

A ValueSet is expandable locally when every ``compose.include`` either lists its concepts or
names a whole CodeSystem that is vendored (and ``content`` complete), and every included
ValueSet is itself expandable. Anything else — a SNOMED CT filter, a CodeSystem we do not hold —
makes it not expandable: bindings to it are reported as not checked, never silently passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Expansion:
    url: str
    pairs: frozenset[tuple[str | None, str]]
    """(system, code); system None where the source gives codes only (FHIR core enumerations
    for ``code`` elements), which match on the code alone."""
    codes: frozenset[str]
    systemless: frozenset[str]

    def has_code(self, code: str) -> bool:
        return code in self.codes

    def has_coding(self, system: object, code: object) -> bool:
        if not isinstance(code, str):
            return False
        if code in self.systemless:
            return True
        return isinstance(system, str) and (system, code) in self.pairs


class Terminology:
    def __init__(self, data: dict[str, Any]) -> None:
        self._valuesets: dict[str, Any] = data.get("valueSets", {})
        self._codesystems: dict[str, Any] = data.get("codeSystems", {})
        self._cache: dict[str, Expansion | None] = {}

    def __contains__(self, url: str) -> bool:
        return url in self._valuesets

    def expand(self, url: str) -> Expansion | None:
        """The expansion, or None when it cannot be expanded locally."""
        if url not in self._cache:
            self._cache[url] = None  # a cycle expands to nothing rather than forever
            pairs = self._pairs(url, set())
            self._cache[url] = None if pairs is None else Expansion(
                url, frozenset(pairs), frozenset(c for _, c in pairs),
                frozenset(c for s, c in pairs if s is None))
        return self._cache[url]

    def _pairs(self, url: str, seen: set[str]) -> set[tuple[str | None, str]] | None:
        vs = self._valuesets.get(url)
        if vs is None or url in seen:
            return None
        seen = seen | {url}
        out: set[tuple[str | None, str]] = set()
        for part in vs["compose"]["include"]:
            got = self._part(part, seen)
            if got is None:
                return None
            out |= got
        for part in vs["compose"].get("exclude", []):
            got = self._part(part, seen)
            if got is None:
                return None
            out -= got
        return out

    def _part(self, part: dict[str, Any], seen: set[str]) -> set[tuple[str | None, str]] | None:
        if part.get("filter"):
            return None
        system = part.get("system")
        if part.get("concept"):
            got = {(system, c) for c in part["concept"]}
        elif system is not None:
            cs = self._codesystems.get(system)
            if cs is None or cs.get("content") != "complete":
                return None
            got = {(system, c) for c in cs["concept"]}
        else:
            got = None
        for ref in part.get("valueSet", []):
            inner = self._pairs(ref, seen)
            if inner is None:
                return None
            got = inner if got is None else got & inner
        return got
