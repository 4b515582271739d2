"""Terminology resource types (ConceptMap, ValueSet, CodeSystem): a provider kind of their own.

They are not records in a legacy system: their content is the gateway's own (code maps) or
package data (Care Connect), small and fixed while the process runs. So they do not go through
the search planner, the adapters or keyset paging: a provider holds its resources and answers
read and search itself, and the registry lists these providers beside the mapped ones (the
CapabilityStatement is generated from both).

Search: ``uri`` parameters match exactly; ``string`` parameters match the start of the value,
case-insensitively (``:exact``: the whole value, case-sensitively; ``:contains``: anywhere);
``token`` parameters match a code exactly (``system|code`` also checks the system). A comma
is OR, a repeated parameter AND. ``_count`` caps the page; the result sets are small, so the
whole match is counted (``total``) and later pages are reached with ``_offset``. ``_sort``
orders by the type's single-valued parameters (``url``, ``name``, ``version``, ``status``,
``_id``; ``-`` for descending; string parameters case-insensitively; a resource without the
value last); unsorted, the order is the held order (by id for ConceptMaps).

Access: terminology is not patient data, but it is served under the same rules as every other
type (the principal's scopes must grant read/search of the type — ``user/ValueSet.read``,
``user/*.read`` or the ``patient/`` equivalents — and the request is audited like any read).
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway import bundle
from gateway.errors import BadRequest, InvalidParameter, UnsupportedSearch, operation_outcome
from gateway.mapping.codemaps import CodeMap
from gateway.notices import notice
from gateway.randomness import uuid4
from gateway.terminology import conceptmaps
from gateway.terminology.content import Catalogue, walk

CORE = "http://hl7.org/fhir/StructureDefinition/"
RESULT_PARAMS = frozenset({"_format", "_pretty", "_count", "_offset", "_sort"})
MAX_COUNT = 500


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # uri | string | token
    documentation: str
    values: Callable[[dict[str, Any]], Iterable[tuple[str | None, str]]]
    """(system, value) pairs of a resource for this parameter (system: tokens only)."""
    sortable: bool = False
    """One value per resource (a top-level element): ``_sort`` may use it."""


def _top(key: str) -> Callable[[dict[str, Any]], Iterable[tuple[str | None, str]]]:
    return lambda r: [(None, r[key])] if isinstance(r.get(key), str) else []


ID = Param("_id", "token", "The logical id of the resource", _top("id"), sortable=True)


class TerminologyProvider(abc.ABC):
    resource_type: str
    interactions = frozenset({"read", "search-type"})
    params: dict[str, Param]

    @property
    def profile(self) -> str:
        return CORE + self.resource_type

    @abc.abstractmethod
    def resources(self, base_url: str) -> list[dict[str, Any]]: ...

    def read(self, rid: str, base_url: str) -> dict[str, Any] | None:
        return next((r for r in self.resources(base_url) if r["id"] == rid), None)

    def search(self, pairs: list[tuple[str, str]], base_url: str, strict: bool
               ) -> tuple[list[dict[str, Any]], list[str]]:
        """The matches, and the names of parameters ignored (lenient handling)."""
        tests: list[Callable[[dict[str, Any]], bool]] = []
        ignored: list[str] = []
        for key, raw in pairs:
            if key in RESULT_PARAMS:
                continue
            name, _, modifier = key.partition(":")
            param = {"_id": ID, **self.params}.get(name)
            if param is None or (modifier and (param.type != "string"
                                               or modifier not in ("exact", "contains"))):
                if strict:
                    raise UnsupportedSearch(f"{self.resource_type} does not support the search "
                                            f"parameter {key[:64]!r}" if key.replace(
                                                "-", "").replace(":", "").replace(
                                                "_", "").isalnum()
                                            else f"{self.resource_type} does not support that "
                                            "search parameter")
                ignored.append(key[:64])
                continue
            tests.append(_test(param, modifier, raw.split(",")))
        return [r for r in self.resources(base_url) if all(t(r) for t in tests)], ignored

    def sort(self, resources: list[dict[str, Any]], spec: list[str]) -> list[dict[str, Any]]:
        """``_sort`` values (each ``name`` or ``-name``, comma-separated), last key first."""
        keys: list[tuple[Param, bool]] = []
        for raw in spec:
            for item in raw.split(","):
                desc = item.startswith("-")
                name = item[1:] if desc else item
                param = {"_id": ID, **self.params}.get(name)
                if param is None or not param.sortable:
                    allowed = ", ".join(n for n, p in {"_id": ID, **self.params}.items()
                                        if p.sortable)
                    raise InvalidParameter(f"cannot sort {self.resource_type} by "
                                           f"'{name[:64]}' (sortable: {allowed})")
                keys.append((param, desc))
        out = list(resources)
        for param, desc in reversed(keys):  # stable sorts: the first key decides last
            valued = [(_sort_value(param, r), r) for r in out]
            present = [(v, r) for v, r in valued if v is not None]
            present.sort(key=_first, reverse=desc)
            out = [r for _, r in present] + [r for v, r in valued if v is None]
        return out

    def capability(self) -> dict[str, Any]:
        return {
            "type": self.resource_type,
            "profile": {"reference": self.profile},
            "interaction": [{"code": c} for c in ("read", "search-type")],
            "versioning": "no-version",
            "readHistory": False,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchParam": [{"name": p.name, "type": p.type, "documentation": p.documentation}
                            for p in (ID, *self.params.values())],
            "documentation": ("Terminology served by the gateway itself (not patient data). "
                              "Search: string parameters match the start of the value "
                              "(:exact and :contains supported); _count and _offset page; "
                              "_sort by " + ", ".join(
                                  n for n, p in {"_id": ID, **self.params}.items()
                                  if p.sortable) + "."),
        }


def _first(pair: tuple[str | None, dict[str, Any]]) -> str:
    return pair[0] or ""


def _sort_value(param: Param, resource: dict[str, Any]) -> str | None:
    value = next((v for _, v in param.values(resource)), None)
    if value is None:
        return None
    return value.casefold() if param.type == "string" else value


def _test(param: Param, modifier: str, wanted: list[str]) -> Callable[[dict[str, Any]], bool]:
    def ok(resource: dict[str, Any]) -> bool:
        for system, value in param.values(resource):
            for w in wanted:
                if param.type == "string":
                    if modifier == "exact":
                        hit = value == w
                    elif modifier == "contains":
                        hit = w.casefold() in value.casefold()
                    else:
                        hit = value.casefold().startswith(w.casefold())
                elif param.type == "token" and "|" in w:
                    want_system, _, code = w.partition("|")
                    hit = value == code and (not want_system or system == want_system)
                else:
                    hit = value == w
                if hit:
                    return True
        return False
    return ok


def search_bundle(provider: TerminologyProvider, pairs: list[tuple[str, str]], base_url: str,
                  strict: bool) -> dict[str, Any]:
    matches, ignored = provider.search(pairs, base_url, strict)
    sort = [v for k, v in pairs if k == "_sort"]
    if sort:
        matches = provider.sort(matches, sort)
    count, offset = _int(pairs, "_count", MAX_COUNT), _int(pairs, "_offset", None)
    count = min(count if count is not None else MAX_COUNT, MAX_COUNT)
    offset = offset or 0
    used = [(k, v) for k, v in pairs
            if k not in ("_format", "_pretty", "_offset") and k[:64] not in ignored]
    page = matches[offset:offset + count]
    links = [("self", bundle.search_url(base_url, provider.resource_type,
                                        used + ([("_offset", str(offset))] if offset else [])))]
    if offset + count < len(matches) and count:
        links.append(("next", bundle.search_url(base_url, provider.resource_type,
                                                [*used, ("_offset", str(offset + count))])))
    if offset > 0:
        links.append(("previous", bundle.search_url(
            base_url, provider.resource_type, [*used, ("_offset", str(max(0, offset - count)))])))
    entries = [bundle.entry(base_url, r, "match") for r in page]
    if ignored:
        entries.append({"resource": operation_outcome([notice(
            "UNKNOWN_PARAMETER",
            "search parameters ignored: " + ", ".join(sorted(set(ignored))))]),
            "search": {"mode": "outcome"}})
    return bundle.searchset(bundle_id=str(uuid4()), links=links, entries=entries,
                            total=len(matches),
                            last_updated=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def _int(pairs: list[tuple[str, str]], name: str, default: int | None) -> int | None:
    values = [v for k, v in pairs if k == name]
    if not values:
        return default
    try:
        n = int(values[-1])
    except ValueError:
        raise BadRequest(f"{name} must be a whole number") from None
    if n < 0:
        raise BadRequest(f"{name} must not be negative")
    return n


# --- the three types ---------------------------------------------------------------------------


def _group(key: str) -> Callable[[dict[str, Any]], Iterable[tuple[str | None, str]]]:
    return lambda r: [(None, g[key]) for g in r.get("group", []) if key in g]


def _source_codes(r: dict[str, Any]) -> Iterable[tuple[str | None, str]]:
    return [(g["source"], e["code"]) for g in r.get("group", []) for e in g.get("element", [])]


def _target_codes(r: dict[str, Any]) -> Iterable[tuple[str | None, str]]:
    return [(g.get("target"), t["code"]) for g in r.get("group", [])
            for e in g.get("element", []) for t in e.get("target", []) if "code" in t]


class ConceptMapProvider(TerminologyProvider):
    resource_type = "ConceptMap"
    params = {p.name: p for p in (
        Param("url", "uri", "The canonical URL of the concept map", _top("url"), True),
        Param("name", "string", "The code map's name", _top("name"), True),
        Param("status", "token", "The status of the concept map", _top("status"), True),
        Param("source-system", "uri", "The system of the codes mapped from (group.source)",
              _group("source")),
        Param("target-system", "uri", "The system of the codes mapped to (group.target)",
              _group("target")),
        Param("source-code", "token", "A code mapped from", _source_codes),
        Param("target-code", "token", "A code mapped to", _target_codes),
    )}

    def __init__(self, codemaps: dict[str, CodeMap]) -> None:
        self.codemaps = dict(sorted(codemaps.items()))

    def resources(self, base_url: str) -> list[dict[str, Any]]:
        return [conceptmaps.concept_map(c, base_url) for c in self.codemaps.values()]

    def read(self, rid: str, base_url: str) -> dict[str, Any] | None:
        cmap = self.codemaps.get(rid)
        return conceptmaps.concept_map(cmap, base_url) if cmap else None


_CONFORMANCE = (
    Param("url", "uri", "The canonical URL", _top("url"), True),
    Param("name", "string", "The computer-friendly name", _top("name"), True),
    Param("status", "token", "draft | active | retired | unknown", _top("status"), True),
    Param("version", "token", "The business version", _top("version"), True),
)


class ValueSetProvider(TerminologyProvider):
    resource_type = "ValueSet"
    params = {p.name: p for p in _CONFORMANCE}

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue

    def resources(self, base_url: str) -> list[dict[str, Any]]:
        return self.catalogue.value_sets


class CodeSystemProvider(TerminologyProvider):
    resource_type = "CodeSystem"
    params = {p.name: p for p in (
        *_CONFORMANCE,
        Param("system", "uri", "The system of the codes it defines (its url)", _top("url"),
              True),
        Param("code", "token", "A code it defines",
              lambda r: [(r["url"], c["code"]) for c in walk(r.get("concept") or [])]),
    )}

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue

    def resources(self, base_url: str) -> list[dict[str, Any]]:
        return self.catalogue.code_systems


def providers(codemaps: dict[str, CodeMap], catalogue: Catalogue
              ) -> list[TerminologyProvider]:
    return [CodeSystemProvider(catalogue), ConceptMapProvider(codemaps),
            ValueSetProvider(catalogue)]
