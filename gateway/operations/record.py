"""A patient's record across every source: what ``$everything`` and declared extracts share.

A *section* is one source of one compartment type (Encounter has three). Its query is the
patient's link (the compartment's own patient column, gateway.compartment) ANDed with what
the caller narrowed by, planned by the same planner as a search; one statement per section
per page, and referenced resources are fetched in one statement per type: the number of
statements never grows with the number of resources.

A page is walked section by section (:func:`walk`): the sections of one connection whose
adapter runs batches (SQL) in one backend call — one connection, one hop to its thread —
each asked for what the page still has room for, and none once the page is full; sections
of other adapters (HL7 v2) each in a call of its own, at the same time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import orjson

from adapters.base import (
    And,
    BackendError,
    Compare,
    Criterion,
    Fetch,
    Nothing,
    Page,
    Query,
    UnsupportedCriteria,
    all_of,
    any_of,
)
from gateway import compartment
from gateway.auth.principal import Principal
from gateway.errors import GatewayError, InvalidParameter, operation_outcome
from gateway.mapping.model import EXPR_KEYS
from gateway.multisource import MergedPage, MultiPlan
from gateway.notices import notice
from gateway.plan import SearchContext, SearchPlan, plan_search
from gateway.providers import (
    SOURCE_FAILURES,
    Failed,
    Provider,
    source_name,
    translate_backend_error,
)
from gateway.registry import Registry, TypeProvider
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


CARE_DATE: dict[str, tuple[str, ...]] = {
    "Condition": ("onset-date", "asserted-date"),
    "MedicationRequest": ("authoredon",),
    "MedicationStatement": ("effective",),
    "DocumentReference": ("period", "created"),
}
"""Each type's care-date search parameters for ``$everything``'s ``start``/``end``, in order
of preference: a resource is dated by the first one it has a value for (a Condition by its
onset, else the date it was asserted). A type not listed is dated by ``date``."""


def care_dates(source: Provider) -> list[str]:
    """The date parameters ``start``/``end`` narrow a section by (empty: not narrowed)."""
    names = CARE_DATE.get(source.resource_type, ("date",))
    return [n for n in names if n in source.params and source.params[n].type == "date"]


def care_date_criterion(ctx: SearchContext, source: Provider, start: str | None, end: str | None
                        ) -> Criterion | None:
    """``start``/``end`` (STU3 ``ge``/``le`` date search) on the source's care date: on its
    first care-date parameter, or on a later one where every earlier one has no value."""
    if not (start or end):
        return None
    names = care_dates(source)
    alternatives: list[Criterion] = []
    for i, name in enumerate(names):
        # this one has a value (a period without a start would match ``ge`` as ongoing)
        pairs = [(f"{n}:missing", "true") for n in names[:i]] + [(f"{name}:missing", "false")]
        pairs += [(name, f"ge{start}")] if start else []
        pairs += [(name, f"le{end}")] if end else []
        found = plan_search(ctx, pairs, default_count=1, max_count=1, strict=True).criteria
        if found is not None:
            alternatives.append(found)
    return any_of(alternatives) if alternatives else None


def section_plan(registry: Registry, source: Provider, patient: str, count: int, *,
                 start: str | None = None, end: str | None = None,
                 since: dt.datetime | None = None, sort: str | None = None) -> SearchPlan:
    """One section's query: the patient's, narrowed by ``start``/``end`` on its care date
    (:data:`CARE_DATE`, if it declares one) and by lastUpdated; sorted by ``sort`` when the
    source allows it."""
    pairs = [("_sort", sort)] if sort and sort.lstrip("-") in source.sortable else []
    ctx = dataclasses.replace(registry.search_context(source), policy=None)
    plan = plan_search(ctx, pairs, default_count=count, max_count=max(count, 1), strict=True)
    criteria = [patient_criterion(source, patient)]
    if plan.criteria is not None:
        criteria.append(plan.criteria)
    dated = care_date_criterion(ctx, source, start, end)
    if dated is not None:
        criteria.append(dated)
    if since is not None:
        found = since_criterion(source, since)
        if found is not None:
            criteria.append(found)
    plan.criteria = all_of(criteria)
    plan.count = count
    return plan


def patient_search_plan(registry: Registry, tp: TypeProvider, pairs: list[tuple[str, str]],
                        count: int, patient: str, whole: bool, *, default_count: int,
                        max_count: int) -> SearchPlan:
    """A declared section's search (the structured record's, ``$document``'s) as planned on
    its type, narrowed to the patient in every source; ``whole``: a source failing fails the
    search rather than giving a partial page."""
    plan = registry.plan(tp, pairs, default_count=default_count,
                         max_count=max(max_count, count), strict=True, note=False, whole=whole)
    parts = plan.parts if isinstance(plan, MultiPlan) else [plan]
    for source, part in zip(tp.sources, parts, strict=True):
        mine = patient_criterion(source, patient)
        part.criteria = mine if part.criteria is None else And((part.criteria, mine))
    return plan


class NothingKnownSpec(Protocol):
    """A source's explicit "nothing known" record: ``element`` holding this system and code
    (gateway.operations.structured.NothingKnown)."""

    element: str
    system: str
    code: str


def says_nothing_known(resource: dict[str, Any], nk: NothingKnownSpec) -> bool:
    node: Any = resource
    for part in nk.element.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    codings = node.get("coding", [node]) if isinstance(node, dict) else []
    return any(isinstance(c, dict) and c.get("system") == nk.system and c.get("code") == nk.code
               for c in codings)


async def declared_section(registry: Registry, tp: TypeProvider, pairs: list[tuple[str, str]],
                           count: int, patient: str, *, title: str,
                           nothing_known: NothingKnownSpec | None, whole: bool,
                           failed: list[str], default_count: int, max_count: int
                           ) -> tuple[list[dict[str, Any]], str | None]:
    """A declared section's resources (a structured record's List, a ``$document``
    section), and why it is empty (None: it is not), the same for both:

    * ``nilknown``: every record found is the source's explicit "nothing known" record (the
      records are returned, to travel with the section; the section lists none of them);
    * ``notasked``: the section declares ``nothing_known`` (so the source records "none"
      explicitly) and the patient has no record of the type at all, not even one the
      section's filters leave out (one more statement per source, only then);
    * ``no-content-recorded``: nothing the section asks for is recorded;
    * ``unavailable``: no source answered (noted in ``failed``; ``whole``: the error).
    """
    def plan(p: list[tuple[str, str]], n: int) -> SearchPlan:
        return patient_search_plan(registry, tp, p, n, patient, whole,
                                   default_count=default_count, max_count=max_count)

    try:
        page = await tp.search(plan(pairs, count))
        if (not page.records and nothing_known is not None
                and not (isinstance(page, MergedPage) and page.failed)):
            anything = await tp.search(plan([("_count", "1")], 1))
            if not anything.records and not (isinstance(anything, MergedPage)
                                             and anything.failed):
                return [], "notasked"  # nothing at all, not even "nothing known"
    except GatewayError as exc:
        if whole or exc.status not in SOURCE_FAILURES:
            raise
        failed.append(f"section '{title}': {tp.resource_type} did not answer "
                      f"({exc.error_code})")
        return [], "unavailable"
    found = [tp.resource(r) for r in page.records]
    if isinstance(page, MergedPage) and page.failed:
        failed += [f"section '{title}': {tp.resource_type} source '{name}' did not answer "
                   f"({exc.error_code})" for name, exc in page.failed]
        if not found:
            return [], "unavailable"
    if not found:
        return [], "no-content-recorded"
    if nothing_known is not None and all(says_nothing_known(r, nothing_known) for r in found):
        return found, "nilknown"
    return found, None


def failure(source: Provider, exc: GatewayError) -> str:
    """The warning a source that did not answer gets (no value, no PHI: the error code)."""
    return failure_of(source.resource_type, source_name(source), exc)


def failure_of(rtype: str, name: str, exc: GatewayError) -> str:
    """:func:`failure` of the source of ``rtype`` whose mapping file is ``name``."""
    return f"{rtype} source '{name}' did not answer ({exc.error_code})"


async def walk(registry: Registry, patient: str, sections: Sequence[Provider],
               plans: Sequence[SearchPlan], afters: Sequence[tuple[Any, ...] | None],
               count: int, strict: bool, failed: dict[int, GatewayError]
               ) -> tuple[dict[str, Any] | None, list[Page | None]]:
    """The patient (None: not found) and a page of each section, in section order: None for a
    section that did not answer (its index and error put in ``failed``; strict: its error is
    raised) or that the page had no room left for. ``afters``: each section's keyset
    position (None: from its start). The patient's source failing is always an error.

    Sections on an adapter that runs batches are asked in one backend call per connection,
    one after another, each for at most the room the page has left after the ones before it
    on that connection (never less than the room the whole page has left, so what
    ``everything`` takes from them is what a walk of every section in turn would take), and
    none once it is full; the patient's read goes in the first of those calls when its source
    is on that connection. The other sections are asked at the same time, each for a page.
    """
    pages: list[Page | None] = [None] * len(sections)
    groups: dict[int, list[int]] = {}
    alone: list[int] = []
    for i, (source, plan) in enumerate(zip(sections, plans, strict=True)):
        if source.batches and not plan.deferred:
            groups.setdefault(id(source.mapping.adapter), []).append(i)
        else:
            alone.append(i)
    patient_type = registry.get(compartment.PATIENT)
    reader = patient_type if isinstance(patient_type, Provider) else None
    read_query = reader.read_query(patient) if reader is not None else None
    with_patient = next((key for key in groups if reader is not None and reader.batches
                         and id(reader.mapping.adapter) == key), None)
    found: dict[str, Any] = {}

    def group_work(key: int, idxs: list[int]) -> Callable[[Fetch], Page | None]:
        def work(fetch: Fetch) -> Page | None:
            patient_page = None
            if key == with_patient:
                assert reader is not None and read_query is not None
                patient_page = reader.fetch_in(fetch, read_query)
                if not patient_page.records:
                    return patient_page  # no such patient: nothing else is asked
            room = count
            for i in idxs:
                if room <= 0:
                    break
                source, plan = sections[i], plans[i]
                query = Query(criteria=plan.criteria, sort=plan.sort, count=room,
                              after=afters[i],
                              with_total=plan.total == "accurate")  # as Provider.search
                try:
                    page = source.fetch_in(fetch, query)
                except (BackendError, UnsupportedCriteria) as exc:
                    error = translate_backend_error(exc)
                    if (strict or not isinstance(error, GatewayError)
                            or error.status not in SOURCE_FAILURES):
                        raise
                    failed[i] = error
                    continue
                pages[i] = page
                room -= len(page.records)
            return patient_page
        return work

    async def run_group(key: int, idxs: list[int]) -> None:
        try:
            patient_page = await sections[idxs[0]].batch(group_work(key, idxs))
        except GatewayError as exc:  # the connection itself (not one statement of it)
            if key == with_patient or strict or exc.status not in SOURCE_FAILURES:
                raise
            for i in idxs:
                if pages[i] is None:
                    failed[i] = exc
            return
        if patient_page is not None:
            found["page"] = patient_page

    async def run_alone(i: int) -> None:
        try:
            pages[i] = await sections[i].search(plans[i], afters[i])
        except GatewayError as exc:
            if strict or exc.status not in SOURCE_FAILURES:
                raise
            failed[i] = exc

    async def read_patient() -> None:
        found["resource"] = await patient_type.read(patient)

    jobs: list[Awaitable[None]] = [run_group(k, idxs) for k, idxs in groups.items()]
    jobs += [run_alone(i) for i in alone]
    if with_patient is None:
        jobs.append(read_patient())
    await gather(_nothing(), jobs)
    if with_patient is None:
        return found["resource"], pages
    assert reader is not None
    records = found["page"].records
    return (reader.resource(records[0]) if records else None), pages


async def _nothing() -> None:
    return None


async def gather(first: Awaitable[T], rest: list[Awaitable[Any]]
                 ) -> tuple[T, list[Any]]:
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


def patient_source(registry: Registry, patient: str) -> Provider:
    """The source a patient's id belongs to."""
    tp = registry.get(compartment.PATIENT)
    if isinstance(tp, Provider):
        return tp
    found = tp.source_of(patient)
    return found if found is not None else tp.sources[0]


