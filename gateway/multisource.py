"""A resource type served by several sources: one provider composed of per-source providers.

Encounter comes from inpatient spells, outpatient attendances and A&E attendances, each a
mapping file of its own. The composite answers as one provider (routes do not know):

* **ids** stay unique and stable: every source but one declares an ``id_prefix`` (checked at
  load); a read by id goes to the source whose prefix the id carries.
* **search** fans out to every source with the same parameters (each planned against its own
  mapping), and merges the pages in ``_sort`` order, ties broken by source order and then by
  each source's own key order, so the order is total and the same on every request.
* **paging** is stateless, forwards and back: the page link holds one cut per source (inside
  the same encrypted, signed token as a single-source search), the keyset positions either
  side of where the page begins or ends in that source. A page asks each source with records
  that way for at most ``_count`` records, takes the first ``_count`` of the merge (going
  back: the last) and moves each source's cut past the records taken — one statement per
  source per page — so a walk to the end yields the merged set exactly once, and the
  ``previous`` links walk back through the same pages.
* **a failing source** (502/503/504) gives a partial page with an OperationOutcome warning
  entry naming the source, never a silent gap; its cut does not move, so the next page asks
  it again (a link the other way first finds the cut's other side with a one-record probe).
  Under ``Prefer: handling=strict``, or when no source answered, the error is the answer.
* **a source paging by the backend's cursor** (HL7 v2: the DSC-1 continuation pointer at
  the end of each reply, ``Adapter.keyset_paging`` False) cannot resume after any record, and
  cannot sort: the type then has no ``_sort`` and its order is plain source order, so a page
  is read source after source (:meth:`MultiSource._search_in_order`). Such a source's place is
  the continuation the reply was fetched with (none: the first reply) and how many of that
  reply's records were served: the next page sends the same continuation again and skips
  those (a PAS's pointer must answer the same twice, as a re-followed ``next`` link already
  needs). A page stops at a source with more records ahead (the sources after it wait for
  a later page), so nothing is served out of order, and ``previous`` is not offered. A source
  that refuses its continuation (expired) makes the link invalid (400 INVALID_PAGE_TOKEN,
  start again), never a loop of warnings. A source that cannot answer the search at all
  (400 UNSUPPORTED_SEARCH: an HL7 v2 query with no parameter) is left out with a
  ``SOURCE_NOT_SEARCHED`` warning entry on every page, or its 400 under
  ``Prefer: handling=strict`` (or when no source can answer).
* **what is claimed** is what every source supports: a parameter, a ``_sort`` key or an
  interaction only one source has is not the type's (so the CapabilityStatement, generated
  from this, does not list it, and a search treats it as unknown).
"""

from __future__ import annotations

import collections
import datetime as dt
import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import islice
from typing import Any

import orjson

from adapters.base import Criterion, Page, SortKey, Write, WriteResult
from gateway import chain
from gateway.errors import (
    GatewayError,
    InvalidId,
    InvalidPageToken,
    NotImplementedInteraction,
    UnsupportedSearch,
    UpstreamError,
    operation_outcome,
)
from gateway.mapping.model import SearchParam
from gateway.notices import notice
from gateway.plan import SearchPlan
from gateway.providers import SOURCE_FAILURES, Failed, Provider, source_name
from gateway.search import ID_RE

START = "S"
"""A cut before a source's first record."""
END = "E"
"""A cut after a source's last record."""
SKIPPED = "X"
"""A source left out of a search it cannot answer (in-order paging)."""
MAX_REPLIES = 50
"""Replies one page reads from a cursor source that keeps answering with no record (all
filtered out) before that source counts as failing."""
_BAD_LINK = "the paging link is not valid (altered or expired)"


