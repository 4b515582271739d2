"""A patient's record across every source: what ``$everything`` and declared extracts share.

A *section* is one source of one compartment type (Encounter has three). Its query is the
patient's link (the compartment's own patient column, gateway.compartment) ANDed with what
the caller narrowed by, planned by the same planner as a search; one statement per section
per page, and referenced resources are fetched in one statement per type: the number of
statements never grows with the number of resources.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import anyio
import orjson

from adapters.base import Compare, Criterion, Nothing, Page, all_of, any_of
from gateway import compartment
from gateway.auth.principal import Principal
from gateway.errors import GatewayError, InvalidParameter, operation_outcome
from gateway.multisource import SOURCE_FAILURES, source_name
from gateway.notices import notice
from gateway.plan import SearchPlan, plan_search
from gateway.providers import Provider
from gateway.registry import Registry
from gateway.timing import adapter_seconds

T = TypeVar("T")

REFERENCED = ("Practitioner", "Organization", "Location", "Medication")
"""Types a record brings along when its resources refer to them (STU3 $everything)."""


def sections(registry: Registry, types: set[str] | None, principal: Principal
             ) -> tuple[list[Provider], list[str]]:
    """The sources of every patient-compartment type the caller may read (type order, then
    source order); and the types left out because the scopes do not allow reading them."""
    out: list[Provider] = []
    denied: list[str] = []
    for tp in registry:
        rtype = tp.resource_type
        if rtype == compartment.PATIENT or (types is not None and rtype not in types):
            continue
        linked = [s for s in tp.sources if compartment.link(s).kind == "reference"]
        if not linked:
            continue
        if not principal.allows(rtype, "r"):
            denied.append(rtype)
            continue
        out += linked
    return out, denied


def patient_criterion(source: Provider, patient: str) -> Criterion:
    found: list[Criterion] = []
    for ref in compartment.link(source).refs:
        try:
            found.append(Compare(ref, "=", source.mapping.storage(ref).parse_key(patient)))
        except ValueError:  # an id that cannot exist in this column
            found.append(Nothing())
    return any_of(found)


def since_criterion(source: Provider, since: dt.datetime) -> Criterion | None:
    """``meta.lastUpdated >= since`` on the source's column, or None when it has none."""
    spec = source.mapping.spec.last_updated
    ref = spec.source_ref if spec is not None else None
    if ref is None:
        return None
    storage = source.mapping.storage(ref)
    if storage.kind != "datetime":
        return None
    local = since.astimezone(source.mapping.tz).replace(tzinfo=None)
    return Compare(ref, ">=", storage.bound(local))


def section_plan(registry: Registry, source: Provider, patient: str, count: int, *,
                 date_pairs: Iterable[tuple[str, str]] = (), since: dt.datetime | None = None,
                 sort: str | None = None) -> SearchPlan:
    """One section's query: the patient's, narrowed by dates on its ``date`` parameter (if
    it declares one) and by lastUpdated; sorted by ``sort`` when the source allows it."""
    pairs = [(n, v) for n, v in date_pairs if n in source.params]
    if sort and sort.lstrip("-") in source.sortable:
        pairs.append(("_sort", sort))
    ctx = dataclasses.replace(registry.search_context(source), policy=None)
    plan = plan_search(ctx, pairs, default_count=count, max_count=max(count, 1), strict=True)
    criteria = [patient_criterion(source, patient)]
    if plan.criteria is not None:
        criteria.append(plan.criteria)
    if since is not None:
        found = since_criterion(source, since)
        if found is not None:
            criteria.append(found)
    plan.criteria = all_of(criteria)
    plan.count = count
    return plan


async def fetch(source: Provider, plan: SearchPlan, after: tuple[Any, ...] | None,
                strict: bool, failed: list[str]) -> Page | None:
    """One section's page; a source that does not answer is noted (or, strict, the error)."""
    try:
        return await source.search(plan, after)
    except GatewayError as exc:
        if strict or exc.status not in SOURCE_FAILURES:
            raise
        failed.append(f"{source.resource_type} source '{source_name(source)}' did not answer "
                      f"({exc.error_code})")
        return None