def _paths(node: Any, at: tuple[str, ...], out: dict[tuple[str, ...], None]) -> None:
    """Paths of the literal ``reference`` strings of a mapping's output tree (an expression
    node is a leaf: its references are in the mapping's ``references``)."""
    if isinstance(node, list):
        for item in node:
            _paths(item, at, out)
    elif isinstance(node, dict) and not (EXPR_KEYS & node.keys()):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                out[(*at, key)] = None
            elif key != "each":
                _paths(value, (*at, key), out)


_REFERENCE_PATHS: weakref.WeakKeyDictionary[Provider, tuple[tuple[str, ...], ...]] = (
    weakref.WeakKeyDictionary())


def reference_paths(source: Provider) -> tuple[tuple[str, ...], ...]:
    """Where a source's resources can hold a Practitioner/Organization/Location/Medication
    reference: each ``reference`` its mapping writes from a column (``ref:``) or as a literal
    (``serviceProvider: {reference: Organization/1}``). Worked out once per mapping."""
    found = _REFERENCE_PATHS.get(source)
    if found is None:
        out: dict[tuple[str, ...], None] = {}
        for path, target, _child in source.mapping.references:
            parts = tuple(part.split("[", 1)[0] for part in path.split("."))
            if target in REFERENCED and parts[-1] == "reference":
                out[parts] = None
        _paths(source.mapping.spec.output, (), out)
        found = _REFERENCE_PATHS[source] = tuple(out)
    return found


