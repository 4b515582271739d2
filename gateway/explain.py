"""``mappings explain``: what a FHIR search would do, worked out without running it.

The same planner and adapter code as a request (``Registry.plan``, the adapter's statement
builder), stopped before anything is sent: the parameters used and ignored, the criteria's
shape, the page and sort, and the adapter's own account — SQL with placeholders, or the HL7
v2 message type and QPD fields — and the children queried per page. Never a value from the
search: the adapters render placeholders, and the criteria are shown as shapes. With
``cost``, the database's own estimate (``EXPLAIN``, never ``ANALYZE``: nothing runs).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from adapters.base import Query, UnsupportedCriteria
from gateway.audit import _shape
from gateway.errors import BadRequest, GatewayError, UnknownResourceType
from gateway.mapping.loader import LoadedSet
from gateway.providers import Provider, Registry
from gateway.settings import Settings


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
                         max_count=settings.max_count, strict=settings.strict_search)
    m = provider.mapping
    lines = [f"{rtype} search: {m.file.name} via connection '{m.connection}' "
             f"({m.adapter.name} adapter)",
             "parameters used: " + (", ".join(name for name, _ in plan.used) or "(none)"),
             "ignored: " + (", ".join(plan.ignored) or "(none)")]
    if plan.summary_count:
        lines.append("_summary=count: the count only, no records")
    lines.append(f"criteria: {_shape(plan.criteria)}  (? = a value from the search)")
    lines.append("sort: " + ", ".join(("-" if k.descending else "") + k.ref for k in plan.sort)
                 + f"; page size {plan.count}")
    for inc in plan.includes:
        target = "" if inc.target == "*" else f" {inc.target}"
        lines.append(f"_include {inc.param}: the page's{target} references, read by id")
    for rev in plan.revincludes:
        lines.append(f"_revinclude {rev.source_type}:{rev.param}: a search of "
                     f"{rev.source_type} by {rev.param} for the page's ids")
    query = Query(criteria=plan.criteria, sort=plan.sort, count=plan.count,
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


def explain_cli(loaded: LoadedSet, settings: Settings, search: str, cost: bool = False) -> int:
    try:
        lines = explain(loaded, settings, search, cost)
    except GatewayError as exc:
        print(f"{exc.error_code}: {exc.message}")
        return 1
    for line in lines:
        print(line)
    return 0