@dataclass(frozen=True, slots=True)
class Cut:
    """Where a merged page begins or ends in one source: between the record at ``lo`` and
    the record at ``hi`` (keyset positions), or at START / END. A forward page needs ``lo``,
    a backward page ``hi``; a side not known is None (at most one)."""

    lo: Any
    hi: Any

    def dump(self) -> list[Any]:
        return [self.lo, self.hi]

    @classmethod
    def load(cls, raw: Any) -> Cut:
        ok = (isinstance(raw, list) and len(raw) == 2
              and (raw[0] == START or isinstance(raw[0], list) or raw[0] is None)
              and (raw[1] == END or isinstance(raw[1], list) or raw[1] is None)
              and raw != [None, None])
        if not ok:
            raise InvalidPageToken("the paging link is not valid (altered or expired)")
        return cls(raw[0], raw[1])


@dataclass(frozen=True, slots=True)
class Place:
    """Where an in-order walk stands in one source (see :meth:`MultiSource._search_in_order`):
    ``pos`` is START, END, SKIPPED, the keyset position of the last record served (a source
    paging by key) or the continuation its current reply was fetched with (a cursor source);
    ``skip`` how many records of that reply were served; ``total`` the source's own total as
    its first reply gave it; ``why`` the reason a SKIPPED source was left out."""

    pos: Any
    skip: int = 0
    total: int | None = None
    why: str | None = None

    def dump(self) -> list[Any]:
        return [self.pos, self.skip, self.total, self.why]

    @classmethod
    def load(cls, raw: Any) -> Place:
        ok = (isinstance(raw, list) and len(raw) == 4
              and (raw[0] in (START, END, SKIPPED) or isinstance(raw[0], list))
              and type(raw[1]) is int and 0 <= raw[1] <= 100_000
              and (raw[2] is None or type(raw[2]) is int)
              and (raw[3] is None or isinstance(raw[3], str)))
        if not ok:
            raise InvalidPageToken(_BAD_LINK)
        return cls(raw[0], raw[1], raw[2], raw[3])


def _one(part: SearchPlan) -> SearchPlan:
    """The same search for one record, without a total (a probe for a cut's other side)."""
    return replace(part, count=1, total="none", deferred=[])


@dataclass
class MultiPlan(SearchPlan):
    """The plan of a multi-source search: the shared one (used, ignored, count, ...) plus
    each source's own (criteria and sort on its own columns)."""

    parts: list[SearchPlan] = field(default_factory=list)
    strict: bool = False

    @classmethod
    def of(cls, parts: list[SearchPlan], strict: bool) -> MultiPlan:
        first = parts[0]
        shared = {f.name: getattr(first, f.name) for f in fields(SearchPlan)}
        # A chain is planned per source: what any source's chain searched counts.
        shared["searched_types"] = set().union(*(p.searched_types for p in parts))
        return cls(**shared, parts=parts, strict=strict)


@dataclass(slots=True)
class MergedPage(Page):
    """A page of a multi-source search: records are ``(source index, record)``."""

    failed: list[tuple[str, GatewayError]] = field(default_factory=list)
    """(source name, error) of each source that did not answer for this page."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(source name, why) of each source left out of the search: it cannot answer it."""


class _Desc:
    """Reverses the order of a sort value (for ``-param`` in a merge key)."""

    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.v < self.v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and bool(self.v == other.v)

    __hash__ = None  # type: ignore[assignment]


def common_params(sources: list[Provider]) -> dict[str, SearchParam]:
    """Parameters every source declares with the same type (and, for references, the same
    target types): the only ones the type supports."""
    first = sources[0]
    out: dict[str, SearchParam] = {}
    for name, p in first.params.items():
        same = all(
            name in s.params and s.params[name].type == p.type
            and set(s.params[name].reference_targets()) == set(p.reference_targets())
            for s in sources[1:])
        if same:
            out[name] = p
    return out


