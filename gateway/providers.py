"""One provider per source of a resource type, built from its compiled mapping.

A provider turns records into resources (plain dicts, via the compiled mapping) and runs
reads and searches through its adapter. The registry (gateway.registry) holds one per type,
composing the providers of a type served by several sources (gateway.multisource).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from adapters.base import (
    And,
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Compare,
    Count,
    Criterion,
    DuplicateKey,
    Fetch,
    In,
    Page,
    Query,
    QueryTooLarge,
    SortKey,
    UnknownKey,
    UnsupportedCriteria,
    Write,
    WriteRefused,
    WriteResult,
    any_of,
)
from gateway import audit, chain, compartment, limits, metrics, observability, tracing
from gateway.errors import (
    DuplicateIdentifier,
    GatewayError,
    GatewayTimeout,
    InternalError,
    InvalidId,
    InvalidPageToken,
    NotFound,
    ResourceInvalid,
    ResourceRejected,
    ServiceUnavailable,
    TooManyValues,
    UnknownReference,
    UnsupportedSearch,
    UpstreamError,
    UpstreamRejected,
)
from gateway.mapping.elements import element_paths
from gateway.mapping.loader import CompiledMapping
from gateway.mapping.model import SearchParam
from gateway.mapping.reverse import ReverseContext, ReverseError, compile_reverse
from gateway.plan import SearchPlan
from gateway.search import ID_RE
from gateway.timing import adapter_seconds

__all__ = ["SOURCE_FAILURES", "Failed", "Provider", "adapter_seconds", "left_out",
           "source_name", "translate_backend_error"]

T = TypeVar("T")

SOURCE_FAILURES = frozenset({502, 503, 504})
"""The statuses of a source that did not answer (as against one that refused the request)."""

Failed = list[tuple[str, GatewayError]]
"""(source name, error) of each source an ``_include``, ``_revinclude`` or a referenced
type's read went without."""