def referenced_by(served: Iterable[tuple[Provider, Sequence[dict[str, Any]]]]
                  ) -> dict[str, dict[str, None]]:
    """type → ids (first-seen order) of the Practitioner/Organization/Location/Medication
    references of each source's resources, read where its mapping writes them (no walk of
    every node, no JSON scan)."""
    seen: dict[Any, None] = {}  # each distinct reference once (most repeat on every row)
    for source, resources in served:
        for path in reference_paths(source):
            first, rest = path[0], path[1:]
            if rest == ("reference",):  # {"reference": ...}, or a list of them: most paths
                for res in resources:
                    node = res.get(first)
                    if node.__class__ is dict:
                        seen[node.get("reference")] = None
                    elif node.__class__ is list:
                        for item in node:
                            if item.__class__ is dict:
                                seen[item.get("reference")] = None
                continue
            for res in resources:
                _collect(res.get(first), rest, seen)
    wanted: dict[str, dict[str, None]] = {}
    for v in seen:
        if v.__class__ is str:
            rtype, _, rid = v.partition("/")
            if rtype in REFERENCED and rid:
                wanted.setdefault(rtype, {})[rid] = None
    return wanted


def _collect(node: Any, path: tuple[str, ...], into: dict[Any, None]) -> None:
    """The values at ``path`` under ``node``, every repetition of a list looked at."""
    if node.__class__ is list:
        for item in node:
            _collect(item, path, into)
    elif node.__class__ is dict:
        if len(path) == 1:
            into[node.get(path[0])] = None
        else:
            _collect(node.get(path[0]), path[1:], into)


