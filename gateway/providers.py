"""One provider per resource type, built from its compiled mapping; and the registry of them.

A provider turns records into resources (plain dicts, via the compiled mapping) and runs
reads and searches through its adapter. The registry is the single source of truth for
what the gateway serves: routes consult it, and the CapabilityStatement is generated from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from adapters.base import (
    And,
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Count,
    Criterion,
    In,
    Page,
    Query,
    SortKey,
    UnsupportedCriteria,
    Write,
    WriteResult,
    any_of,
)
from gateway import audit, compartment, metrics, observability, tracing
from gateway.errors import (
    GatewayTimeout,
    InternalError,
    InvalidId,
    ResourceInvalid,
    ServiceUnavailable,
    UnknownResourceType,
    UnsupportedSearch,
    UpstreamError,
    UpstreamRejected,
)
from gateway.mapping.loader import CompiledMapping
from gateway.mapping.model import SearchParam
from gateway.mapping.reverse import ReverseContext, ReverseError, compile_reverse
from gateway.plan import SearchContext, SearchPlan, plan_search
from gateway.search import ID_RE

# Time spent waiting on backends during the current request, for the request log line.
adapter_seconds: ContextVar[float] = ContextVar("adapter_seconds", default=0.0)


class Provider:
    def __init__(self, mapping: CompiledMapping) -> None:
        self.mapping = mapping
        self.resource_type = mapping.spec.resource
        self.profile = mapping.spec.profile
        self.params: dict[str, SearchParam] = dict(mapping.spec.search)
        self.key = mapping.spec.id.source_ref or ""
        self.key_sort = (SortKey(self.key),)
        self._build = mapping.build
        self._build_id = mapping.build_id
        self._build_lu = mapping.build_last_updated
        self.interactions = mapping.adapter.interactions(mapping.prepared)
        self.layout = mapping.adapter.layout(mapping.prepared)
        """Records are tuples laid out so, or dicts (None)."""
        self._places: dict[str, tuple[int | None, list[tuple[int, int]]]] = {}
        self.compartment_link: compartment.Link | None = None
        """How its resources belong to a patient (worked out by compartment.link, once)."""
        self._reverse = compile_reverse(
            mapping.spec.output,
            ReverseContext(mapping.codemaps, mapping.storage, mapping.tz),
            self.resource_type,
        )

    # -- records → resources (the hot path: plain dicts only)

    def as_record(self, rec: dict[str, Any]) -> Any:
        """A record in the dict form (a golden file's input) as this adapter lays them out."""
        return rec if self.layout is None else self.layout.as_row(rec)

    def record_id(self, rec: Any) -> str:
        return str(self._build_id(rec))

    def resource(self, rec: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {"profile": [self.profile]}
        if self._build_lu is not None:
            updated = self._build_lu(rec)
            if updated is not None:
                meta["lastUpdated"] = updated
        out: dict[str, Any] = {
            "resourceType": self.resource_type,
            "id": str(self._build_id(rec)),
            "meta": meta,
        }
        out.update(self._build(rec))
        compartment.check_resource(self, rec, out)  # fails the request outside the compartment
        audit.note_resource(self, rec, out)
        return out

    # -- backend calls, with errors translated at this boundary

    async def _fetch(self, query: Query) -> Page:
        query = compartment.restrict_query(self, query)  # patient/ tokens: in every query
        audit.note_backend(self, "fetch", query)
        with _backend_call(self, "fetch"):
            return await self.mapping.adapter.fetch(self.mapping.prepared, query)

    async def _count(self, criteria: Criterion | None) -> int:
        query = compartment.restrict_count(self, Count(criteria))
        audit.note_backend(self, "count", query)
        with _backend_call(self, "count"):
            return await self.mapping.adapter.count(self.mapping.prepared, query)

    def parse_keys(self, ref: str, ids: Iterable[str]) -> tuple[Any, ...]:
        """Ids as stored in ``ref``'s column; ids that cannot exist there are left out."""
        storage = self.mapping.storage(ref)
        keys = []
        for i in ids:
            try:
                keys.append(storage.parse_key(i))
            except ValueError:
                continue
        return tuple(keys)

    def _ids(self, ids: Iterable[str]) -> Criterion:
        keys = self.parse_keys(self.key, ids)
        return any_of([In(self.key, keys)] if keys else [])

    async def read(self, rid: str) -> dict[str, Any] | None:
        if not ID_RE.match(rid):
            raise InvalidId("the resource id is not valid (1-64 of A-Z a-z 0-9 - .)")
        page = await self._fetch(Query(self._ids([rid]), self.key_sort, count=1))
        return self.resource(page.records[0]) if page.records else None

    async def read_many(self, ids: Iterable[str], limit: int) -> list[dict[str, Any]]:
        wanted = [i for i in dict.fromkeys(ids) if ID_RE.match(i)][:limit]
        if not wanted:
            return []
        page = await self._fetch(Query(self._ids(wanted), self.key_sort, count=len(wanted)))
        with tracing.traced("map batch", {"fhir.resource_type": self.resource_type,
                                          "ccg.records": len(page.records)}):
            return [self.resource(r) for r in page.records]

    async def search(
        self,
        plan: SearchPlan,
        after: tuple[Any, ...] | None = None,
        backwards: bool = False,
        extra: Criterion | None = None,
    ) -> Page:
        criteria = plan.criteria
        if extra is not None:
            criteria = extra if criteria is None else And((criteria, extra))
        query = Query(
            criteria=criteria,
            sort=plan.sort,
            count=plan.count,
            after=after,
            backwards=backwards,
            with_total=plan.total == "accurate",
        )
        return await self._fetch(query)

    async def count(self, plan: SearchPlan) -> int:
        return await self._count(plan.criteria)

    def to_record(self, resource: dict[str, Any]) -> dict[str, Any]:
        """The source record a resource becomes when written (reverse mapping)."""
        try:
            return self._reverse(resource)
        except ReverseError as exc:
            raise ResourceInvalid(exc.problems) from None

    async def write(self, write: Write) -> WriteResult:
        compartment.check_write(self, write)
        audit.note_backend(self, write.interaction, None)
        with _backend_call(self, write.interaction):
            result = await self.mapping.adapter.write(self.mapping.prepared, write)
        audit.note_written(self, result.id)
        return result

    def reference_values(self, rec: Any, ref: str) -> Iterator[str]:
        """Values of a reference column in a record or any of its children."""
        if not isinstance(rec, dict):  # a tuple in the adapter's layout
            yield from self._row_values(rec, ref)
            return
        value = rec.get(ref)
        if value is not None:
            yield str(value)
            return
        for key, rows in rec.items():
            if key.startswith("@"):
                for row in rows:
                    v = row.get(ref)
                    if v is not None:
                        yield str(v)


    def _row_values(self, rec: tuple[Any, ...], ref: str) -> Iterator[str]:
        places = self._places.get(ref)
        if places is None:
            assert self.layout is not None
            top = self.layout.position(ref)
            first = len(self.layout.fields)  # children's rows follow the top-level fields
            inner = [(first + i, fields.index(ref))
                     for i, (_, fields) in enumerate(self.layout.children) if ref in fields]
            places = self._places[ref] = (top, inner)
        top, inner = places
        if top is not None and rec[top] is not None:
            yield str(rec[top])
            return
        for at, i in inner:
            for row in rec[at]:
                if row[i] is not None:
                    yield str(row[i])


@contextmanager
def _backend_call(provider: Provider, operation: str) -> Iterator[None]:
    """Time a backend call (request log, metrics; a span while tracing), and translate its
    errors at this boundary."""
    mapping = provider.mapping
    if tracing.enabled():
        name = observability.adapter_name(mapping.adapter)
        with observability.backend_span(mapping.connection, name, operation):
            yield from _timed_call(mapping, operation)
        return
    yield from _timed_call(mapping, operation)  # a plain generator: no second context manager


def _timed_call(mapping: CompiledMapping, operation: str) -> Iterator[None]:
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        yield
    except (BackendError, UnsupportedCriteria) as exc:
        error = exc
        raise translate_backend_error(exc) from exc
    except BaseException as exc:
        error = exc
        raise
    finally:
        elapsed = time.perf_counter() - started
        adapter_seconds.set(adapter_seconds.get() + elapsed)
        metrics.observe_adapter(mapping.connection, observability.adapter_name(mapping.adapter),
                                operation, elapsed, error)


def translate_backend_error(exc: Exception) -> Exception:
    if isinstance(exc, BackendTimeout):
        return GatewayTimeout(str(exc))
    if isinstance(exc, BackendUnavailable):
        return ServiceUnavailable(str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, BackendRejected):
        return UpstreamRejected(str(exc))
    if isinstance(exc, BackendError):
        return UpstreamError(str(exc))
    if isinstance(exc, UnsupportedCriteria):
        return UnsupportedSearch(str(exc))
    return InternalError("the backend failed unexpectedly")


class Registry:
    def __init__(self, providers: Iterable[Provider]) -> None:
        self._providers = {p.resource_type: p for p in providers}

    def __contains__(self, resource_type: str) -> bool:
        return resource_type in self._providers

    def __iter__(self) -> Iterator[Provider]:
        return iter(sorted(self._providers.values(), key=lambda p: p.resource_type))

    def get(self, resource_type: str) -> Provider:
        provider = self._providers.get(resource_type)
        if provider is None:
            raise UnknownResourceType(f"this server does not serve resource type {resource_type!r}"
                                      if resource_type.isalnum() else
                                      "this server does not serve that resource type")
        return provider

    def search_context(self, provider: Provider) -> SearchContext:
        m = provider.mapping

        def revinclude_source(rtype: str, param: str) -> SearchParam | None:
            other = self._providers.get(rtype)
            if other is None:
                return None
            p = other.params.get(param)
            return p if p is not None and p.type == "reference" else None

        return SearchContext(
            resource_type=provider.resource_type,
            params=provider.params,
            policy=m.spec.search_policy,
            sortable=m.spec.sort,
            key_ref=m.spec.id.source_ref or "",
            storage=m.storage,
            codemaps=m.codemaps,
            tz=m.tz,
            include_targets=lambda t: t in self._providers,
            revinclude_sources=revinclude_source,
        )

    def plan(self, provider: Provider, pairs: list[tuple[str, str]], *, default_count: int,
             max_count: int, strict: bool) -> SearchPlan:
        plan = plan_search(self.search_context(provider), pairs, default_count=default_count,
                           max_count=max_count, strict=strict)
        audit.note_search(provider.resource_type, plan.used)
        return plan

    async def aclose(self) -> None:
        seen: set[int] = set()
        for p in self._providers.values():
            adapter = p.mapping.adapter
            if id(adapter) not in seen:
                seen.add(id(adapter))
                await adapter.aclose()