async def gather(first: Awaitable[T], rest: list[Awaitable[Page | None]]
                 ) -> tuple[T, list[Page | None]]:
    """``first`` and ``rest`` concurrently (the adapters run them on their threads); the
    first error, if any, is raised as itself (not as a group)."""
    results: list[Any] = [None] * (1 + len(rest))
    errors: list[BaseException] = []

    async def one(i: int, aw: Awaitable[Any]) -> None:
        try:
            results[i] = await aw
        except Exception as exc:  # re-raised below, the first one, as it was
            errors.append(exc)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, aw in enumerate([first, *rest]):
            tg.start_soon(one, i, aw)
    # The tasks' own timing stays in their contexts: the request log gets the wall time.
    adapter_seconds.set(adapter_seconds.get() + time.perf_counter() - started)
    if errors:
        raise errors[0]
    return results[0], results[1:]


# A "reference" key and its string value in orjson's compact output. Inside a JSON string a
# quote is always escaped (\"), so `{"reference":"` or `,"reference":"` is only ever a key;
# a value holding a quote, backslash or slash is no id (ID_RE refuses it anyway).
_REFERENCE = re.compile(rb'"reference":"(' + b"|".join(t.encode() for t in REFERENCED)
                        + rb')/([^"\\/]+)"')
_KEY_BEFORE = b"{,"  # a key's opening quote follows one of these (not an escaped \")


def referenced_ids(resources: list[dict[str, Any]]) -> dict[str, dict[str, None]]:
    """type → ids (first-seen order) of every Practitioner/Organization/Location/Medication
    reference in the resources, at any depth. One C-speed pass (orjson, then a regex) over
    the page instead of a Python walk of every node: the walk was ~20 % of a 500-resource
    $everything page."""
    wanted: dict[str, dict[str, None]] = {}
    blob = orjson.dumps(resources)
    for m in _REFERENCE.finditer(blob):  # a literal prefix: re scans with a fast search
        if blob[m.start() - 1] not in _KEY_BEFORE:
            continue
        wanted.setdefault(m[1].decode(), {})[m[2].decode()] = None
    return wanted


async def referenced(registry: Registry, resources: list[dict[str, Any]],
                     principal: Principal, types: set[str] | None) -> list[dict[str, Any]]:
    """The Practitioners, Organizations, Locations and Medications the resources refer to
    (that the caller may read): one statement per type (per source)."""
    if types is not None and not types.intersection(REFERENCED):
        return []
    wanted = referenced_ids(resources)
    out: list[dict[str, Any]] = []
    for rtype in REFERENCED:
        ids = wanted.get(rtype)
        if not ids or rtype not in registry or (types is not None and rtype not in types):
            continue
        if not principal.allows(rtype, "r"):
            continue
        out += await registry.get(rtype).read_many(list(ids), len(ids))
    return out


def parse_since(raw: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidParameter("'_since' is not an instant (e.g. 2024-01-31T09:00:00Z)") from None
    if moment.tzinfo is None:
        raise InvalidParameter("'_since' needs a time zone (an instant)")
    return moment


def parse_day(name: str, raw: str) -> str:
    """A date (YYYY, YYYY-MM or YYYY-MM-DD), checked."""
    try:
        if len(raw) == 4 and raw.isdigit():
            return raw
        if len(raw) == 7:
            dt.date.fromisoformat(raw + "-01")
            return raw
        if len(raw) == 10:
            dt.date.fromisoformat(raw)
            return raw
    except ValueError:
        pass
    raise InvalidParameter(f"'{name}' is not a date (YYYY, YYYY-MM or YYYY-MM-DD)")


def warnings(messages: list[str], code: str = "SOURCE_UNAVAILABLE") -> list[dict[str, Any]]:
    if not messages:
        return []
    oo = operation_outcome([notice(code, m) for m in messages])
    return [{"resource": oo, "search": {"mode": "outcome"}}]