class Provider:
    def __init__(self, mapping: CompiledMapping) -> None:
        self.mapping = mapping
        self.resource_type = mapping.spec.resource
        self.profile = mapping.spec.profile
        self.params: dict[str, SearchParam] = dict(mapping.spec.search)
        self.key = mapping.spec.id.source_ref or ""
        self.key_sort = (SortKey(self.key),)
        self.id_prefix = mapping.spec.id_prefix or ""
        self.sortable: list[str] = list(mapping.spec.sort)
        self.policy = mapping.spec.search_policy
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

    @property
    def sources(self) -> list[Provider]:
        return [self]

    def record_id(self, rec: Any) -> str:
        return self.id_prefix + str(self._build_id(rec))

    def resource(self, rec: Any) -> dict[str, Any]:
        out = self._bare(rec)
        compartment.check_resource(self, rec, out)  # fails the request outside the compartment
        audit.note_resource(self, rec, out)
        return out

    def resources(self, recs: Sequence[Any]) -> list[dict[str, Any]]:
        """:meth:`resource` of each record; the request's compartment and audit context are
        looked up once, not per resource (a record page serves hundreds)."""
        out = [self._bare(rec) for rec in recs]
        compartment.check_resources(self, recs, out)  # fails the request outside the compartment
        audit.note_resources(self, recs, out)
        return out

    def _bare(self, rec: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {"profile": [self.profile]}
        if self._build_lu is not None:
            updated = self._build_lu(rec)
            if updated is not None:
                meta["lastUpdated"] = updated
        out: dict[str, Any] = {
            "resourceType": self.resource_type,
            "id": self.id_prefix + str(self._build_id(rec)),
            "meta": meta,
        }
        out.update(self._build(rec))
        return out

    # -- backend calls, with errors translated at this boundary

    async def _fetch(self, query: Query) -> Page:
        query = compartment.restrict_query(self, query)  # patient/ tokens: in every query
        audit.note_backend(self, "fetch", query)
        adapter, prepared = self.mapping.adapter, self.mapping.prepared
        if adapter.shares(prepared, query):
            # A read by key shares one statement with the concurrent ones, one statement at a
            # time per mapping: it cannot hold more than that worker, and queued per client
            # it could no longer share (a lone busy client's reads went one by one).
            with _backend_call(self, "fetch"):
                return await adapter.fetch(prepared, query)
        async with limits.backend_slot():  # the client's own queue (gateway/limits.py)
            with _backend_call(self, "fetch"):
                return await adapter.fetch(prepared, query)

    # -- several queries in one backend call (adapters.base.Adapter.batch)

    @property
    def batches(self) -> bool:
        """Whether this source's adapter runs several queries in one go (:meth:`batch`)."""
        return self.mapping.adapter.batches

    async def batch(self, work: Callable[[Fetch], T]) -> T:
        """``work(fetch)`` as one backend call on this source's connection: one of the
        client's backend slots, timed, and its errors translated, as one :meth:`_fetch` is.
        ``work`` runs on the adapter's thread and asks each query through :meth:`fetch_in`
        (of this source or of another on the same adapter)."""
        async with limits.backend_slot():
            with _backend_call(self, "fetch"):
                return await self.mapping.adapter.batch(work)

    def fetch_in(self, fetch: Fetch, query: Query) -> Page:
        """One query of a :meth:`batch`: confined to the token's compartment and noted for
        the audit trail, as every query :meth:`_fetch` sends. Backend failures come as the
        adapter's errors (``translate_backend_error`` gives the gateway's)."""
        query = compartment.restrict_query(self, query)  # patient/ tokens: in every query
        audit.note_backend(self, "fetch", query)
        return fetch(self.mapping.prepared, query)

    def read_query(self, rid: str) -> Query:
        """The query :meth:`read` sends for ``rid``."""
        if not ID_RE.match(rid):
            raise InvalidId("the resource id is not valid (1-64 of A-Z a-z 0-9 - .)")
        return Query(self._ids([rid]), self.key_sort, count=1)

    def read_many_query(self, ids: Iterable[str], limit: int) -> Query | None:
        """The query :meth:`read_many` sends for ``ids`` (None: no valid id, no query)."""
        wanted = [i for i in dict.fromkeys(ids) if ID_RE.match(i)][:limit]
        if not wanted:
            return None
        return Query(self._ids(wanted), self.key_sort, count=len(wanted))

    async def _count(self, criteria: Criterion | None) -> int:
        query = compartment.restrict_count(self, Count(criteria))
        audit.note_backend(self, "count", query)
        async with limits.backend_slot():
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
        pre = self.id_prefix
        keys = self.parse_keys(self.key, (i[len(pre):] for i in ids if i.startswith(pre)))
        return any_of([In(self.key, keys)] if keys else [])

    async def read(self, rid: str) -> dict[str, Any] | None:
        page = await self._fetch(self.read_query(rid))
        return self.resource(page.records[0]) if page.records else None

    async def read_many(self, ids: Iterable[str], limit: int, failed: Failed | None = None
                        ) -> list[dict[str, Any]]:
        """The resources of ``ids`` (at most ``limit``). ``failed`` given (an ``_include``
        without strict): a source that does not answer (502/503/504) is left out and named
        there, rather than failing the request."""
        query = self.read_many_query(ids, limit)
        if query is None:
            return []
        try:
            page = await self._fetch(query)
        except GatewayError as exc:
            left_out(self, exc, failed)
            return []
        return self.mapped(page.records)

    def mapped(self, records: Sequence[Any]) -> list[dict[str, Any]]:
        """:meth:`resources`, traced as a batch."""
        with tracing.traced("map batch", {"fhir.resource_type": self.resource_type,
                                          "ccg.records": len(records)}):
            return self.resources(records)

    async def search(
        self,
        plan: SearchPlan,
        after: tuple[Any, ...] | None = None,
        backwards: bool = False,
        extra: Criterion | None = None,
    ) -> Page:
        await chain.resolve(plan)  # chains this source cannot join: through their target
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
        try:
            return await self._fetch(query)
        except UpstreamRejected as exc:
            if after is None or self.mapping.adapter.keyset_paging:
                raise
            # The backend's own continuation (an HL7 v2 DSC-1 pointer) refused: it expired,
            # or the backend cannot take it again. Asking again would meet the same refusal.
            raise InvalidPageToken(
                "the paging link can no longer be followed: the source refused to continue "
                f"the search from where the link stands ({exc.message}); start the search "
                "again") from exc

    async def count(self, plan: SearchPlan) -> int:
        await chain.resolve(plan)
        return await self._count(plan.criteria)

    def position(self, rec: Any, sort: tuple[SortKey, ...]) -> tuple[Any, ...]:
        """The keyset position of one record (its sort-key values, as the adapter pages)."""
        if isinstance(rec, dict):
            return tuple(rec.get(k.ref) for k in sort)
        assert self.layout is not None
        return tuple(rec[self.layout.fields.index(k.ref)] for k in sort)

    def page_outcome(self, page: Page) -> list[dict[str, Any]]:
        """Outcome entries a page needs (one source: none; see gateway.multisource)."""
        return []

    def reference_ids(self, rec: Any, param: str, target: str) -> Iterator[str]:
        """The ids a record's reference parameter ``param`` holds for ``target`` (with the
        id prefix of the target's source each column points at)."""
        for c in self.params[param].reference_columns():
            if c.target == target:
                for v in self.reference_values(rec, c.ref):
                    yield c.prefix + v

    async def revinclude(self, param: str, target: str, ids: list[str], limit: int,
                         prefixes: Sequence[str] = (), failed: Failed | None = None
                         ) -> tuple[list[dict[str, Any]], bool]:
        """Resources whose ``param`` refers to one of ``ids`` (at most ``limit``; and whether
        there were more). ``prefixes``: the id prefixes of the target's sources, so each
        column is asked only for the ids of the source whose keys it holds. ``failed``: as
        for :meth:`read_many`."""
        try:
            return await self._revinclude(param, target, ids, limit, prefixes)
        except GatewayError as exc:
            left_out(self, exc, failed)
            return [], False

    async def _revinclude(self, param: str, target: str, ids: list[str], limit: int,
                          prefixes: Sequence[str]) -> tuple[list[dict[str, Any]], bool]:
        wanted: list[tuple[str, tuple[Any, ...]]] = []
        for c in self.params[param].reference_columns():
            if c.target != target:
                continue
            mine = [i[len(c.prefix):] for i in ids if _owner(prefixes, i) == c.prefix]
            keys = self.parse_keys(c.ref, mine)
            if keys:
                wanted.append((c.ref, keys))
        if not wanted:
            return [], False
        # Not a client search: no search policy applies, only the link to this page.
        sub = SearchPlan(criteria=None, sort=self.key_sort, count=limit)
        try:
            page = await self.search(sub, extra=any_of([In(ref, keys) for ref, keys in wanted]))
            records = page.records
            more = page.more
        except UnsupportedSearch:
            # A source that cannot ask for several at once (HL7 v2 queries): one by one.
            records = []
            more = False
            for ref, keys in wanted:
                for key in keys:
                    page = await self.search(sub, extra=Compare(ref, "=", key))
                    more = more or page.more or len(records) + len(page.records) > limit
                    records += page.records[: max(0, limit - len(records))]
        return [self.resource(r) for r in records], more

    def to_record(self, resource: dict[str, Any]) -> dict[str, Any]:
        """The source record a resource becomes when written (reverse mapping)."""
        try:
            return self._reverse(resource)
        except ReverseError as exc:
            raise ResourceInvalid(exc.problems) from None

    async def write(self, write: Write) -> WriteResult:
        compartment.check_write(self, write)
        audit.before_write()  # the attempt record, or no write at all
        audit.note_backend(self, write.interaction, None)
        async with limits.backend_slot():
            with _backend_call(self, write.interaction):
                result = await self.mapping.adapter.write(self.mapping.prepared, write)
        audit.note_written(self, result.id, write.record)
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


def source_name(provider: Provider) -> str:
    """A source's name for people: its mapping file, without the extension."""
    return provider.mapping.file.name.removesuffix(".yaml")


def left_out(source: Provider, exc: GatewayError, failed: Failed | None) -> None:
    """Notes a source that did not answer in ``failed`` (None: strict, so its error is the
    answer, as is any error but 502/503/504)."""
    if failed is None or exc.status not in SOURCE_FAILURES:
        raise exc
    failed.append((source_name(source), exc))


def _owner(prefixes: Sequence[str], rid: str) -> str:
    """The prefix of the source ``rid`` belongs to among ``prefixes`` ("" for none)."""
    return max((p for p in prefixes if rid.startswith(p)), key=len, default="")


def _backend_call(provider: Provider, operation: str) -> AbstractContextManager[None]:
    """Time a backend call (request log, metrics; a span while tracing), and translate its
    errors at this boundary."""
    mapping = provider.mapping
    if tracing.enabled():
        return _traced_call(mapping, operation)
    return _TimedCall(mapping, operation)  # no generator to make and drive per call


@contextmanager
def _traced_call(mapping: CompiledMapping, operation: str) -> Iterator[None]:
    name = observability.adapter_name(mapping.adapter)
    with observability.backend_span(mapping.connection, name, operation), \
            _TimedCall(mapping, operation):
        yield


class _TimedCall:
    """The timing and error translation of one backend call, as a plain context manager."""

    __slots__ = ("mapping", "operation", "started")

    def __init__(self, mapping: CompiledMapping, operation: str) -> None:
        self.mapping = mapping
        self.operation = operation
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, _type: type[BaseException] | None, exc: BaseException | None,
                 _tb: Any) -> None:
        elapsed = time.perf_counter() - self.started
        adapter_seconds.set(adapter_seconds.get() + elapsed)
        mapping = self.mapping
        metrics.observe_adapter(mapping.connection, observability.adapter_name(mapping.adapter),
                                self.operation, elapsed, exc)
        if isinstance(exc, BackendError | UnsupportedCriteria | WriteRefused):
            raise translate_backend_error(exc, mapping) from exc


