"""``mappings explain``: what a FHIR search would do, worked out without running it.

The same planner and adapter code as a request (``Registry.plan``, the adapter's statement
builder), stopped before anything is sent: the parameters used and ignored, the criteria's
shape, the page and sort, and the adapter's own account — SQL with placeholders, or the HL7
v2 message type and QPD fields — and the children queried per page. Never a value from the
search: the adapters render placeholders, and the criteria are shown as shapes. Each source's
estimated cost as the budget check sees it (gateway.cost); with ``cost``, also the database's
own estimate (``EXPLAIN``, never ``ANALYZE``: nothing runs).

The same explanation for one request while serving (``log_search_plan``): a search sent with
``X-Explain: plan`` by a principal whose role is an admin role (``CCG_ADMIN_ROLES``) writes
it as one DEBUG line, ``search_explained``, with the request's id. For anyone else the header
is ignored — no error (it changes nothing the client sees) and nothing logged.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog

from adapters.base import In, Query, UnsupportedCriteria, all_of, any_of
from gateway import cost as search_cost
from gateway.audit import _shape
from gateway.auth import authorize
from gateway.chain import combined
from gateway.errors import BadRequest, GatewayError, UnknownResourceType
from gateway.mapping.loader import LoadedSet
from gateway.multisource import MultiPlan, MultiSource
from gateway.plan import SearchPlan
from gateway.providers import Provider, source_name
from gateway.registry import Registry, TypeProvider
from gateway.settings import Settings

log = structlog.get_logger("gateway.explain")
HEADER = "x-explain"


def parse_search(text: str) -> tuple[str, list[tuple[str, str]]]:
    """``Patient?family=smith`` (or a full URL ending in one) → type and parameter pairs."""
    parts = urlsplit(text.strip())
    path = parts.path.rstrip("/")
    rtype = path.rsplit("/", 1)[-1]
    if rtype == "_search":
        rtype = path.rsplit("/", 2)[-2]
    if not rtype[:1].isupper():
        raise BadRequest("give a search as 'Type?name=value&...', e.g. "
                         "'Patient?family=smith&gender=female'")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise BadRequest(f"the query string cannot be read: {exc}") from None
    return rtype, pairs


def explain(loaded: LoadedSet, settings: Settings, search: str, cost: bool = False
            ) -> list[str]:
    rtype, pairs = parse_search(search)
    registry = Registry(Provider(m) for m in loaded.mappings)
    served = sorted(p.resource_type for p in registry)
    if rtype not in served:
        raise UnknownResourceType(f"{rtype} is not served by {loaded.directory} (served: "
                                  f"{', '.join(served)})")
    provider = registry.get(rtype)
    plan = registry.plan(provider, pairs, default_count=settings.default_count,
                         max_count=settings.max_count, strict=settings.strict_search,
                         note=False)
    return describe(registry, provider, plan, cost=cost, budget=settings.search_cost_budget)


def describe(registry: Registry, provider: TypeProvider, plan: SearchPlan, *,
             cost: bool = False, budget: int = 0) -> list[str]:
    """The explanation of a search already planned (``cost``: ask the database too, which
    runs its own event loop: never while serving)."""
    rtype = provider.resource_type
    if isinstance(provider, MultiSource):
        assert isinstance(plan, MultiPlan)
        # one plan per source, each on its own columns; the pages are merged in _sort order
        lines = [f"{rtype} search: {len(provider.sources)} sources, merged in sort order "
                 "(a source that fails gives a warning entry, not a gap)"]
        lines += _shared(plan)
        for source, part in zip(provider.sources, plan.parts, strict=True):
            lines.append("")
            lines += _source(registry, source, part, cost, budget,
                             title=f"source {source_name(source)}"
                                   + (f" (ids {source.id_prefix}...)" if source.id_prefix
                                      else ""))
        return lines
    assert isinstance(provider, Provider)
    return _shared(plan, provider) + _source(registry, provider, plan, cost, budget)


def _shared(plan: SearchPlan, provider: Provider | None = None) -> list[str]:
    lines: list[str] = []
    if provider is not None:
        m = provider.mapping
        lines.append(f"{provider.resource_type} search: {m.file.name} via connection "
                     f"'{m.connection}' ({m.adapter.name} adapter)")
    lines += ["parameters used: " + (", ".join(name for name, _ in plan.used) or "(none)"),
              "ignored: " + (", ".join(plan.ignored) or "(none)")]
    if plan.summary_count:
        lines.append("_summary=count: the count only, no records")
    for inc in plan.includes:
        target = "" if inc.target == "*" else f" {inc.target}"
        lines.append(f"_include {inc.param}: the page's{target} references, read by id")
    for rev in plan.revincludes:
        lines.append(f"_revinclude {rev.source_type}:{rev.param}: a search of "
                     f"{rev.source_type} by {rev.param} for the page's ids")
    return lines


def _source(registry: Registry, provider: Provider, plan: SearchPlan, cost: bool,
            budget: int = 0, title: str | None = None) -> list[str]:
    """One source's part: its criteria, sort, chains and the adapter's own account."""
    m = provider.mapping
    lines: list[str] = []
    if title is not None:
        lines.append(f"{title}: {m.file.name} via connection '{m.connection}' "
                     f"({m.adapter.name} adapter)")
    lines.append(f"criteria: {_shape(plan.criteria)}  (? = a value from the search)")
    lines.append("sort: " + ", ".join(("-" if k.descending else "") + k.ref for k in plan.sort)
                 + f"; page size {plan.count}")
    estimate = search_cost.estimate(plan.criteria, provider.key.split(".", 1)[0])
    over = "; over it: 400 SEARCH_TOO_COSTLY" if budget and estimate > budget else ""
    lines.append(f"estimated cost: {estimate} "
                 + (f"(budget {budget}{over})" if budget else "(no budget)"))
    deferreds = combined(plan.deferred)  # as they run: one search per reference and target
    for deferred in deferreds:
        # a chain the adapter cannot join: the target's search runs first (the links then
        # carry what it found, gateway.chain.resolve_request)
        for part in deferred.parts:
            t = part.target.mapping
            lines.append(f"chain {deferred.label}: first a search of {part.target.resource_type} "
                         f"({t.file.name}, {_shape(part.criteria)}); the keys found become "
                         f"{part.ref} in ?[n]")
    criteria = plan.criteria
    if plan.deferred:  # as the query is sent once the chains' searches have found their keys
        criteria = all_of([c for c in (criteria, *(
            any_of([In(part.ref, ("?",)) for part in d.parts]) for d in deferreds))
            if c is not None])
    query = Query(criteria=criteria, sort=plan.sort, count=plan.count,
                  with_total=plan.total == "accurate")
    try:
        lines += m.adapter.explain(m.prepared, query)
    except UnsupportedCriteria as exc:
        lines.append(f"not sent: {exc} (the request would get 400 UNSUPPORTED_SEARCH)")
        return lines
    if cost:  # the one part that connects: the database plans the statement, runs nothing
        import anyio

        async def ask() -> list[str]:
            try:
                return await m.adapter.estimate(m.prepared, query)
            finally:
                await registry.aclose()

        lines += anyio.run(ask)
    return lines


def log_search_plan(request: Any, registry: Registry, provider: TypeProvider,
                    plan: SearchPlan, settings: Settings) -> None:
    """One DEBUG line explaining this search, if asked for (``X-Explain: plan``) by an admin."""
    if request.headers.get(HEADER, "").strip().lower() != "plan":
        return
    principal = authorize.admin(request, settings.admin_roles)
    if principal is None:
        return  # not an admin: ignored, and nothing said about the plan
    try:
        lines = describe(registry, provider, plan, budget=settings.search_cost_budget)
    except Exception as exc:  # a diagnostic must never fail the search it describes
        log.warning("search_explain_failed", error=type(exc).__name__)
        return
    log.debug("search_explained", resource_type=provider.resource_type,
              client_id=principal.client_id, role=principal.role, plan=lines)


def explain_cli(loaded: LoadedSet, settings: Settings, search: str, cost: bool = False) -> int:
    try:
        lines = explain(loaded, settings, search, cost)
    except GatewayError as exc:
        print(f"{exc.error_code}: {exc.message}")
        return 1
    for line in lines:
        print(line)
    return 0