def _referenced_types(registry: Registry, wanted: dict[str, dict[str, None]],
                      types: set[str] | None) -> list[str]:
    """The served types ``wanted`` names ids of that ``types`` (None: all) lets in, in
    :data:`REFERENCED` order: each is either read by :func:`referenced_of` or named by
    :func:`referenced_denied` (one filter, so neither can drop a type the other misses)."""
    return [rtype for rtype in REFERENCED
            if wanted.get(rtype) and rtype in registry and (types is None or rtype in types)]


def referenced_denied(registry: Registry, wanted: dict[str, dict[str, None]],
                      principal: Principal, types: set[str] | None) -> list[str]:
    """The types ``wanted`` names that :func:`referenced_of` leaves out because the caller's
    scopes do not allow reading them (to be said, never a silent gap)."""
    return [rtype for rtype in _referenced_types(registry, wanted, types)
            if not principal.allows(rtype, "r")]


def unread_note(unread: list[str]) -> str:
    """The NOT_INCLUDED note for the types :func:`referenced_denied` names (the same words
    wherever a record leaves them out)."""
    return ("resources referred to not included, as the client's scopes do not allow reading "
            f"them: {', '.join(unread)}")


async def referenced_of(registry: Registry, wanted: dict[str, dict[str, None]],
                        principal: Principal, types: set[str] | None,
                        failed: list[str] | None = None) -> list[dict[str, Any]]:
    """The resources ``wanted`` names that the caller may read, in type order then key order:
    one statement per type (per source); the types of one connection whose adapter runs
    batches in one backend call. ``failed`` given: a type whose source does not answer
    (502/503/504) is left out and said there, rather than failing the call (a type of
    several sources: only the one that did not answer)."""
    asked = [(rtype, registry.get(rtype)) for rtype in _referenced_types(registry, wanted, types)
             if principal.allows(rtype, "r")]
    found: dict[str, list[dict[str, Any]]] = {}

    def gap(tp: Provider, exc: Exception) -> None:
        error = exc if isinstance(exc, GatewayError) else translate_backend_error(exc)
        if (failed is None or not isinstance(error, GatewayError)
                or error.status not in SOURCE_FAILURES):
            raise exc
        failed.append(failure(tp, error))

    groups: dict[int, list[tuple[Provider, Query]]] = {}
    for rtype, tp in asked:
        if isinstance(tp, Provider) and tp.batches:
            query = tp.read_many_query(wanted[rtype], len(wanted[rtype]))
            if query is not None:
                groups.setdefault(id(tp.mapping.adapter), []).append((tp, query))
        else:
            lost: Failed | None = None if failed is None else []
            found[rtype] = await tp.read_many(list(wanted[rtype]), len(wanted[rtype]), lost)
            if failed is not None and lost:
                failed += [failure_of(rtype, name, exc) for name, exc in lost]
    for jobs in groups.values():
        def work(fetch: Fetch, jobs: list[tuple[Provider, Query]] = jobs) -> list[Page | None]:
            pages: list[Page | None] = []
            for source, query in jobs:
                try:
                    pages.append(source.fetch_in(fetch, query))
                except (BackendError, UnsupportedCriteria) as exc:
                    gap(source, exc)
                    pages.append(None)
            return pages

        try:
            pages = await jobs[0][0].batch(work)
        except GatewayError as exc:  # the connection itself: every type of it
            for source, _ in jobs:
                gap(source, exc)
            continue
        for (source, _), page in zip(jobs, pages, strict=True):
            if page is not None:
                found[source.resource_type] = source.mapped(page.records)
    return [r for rtype, _ in asked for r in found.get(rtype, ())]


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
