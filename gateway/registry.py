"""The registry of what the gateway serves: one provider per resource type.

The single source of truth: routes consult it, operations find their providers in it, and
the CapabilityStatement is generated from it. A type mapped by one file is that source's
provider; a type mapped by several is their composite (gateway.multisource).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from gateway import audit, chain
from gateway.errors import UnknownResourceType
from gateway.mapping.model import SearchParam
from gateway.multisource import MultiPlan, MultiSource, TypeProvider, common_params
from gateway.plan import SearchContext, SearchPlan, plan_search
from gateway.providers import Provider

if TYPE_CHECKING:
    from gateway.terminology.provider import TerminologyProvider

__all__ = ["Registry", "TypeProvider"]


class Registry:
    def __init__(self, providers: Iterable[Provider],
                 terminology: Iterable[TerminologyProvider] = ()) -> None:
        by_type: dict[str, list[Provider]] = {}
        for p in providers:
            by_type.setdefault(p.resource_type, []).append(p)
        self._providers: dict[str, TypeProvider] = {
            t: ps[0] if len(ps) == 1 else MultiSource(ps) for t, ps in by_type.items()}
        # A provider kind of its own (gateway.terminology): content the gateway holds, read
        # and searched by the provider itself; a mapped type of the same name wins.
        self._terminology = {p.resource_type: p for p in terminology
                             if p.resource_type not in self._providers}

    def terminology(self, resource_type: str | None) -> TerminologyProvider | None:
        """The terminology provider of a type, or None (a mapped type, or not served)."""
        return self._terminology.get(resource_type or "")

    def terminology_providers(self) -> list[TerminologyProvider]:
        return [self._terminology[t] for t in sorted(self._terminology)]

    def __contains__(self, resource_type: str) -> bool:
        return resource_type in self._providers

    def __iter__(self) -> Iterator[TypeProvider]:
        return iter(sorted(self._providers.values(), key=lambda p: p.resource_type))

    def sources(self) -> Iterator[Provider]:
        """Every per-source provider, types in name order, sources in mapping order."""
        for p in self:
            yield from p.sources

    def get(self, resource_type: str) -> TypeProvider:
        provider = self._providers.get(resource_type)
        if provider is None:
            raise UnknownResourceType(f"this server does not serve resource type {resource_type!r}"
                                      if resource_type.isalnum() else
                                      "this server does not serve that resource type")
        return provider

    def id_prefixes(self, resource_type: str) -> tuple[str, ...]:
        """The id prefixes of a served type's sources (none for a type not served)."""
        provider = self._providers.get(resource_type)
        return tuple(s.id_prefix for s in provider.sources) if provider is not None else ()

    def search_context(self, provider: Provider, params: dict[str, SearchParam] | None = None,
                       sortable: list[str] | None = None) -> SearchContext:
        m = provider.mapping

        def revinclude_source(rtype: str, param: str) -> SearchParam | None:
            other = self._providers.get(rtype)
            if other is None:
                return None
            p = other.params.get(param)
            return p if p is not None and p.type == "reference" else None

        return SearchContext(
            resource_type=provider.resource_type,
            params=provider.params if params is None else params,
            policy=m.spec.search_policy,
            sortable=m.spec.sort if sortable is None else sortable,
            key_ref=m.spec.id.source_ref or "",
            storage=m.storage,
            codemaps=m.codemaps,
            tz=m.tz,
            include_targets=lambda t: t in self._providers,
            revinclude_sources=revinclude_source,
            chain=lambda key, raw: chain.plan_chain(self, provider, key, raw),
            id_prefix=provider.id_prefix,
            id_prefixes=self.id_prefixes,
        )

    def plan(self, provider: TypeProvider, pairs: list[tuple[str, str]], *, default_count: int,
             max_count: int, strict: bool, note: bool = True, whole: bool | None = None,
             policy: bool = True) -> SearchPlan:
        """Plan a search on a type (each source on its own columns); ``note``: it is the
        request's own search, for the audit record; ``whole``: a source failing fails the
        search, rather than giving a partial page (default: ``strict``). The routes set it only
        on the client's explicit ``Prefer: handling=strict`` (README): unknown parameters are
        refused by default, a failing source is not. ``policy``: see plan_search."""
        plan: SearchPlan
        if isinstance(provider, MultiSource):
            # Each source plans against its own columns, limited to what every source has.
            common = common_params(provider.sources)
            parts = [plan_search(self.search_context(s, {n: s.params[n] for n in common},
                                                     provider.sortable),
                                 pairs, default_count=default_count, max_count=max_count,
                                 strict=strict, policy=policy)
                     for s in provider.sources]
            plan = MultiPlan.of(parts, strict if whole is None else whole)
        else:
            plan = plan_search(self.search_context(provider), pairs, default_count=default_count,
                               max_count=max_count, strict=strict, policy=policy)
        if note:
            audit.note_search(provider.resource_type, plan.used)
        return plan

    async def aclose(self) -> None:
        seen: set[int] = set()
        for p in self.sources():
            adapter = p.mapping.adapter
            if id(adapter) not in seen:
                seen.add(id(adapter))
                await adapter.aclose()


def adapters(registry: Registry) -> dict[str, Any]:
    """Each connection's adapter (for readiness)."""
    return {p.mapping.connection: p.mapping.adapter for p in registry.sources()}