class MultiSource:
    """The provider of a type served by several sources (see the module docstring)."""

    def __init__(self, sources: list[Provider]) -> None:
        self.sources = sources
        first = sources[0]
        self.resource_type = first.resource_type
        self.profile = first.profile
        self.params = common_params(sources)
        self.sortable = [n for n in first.sortable if all(n in s.sortable for s in sources)]
        self.policy = first.policy
        self.interactions = frozenset.intersection(*(s.interactions for s in sources)) & {
            "read", "search-type"}  # a write would not know which source to go to
        # Longest prefix first: "op-" never shadows "op-x-" (the loader forbids it anyway).
        self._by_prefix = sorted(sources, key=lambda s: -len(s.id_prefix))
        self._cursor = [not s.mapping.adapter.keyset_paging for s in sources]
        """Which sources page by the backend's own cursor (HL7 v2), not by key."""
        if any(self._cursor):
            self.sortable = []  # such a source cannot sort: the order is source order

    # -- ids

    def source_of(self, rid: str) -> Provider | None:
        for s in self._by_prefix:
            if rid.startswith(s.id_prefix):
                return s
        return None

    async def read(self, rid: str) -> dict[str, Any] | None:
        if not ID_RE.match(rid):
            raise InvalidId("the resource id is not valid (1-64 of A-Z a-z 0-9 - .)")
        source = self.source_of(rid)
        return await source.read(rid) if source is not None else None

    async def read_many(self, ids: Iterable[str], limit: int, failed: Failed | None = None
                        ) -> list[dict[str, Any]]:
        """As :meth:`Provider.read_many`, one statement per source: with ``failed``, a
        source that does not answer is left out and named there, the others served."""
        wanted: dict[int, list[str]] = {}
        for rid in dict.fromkeys(ids):
            source = self.source_of(rid)
            if source is not None:
                wanted.setdefault(self.sources.index(source), []).append(rid)
        out: list[dict[str, Any]] = []
        for i, rids in sorted(wanted.items()):  # one statement per source
            if len(out) >= limit:
                break
            out += await self.sources[i].read_many(rids, limit - len(out), failed)
        return out

    # -- records of a merged page: (source index, record)

    def resource(self, rec: tuple[int, Any]) -> dict[str, Any]:
        i, r = rec
        return self.sources[i].resource(r)

    def record_id(self, rec: tuple[int, Any]) -> str:
        i, r = rec
        return self.sources[i].record_id(r)

    def reference_ids(self, rec: tuple[int, Any], param: str, target: str) -> Iterator[str]:
        i, r = rec
        return self.sources[i].reference_ids(r, param, target)

    def page_outcome(self, page: Page) -> list[dict[str, Any]]:
        """Warning entries for the sources missing from a page: never a silent gap."""
        if not isinstance(page, MergedPage) or not (page.failed or page.skipped):
            return []
        issues = [notice("SOURCE_UNAVAILABLE",
                        f"{self.resource_type} source '{name}' did not answer "
                        f"({exc.error_code}); this page lacks its records (the next page "
                        "asks it again)") for name, exc in page.failed]
        issues += [notice("SOURCE_NOT_SEARCHED",
                          f"{self.resource_type} source '{name}' was not searched: {why}; "
                          "this search lacks its records (add a parameter that source "
                          "takes; Prefer: handling=strict gives its 400 instead)")
                   for name, why in page.skipped]
        return [{"resource": operation_outcome(issues), "search": {"mode": "outcome"}}]

    # -- writes: never offered (interactions has none), so never reached

    def to_record(self, resource: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedInteraction(f"{self.resource_type} comes from several sources; "
                                        "this server does not write it")

    async def write(self, write: Write) -> WriteResult:
        raise NotImplementedInteraction(f"{self.resource_type} comes from several sources; "
                                        "this server does not write it")

    # -- search

    async def count(self, plan: SearchPlan) -> int:
        """The sum of every source's count: a source that does not answer is the error (a
        total without its records would be wrong), and the error says which and why."""
        assert isinstance(plan, MultiPlan)
        total = 0
        for s, p in zip(self.sources, plan.parts, strict=True):
            try:
                total += await s.count(p)
            except GatewayError as exc:
                if exc.status not in SOURCE_FAILURES:
                    raise
                raise type(exc)(
                    f"{self.resource_type} source '{source_name(s)}' did not answer, and a "
                    f"total cannot be given without its records: {exc.message}",
                    headers=exc.headers) from exc
        return total

    async def revinclude(self, param: str, target: str, ids: list[str], limit: int,
                         prefixes: Sequence[str] = (), failed: Failed | None = None
                         ) -> tuple[list[dict[str, Any]], bool]:
        """``failed``: as for :meth:`read_many`."""
        out: list[dict[str, Any]] = []
        more = False
        for s in self.sources:
            found, cut = await s.revinclude(param, target, ids, limit, prefixes, failed)
            out += found
            more = more or cut
        if len(out) > limit:
            out, more = out[:limit], True
        return out, more

    async def search(self, plan: SearchPlan, after: tuple[Any, ...] | None = None,
                     backwards: bool = False, extra: Criterion | None = None) -> MergedPage:
        assert isinstance(plan, MultiPlan)
        if any(self._cursor):
            return await self._search_in_order(plan, after, backwards, extra)
        n = len(self.sources)
        if after is None:
            if backwards:
                raise InvalidPageToken("the paging link is not valid (altered or expired)")
            cuts = [Cut(START, None)] * n
        else:
            if len(after) != n:
                raise InvalidPageToken("the paging link is not valid (altered or expired)")
            cuts = [Cut.load(x) for x in after]
        pages: list[Page | None] = []
        resolved: list[Cut] = []
        failed: list[tuple[str, GatewayError]] = []
        asked = 0
        for source, part, cut in zip(self.sources, plan.parts, cuts, strict=True):
            if (cut.lo == START) if backwards else (cut.hi == END):
                pages.append(None)  # nothing that way
                resolved.append(cut)
                continue
            asked += 1
            try:
                got, known = await self._fetch(source, part, cut, backwards, extra)
            except GatewayError as exc:
                if plan.strict or exc.status not in SOURCE_FAILURES:
                    raise
                failed.append((source_name(source), exc))
                pages.append(None)
                resolved.append(cut)
                continue
            pages.append(got)
            resolved.append(known)
        if failed and len(failed) == asked:
            raise failed[0][1]  # nothing answered: an error, not an empty page with warnings
        runs = [
            [(self._merge_key(i, r, plan.parts[i].sort), i, r) for r in page.records]
            if page is not None else []
            for i, page in enumerate(pages)
        ]
        merged = heapq.merge(*runs, key=lambda t: t[0])
        if backwards:  # the last `count` before the cut, in the merged (forward) order
            taken = list(collections.deque(merged, maxlen=plan.count))
        else:
            taken = list(islice(merged, plan.count))
        consumed = [0] * n
        for _key, i, _r in taken:
            consumed[i] += 1
        starts: list[Cut] = []
        ends: list[Cut] = []
        more = bool(failed)
        can_go_back = True
        for i, page in enumerate(pages):
            if page is None:  # nothing that way, or failed: the cut stays (asked again)
                starts.append(resolved[i])
                ends.append(resolved[i])
                continue
            if page.records and page.start is None:
                can_go_back = False  # a source that cannot page backwards
            pos = self._positions(i, page.records, plan.parts[i].sort)
            k = consumed[i]
            old = resolved[i]
            if not backwards:
                before = Cut(old.lo, pos[0] if pos else END)
                if k:
                    after_hi: Any = pos[k] if k < len(pos) else (None if page.more else END)
                    end_cut = Cut(pos[k - 1], after_hi)
                else:
                    end_cut = before
                starts.append(before)
                ends.append(end_cut)
            else:
                behind = Cut(pos[-1] if pos else START, old.hi)
                if k:
                    j = len(pos) - k
                    lo: Any = pos[j - 1] if j else (None if page.more else START)
                    start_cut = Cut(lo, pos[j])
                else:
                    start_cut = behind
                starts.append(start_cut)
                ends.append(behind)
            more = more or k < len(pos) or page.more
        total = None
        if plan.total == "accurate" and not failed:
            total = 0
            for i, page in enumerate(pages):
                if page is not None and page.total is not None:
                    total += page.total
                else:  # nothing to fetch that way: counted on its own
                    total += await self.sources[i].count(plan.parts[i])
        out = MergedPage(records=[(i, r) for _k, i, r in taken], more=more, total=total,
                         failed=failed)
        out.start = tuple(c.dump() for c in starts) if can_go_back else None
        out.end = tuple(c.dump() for c in ends)
        return out

    async def _search_in_order(self, plan: MultiPlan, after: tuple[Any, ...] | None,
                               backwards: bool, extra: Criterion | None) -> MergedPage:
        """A page of a type with a cursor source: no ``_sort``, so the merged order is source
        order, and a page is read source after source — each asked for what the page still
        lacks, from its :class:`Place` — until it is full or a source has more ahead (the
        ones after it wait: their records come later in the order). Forwards only."""
        n = len(self.sources)
        if backwards or (after is not None and len(after) != n):
            raise InvalidPageToken(_BAD_LINK)
        places = [Place(START)] * n if after is None else [Place.load(x) for x in after]
        taken: list[tuple[int, Any]] = []
        failed: list[tuple[str, GatewayError]] = []
        skipped: list[tuple[str, str]] = []
        refused: list[GatewayError] = []
        asked = 0
        waiting = False
        for i, (source, part, place) in enumerate(zip(self.sources, plan.parts, places,
                                                      strict=True)):
            if place.pos == SKIPPED:
                skipped.append((source_name(source), place.why or "it cannot answer it"))
                continue
            if place.pos == END or waiting or len(taken) >= plan.count:
                continue  # nothing left there, or its records come on a later page
            asked += 1
            try:
                await chain.resolve(part)
                need = plan.count - len(taken)
                if self._cursor[i]:
                    records, moved = await self._read_cursor(source, part, place, need, extra)
                else:
                    records, moved = await self._read_keyset(i, source, part, place, need,
                                                             extra)
            except UnsupportedSearch as exc:
                if plan.strict:
                    raise
                refused.append(exc)
                why = str(exc.args[0]) if exc.args else "it cannot answer this search"
                places[i] = Place(SKIPPED, why=why)
                skipped.append((source_name(source), why))
                continue
            except GatewayError as exc:
                if plan.strict or exc.status not in SOURCE_FAILURES:
                    raise
                failed.append((source_name(source), exc))
                continue
            taken += [(i, r) for r in records]
            places[i] = moved
            waiting = moved.pos != END  # more ahead there: the sources after it wait
        if refused and len(refused) == asked:
            raise refused[0]  # no source can answer: the 400 is the answer
        if failed and (len(failed) + len(refused) == asked or not taken):
            # Nothing to serve: the error, not an empty page (it would have no next link).
            raise failed[0][1]
        total = None
        if plan.total == "accurate" and not failed and not skipped:
            total = await self._total(plan, places)
        out = MergedPage(records=taken, total=total, failed=failed, skipped=skipped,
                         more=any(p.pos not in (END, SKIPPED) for p in places))
        out.start = None  # a cursor source cannot page backwards: no `previous`
        out.end = tuple(p.dump() for p in places)
        return out

    async def _read_keyset(self, i: int, source: Provider, part: SearchPlan, place: Place,
                           need: int, extra: Criterion | None) -> tuple[list[Any], Place]:
        """Up to ``need`` records of a source paging by key, after its place."""
        after = None if place.pos == START else tuple(place.pos)
        page = await source.search(replace(part, count=need), after, False, extra)
        if not page.more:
            return page.records, Place(END)
        if not page.records:
            return [], place
        return page.records, Place(self._positions(i, page.records[-1:], part.sort)[0])

    async def _read_cursor(self, source: Provider, part: SearchPlan, place: Place, need: int,
                           extra: Criterion | None) -> tuple[list[Any], Place]:
        """Up to ``need`` records of a cursor source from its place: the reply its place was
        fetched with, asked again (skipping what was served), then the replies after it."""
        after = None if place.pos == START else tuple(place.pos)
        skip, total = place.skip, place.total
        out: list[Any] = []
        for _ in range(MAX_REPLIES):
            room = need - len(out)
            page = await source.search(replace(part, count=skip + room), after, False, extra)
            if total is None:
                total = page.total  # the first reply's (a continuation carries it on)
            if len(page.records) < skip:  # the reply no longer holds what was served
                raise InvalidPageToken(
                    f"the paging link can no longer be followed: the answer of source "
                    f"'{source_name(source)}' changed since it was made; start the search "
                    "again")
            rest = page.records[skip:]
            out += rest[:room]
            if len(rest) > room:  # the page ends part-way through this reply
                return out, Place(START if after is None else list(after), skip + room, total)
            if not page.more or page.end is None:
                return out, Place(END, 0, total)
            after, skip = tuple(page.end), 0
            if len(out) >= need:
                return out, Place(list(after), 0, total)
        raise UpstreamError(f"source '{source_name(source)}' sent {MAX_REPLIES} replies in a "
                            "row with no record it could serve")

    async def _total(self, plan: MultiPlan, places: list[Place]) -> int | None:
        """The sum of every source's total (None: a source cannot count this search). A cursor
        source's count is kept in its place, so the next pages do not ask its PAS again."""
        total = 0
        for i, (source, part, place) in enumerate(zip(self.sources, plan.parts, places,
                                                      strict=True)):
            if place.total is not None:
                total += place.total
                continue
            try:
                n = await source.count(part)
            except UnsupportedSearch:
                return None
            if self._cursor[i]:
                places[i] = replace(place, total=n)
            total += n
        return total

    async def _fetch(self, source: Provider, part: SearchPlan, cut: Cut, backwards: bool,
                     extra: Criterion | None) -> tuple[Page, Cut]:
        """One source's page from its cut, and the cut with the side that way known.

        A cut known only on the other side (a source that failed on a page walked the other
        way) is first found with a one-record probe the other way."""
        await chain.resolve(part)  # once, not again for the probe
        if not backwards:
            lo = cut.lo
            if lo is None:
                probe = await source.search(_one(part), tuple(cut.hi), True, extra)
                lo = (list(source.position(probe.records[-1], part.sort)) if probe.records
                      else START)
            page = await source.search(part, None if lo == START else tuple(lo), False, extra)
            return page, Cut(lo, cut.hi)
        hi = cut.hi
        if hi is None:
            probe = await source.search(_one(part), tuple(cut.lo), False, extra)
            hi = list(source.position(probe.records[0], part.sort)) if probe.records else END
        page = await source.search(part, None if hi == END else tuple(hi), True, extra)
        return page, Cut(cut.lo, hi)

    def _positions(self, i: int, records: list[Any], sort: tuple[SortKey, ...]
                   ) -> list[list[Any]]:
        # As a paging link carries them (JSON), so a cut compares and serialises the same.
        source = self.sources[i]
        return [orjson.loads(orjson.dumps(list(source.position(r, sort)), default=str))
                for r in records]

    def _merge_key(self, i: int, rec: Any, sort: tuple[SortKey, ...]) -> tuple[Any, ...]:
        """Comparable values of a record's ``_sort`` keys (the trailing record key is the
        source's own: ties go to source order, then each source's own order)."""
        source = self.sources[i]
        values = source.position(rec, sort[:-1])
        out: list[Any] = []
        for key, raw in zip(sort[:-1], values, strict=True):
            v = _comparable(source, key.ref, raw)
            out.append(_Desc(v) if key.descending else v)
        out.append(i)
        return tuple(out)


def _comparable(source: Provider, ref: str, raw: Any) -> tuple[Any, ...]:
    """A stored value as something every source's values compare with: instants as UTC
    timestamps (sources store different formats and zones), text case-folded; None first
    (as the adapters sort NULLs lowest)."""
    if raw is None:
        return (0,)
    storage = source.mapping.storage(ref)
    if storage.kind in ("date", "datetime"):
        text = storage.to_fhir(raw)
        if text is None:
            return (0,)
        moment = dt.datetime.fromisoformat(str(text))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=source.mapping.tz)
        return (1, moment.timestamp())
    if storage.kind == "integer":
        return (1, int(raw))
    return (1, str(raw).casefold())


Sources = list[Provider]
TypeProvider = Provider | MultiSource