def _refusal(exc: WriteRefused, mapping: CompiledMapping | None) -> GatewayError:
    """A write the backend refused for what was sent: the first refusal's 4xx, every
    further one an issue of its own, each located at the elements its field feeds."""
    others = tuple(_refusal(o, mapping) for o in exc.others)
    at = tuple(element_paths(mapping.spec.output, mapping.resource_type, exc.location)
               if mapping is not None and exc.location else ())
    if isinstance(exc, DuplicateKey):
        return DuplicateIdentifier(str(exc), others=others, expressions=at)
    if isinstance(exc, UnknownKey):
        if exc.own:  # the record written to is not there: nothing else to say
            return NotFound(str(exc))
        return UnknownReference(str(exc), others=others, expressions=at)
    return ResourceRejected(str(exc), others=others, expressions=at)


def translate_backend_error(exc: Exception, mapping: CompiledMapping | None = None
                            ) -> Exception:
    """The gateway's error for an adapter's; ``mapping``, where known, locates a refused
    write's fault in the resource."""
    if isinstance(exc, WriteRefused):
        return _refusal(exc, mapping)
    if isinstance(exc, BackendTimeout):
        return GatewayTimeout(str(exc))
    if isinstance(exc, BackendUnavailable):
        return ServiceUnavailable(str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, BackendRejected):
        return UpstreamRejected(str(exc))
    if isinstance(exc, BackendError):
        return UpstreamError(str(exc))
    if isinstance(exc, QueryTooLarge):
        return TooManyValues(str(exc))
    if isinstance(exc, UnsupportedCriteria):
        return UnsupportedSearch(str(exc))
    return InternalError("the backend failed unexpectedly")
