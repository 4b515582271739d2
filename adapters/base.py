"""The adapter interface: the one extension point between the gateway and a clinical system.

An adapter is about as small as an httpx transport:

* ``prepare(source, fields)`` — called once per mapping at load time with the mapping's
  ``source:`` block; checks it and returns an opaque prepared object (raise
  :class:`SourceConfigError` naming the problem).
* ``fetch(prepared, query)`` — run a query plan, return raw records and a continuation.
* ``ping()`` — readiness probe; ``aclose()`` — release connections.
* optional: ``layout``, ``interactions``, ``count``, ``write``, ``chains(prepared,
  target)`` — whether a :class:`Chain` into another mapping is answered in the same query —
  and ``batch(work)``: several queries of one request, each depending on the ones before
  (a patient's record, section after section), run in one go (SQL: one connection, one hop
  to a worker thread) instead of one ``fetch`` each.

Records are flat ``dict[str, Any]`` keyed by the source reference the mapping used
(``"p.SURNAME"`` for SQL, ``"PID-5.1"`` for HL7 v2); one-to-many children sit under
``"@<child name>"`` as lists of such dicts. An adapter may instead declare a :class:`Layout`
for a prepared mapping (``layout(prepared)``) and return each record as a tuple laid out so:
no dict per row, and the compiled mapping reads values by position.

Criteria arrive as a small, closed expression tree (below), already typed and converted to
the source's storage format by the gateway. Adapters never see FHIR parameters, and never
import the REST layer or fhir.resources. One node, :class:`Chain`, reaches into a second
mapping (a chained parameter or ``_has``); the gateway sends it only to an adapter whose
``chains(prepared, target)`` said it can answer it inside the same query.

Backend failures are translated at the adapter boundary into :class:`BackendError` and its
subclasses, always ``raise ... from exc`` and never with SQL text, HL7 content or PHI in the
message.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Record = dict[str, Any]
Row = tuple[Any, ...]
"""A record in its adapter's :class:`Layout`: a tuple, children as sequences of tuples."""

# --- criteria: a closed expression tree -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Compare:
    """``ref <op> value``. ``value`` is already in the source's storage representation."""

    ref: str
    op: Literal["=", "!=", "<", "<=", ">", ">="]
    value: Any
    numeric: bool = False
    """Compare the stored value as a number (``value`` a float), whatever the column's type:
    legacy systems keep results as text. A stored value that is not a number never matches."""


@dataclass(frozen=True, slots=True)
class In:
    ref: str
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Text:
    """Case- and accent-insensitive text match; ``value`` is already folded (see ``fold``)."""

    ref: str
    mode: Literal["prefix", "contains", "exact"]
    value: str


@dataclass(frozen=True, slots=True)
class IsNull:
    ref: str
    null: bool = True


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Criterion, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Criterion, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Criterion


@dataclass(frozen=True, slots=True)
class Nothing:
    """Matches no record (e.g. an id that cannot exist in an integer key column)."""


@dataclass(frozen=True, slots=True)
class Chain:
    """Records whose ``ref`` equals ``target_ref`` of some record of another mapping that
    matches ``criteria``: one level across a reference, in the same query (a join or a
    subquery, never keys fetched first and pasted into a second query).

    ``target`` is what this adapter's ``prepare`` returned for the other mapping, and
    ``criteria`` use that mapping's references (they never hold a Chain themselves).

    * chained parameter ``Encounter?patient.family=smith``: ``ref`` is the Encounter's
      patient reference column, ``target_ref`` the Patient key;
    * ``Patient?_has:Encounter:patient:status=finished``: ``ref`` is the Patient key,
      ``target_ref`` the Encounter's patient reference column.

    Empty values never match on either side, so the node is two-valued (safe under Not).
    """

    ref: str
    target: Any
    target_ref: str
    criteria: Criterion | None


Criterion = Compare | In | Text | IsNull | And | Or | Not | Nothing | Chain


# --- the query plan and its result ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SortKey:
    ref: str
    descending: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """One page of a search (or a read, as a search by id with ``count=1``).

    ``sort`` always ends with the record key, so it is a total order and keyset paging works.
    ``after`` holds the sort-key values of the last record of the previous page (or of the
    first record of the next page when ``backwards``); ``None`` starts at the beginning.
    """

    criteria: Criterion | None
    sort: tuple[SortKey, ...]
    count: int
    after: tuple[Any, ...] | None = None
    backwards: bool = False
    with_total: bool = False
    children: bool = True


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each reference sits in a record an adapter returns as a tuple (a :data:`Row`).

    The top-level references come first, in ``fields`` order; then one position per child,
    in ``children`` order, holding a sequence of that child's rows. A child row holds the
    child's references in the order given for it, and may carry more values after them
    (an adapter's own bookkeeping, never read). Records are read-only.
    """

    fields: tuple[str, ...]
    children: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(child name, its references), in position order after ``fields``."""

    def position(self, ref: str) -> int | None:
        """The position of a top-level reference, or None."""
        return self.fields.index(ref) if ref in self.fields else None

    def child_position(self, name: str) -> int | None:
        """The position of a child's rows in a record, or None."""
        for i, (child, _) in enumerate(self.children):
            if child == name:
                return len(self.fields) + i
        return None

    def as_dict(self, row: Row) -> Record:
        """The same record in the dict form (for tests, tools and non-hot paths)."""
        out: Record = dict(zip(self.fields, row))  # noqa: B905 - children follow the fields
        for i, (name, fields) in enumerate(self.children):
            rows = row[len(self.fields) + i]
            out["@" + name] = [dict(zip(fields, r)) for r in rows]  # noqa: B905 - see above
        return out

    def as_row(self, rec: Record) -> Row:
        """A dict-form record in this layout (missing values: None; missing children: none)."""
        return (*(rec.get(f) for f in self.fields),
                *(tuple(tuple(r.get(f) for f in fields) for r in rec.get("@" + name) or ())
                  for name, fields in self.children))


@dataclass(slots=True)
class Page:
    records: list[Any]
    """Dicts (:data:`Record`), or tuples (:data:`Row`) when the adapter declares a layout."""
    more: bool
    """Whether more records lie beyond this page in the direction of travel."""
    total: int | None = None
    start: tuple[Any, ...] | None = None
    """Position of the first record, to page backwards from (None: the source cannot)."""
    end: tuple[Any, ...] | None = None
    """Position after the last record, to page forwards from: keyset values, or an opaque
    continuation such as an HL7 v2 continuation pointer. Must be JSON-serialisable."""


@dataclass(frozen=True, slots=True)
class Count:
    criteria: Criterion | None


# --- writes (used by adapters that accept them) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    interaction: Literal["create", "update"]
    record: Record
    id: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class WriteResult:
    id: str
    created: bool
    correlation: str | None = None


# --- errors -----------------------------------------------------------------------------------


class AdapterError(Exception):
    """Base of everything an adapter raises."""


class SourceConfigError(AdapterError):
    """A mapping's ``source:`` block is wrong. ``path`` names the key (e.g. ``joins[1].on``),
    or the reference or child name the rest of the mapping uses but the source lacks."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def source_config_error(exc: Any) -> SourceConfigError:
    """A pydantic ValidationError on a source block, as our error naming the key's path."""
    err = exc.errors()[0]
    msg = {"missing": "required key is missing", "extra_forbidden": "unknown key"}.get(
        err["type"], err["msg"].removeprefix("Value error, "))
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    return SourceConfigError(msg, loc.lstrip("."))


class BackendError(AdapterError):
    """The backend failed in a way that is not the client's fault (→ 502)."""

    def __init__(self, message: str, *, correlation: str | None = None) -> None:
        super().__init__(message)
        self.correlation = correlation


class BackendUnavailable(BackendError):
    """Could not reach the backend (→ 503, with Retry-After)."""

    retry_after: int = 5


class BackendTimeout(BackendUnavailable):
    """The backend did not answer in time (→ 504)."""


class BackendRejected(BackendError):
    """The backend refused the request (HL7 AE/AR, constraint violation)."""


class WriteRefused(AdapterError):
    """The backend refused a write for what was sent — the client's to fix (→ 4xx) — and
    applied nothing. ``others`` are the further refusals it reported for the same write (one
    issue each). The message is shown to the client: codes and field positions, never a
    value or the backend's own words."""

    def __init__(self, message: str, *, location: str | None = None,
                 others: tuple[WriteRefused, ...] = (), correlation: str | None = None) -> None:
        super().__init__(message)
        self.location = location
        """The backend's name for what is at fault, as a mapping names it (``PID-7``)."""
        self.others = others
        self.correlation = correlation


class DuplicateKey(WriteRefused):
    """The backend already holds a record with a key sent (HL7 0357 code 205) → 409."""


class UnknownKey(WriteRefused):
    """A key sent is not known to the backend (HL7 0357 code 204): the updated record's own
    (``own``: → 404) or one the record refers to (→ 422)."""

    def __init__(self, message: str, *, own: bool = False, location: str | None = None,
                 others: tuple[WriteRefused, ...] = (), correlation: str | None = None) -> None:
        super().__init__(message, location=location, others=others, correlation=correlation)
        self.own = own


class InvalidValue(WriteRefused):
    """A value the backend needs is missing, of the wrong type, not in its table or too
    long (HL7 0357 codes 101-104) → 422."""


backend_correlations: ContextVar[list[str] | None] = ContextVar("backend_correlations",
                                                                default=None)
"""Set per request by the gateway's audit layer; adapters note what they sent to it."""

request_started: ContextVar[float | None] = ContextVar("request_started", default=None)
"""The event loop's time when the FHIR request began (set by the gateway's audit layer): a
per-request deadline counts from here, so time spent queued before the first backend call
(e.g. behind the client's other calls) is inside it, as the client experiences it."""


def note_correlation(value: str) -> None:
    """Record a backend correlation id (an HL7 MSH-10) for the request's audit record."""
    sink = backend_correlations.get()
    if sink is not None:
        sink.append(value)


class UnsupportedCriteria(AdapterError):
    """The backend cannot answer this search (e.g. a date range over HL7 v2 Q22) → 400.

    The message is shown to the client: name the parameter or construct, never a value.
    """


class QueryTooLarge(UnsupportedCriteria):
    """The search has more values than the backend takes in one query (→ 400
    ``TOO_MANY_VALUES``): found by the adapter before the backend is asked."""


# --- the interface ----------------------------------------------------------------------------

T = TypeVar("T")

Fetch = Callable[[Any, Query], Page]
"""``fetch`` as a plain (blocking) call, given to the work of :meth:`Adapter.batch`: one query
on the batch's connection; backend failures raised as :class:`BackendError` (translated)."""


@dataclass(frozen=True, slots=True)
class Needs:
    """What the gateway will ask of one mapping's records, for ``prepare`` to check."""

    key: str
    fields: frozenset[str]
    """Every reference read from records, at the top level or in a child."""
    children: frozenset[str]
    """Children the output repeats over (``each:``)."""
    criteria_refs: frozenset[str] = field(default_factory=frozenset)
    """References search criteria may use."""
    sort_refs: frozenset[str] = field(default_factory=frozenset)
    """References ``_sort`` may use (must be top-level)."""


class Adapter(abc.ABC):
    name: str = "adapter"

    @abc.abstractmethod
    def prepare(self, source: dict[str, Any], needs: Needs) -> Any:
        """Check a mapping's source block; return what ``fetch`` will need."""

    @abc.abstractmethod
    async def fetch(self, prepared: Any, query: Query) -> Page: ...

    def layout(self, prepared: Any) -> Layout | None:
        """How this mapping's records are laid out as tuples, or None: they are dicts."""
        return None

    def chains(self, prepared: Any, target: Any) -> bool:
        """Whether ``fetch`` and ``count`` on ``prepared`` answer a :class:`Chain` into
        ``target`` (another mapping this adapter prepared) inside one query. When not, the
        gateway resolves the chain through the target's own search, with a bound."""
        return False

    def interactions(self, prepared: Any) -> frozenset[str]:
        """FHIR interactions this source serves for a mapping (writes only if declared)."""
        return frozenset({"read", "search-type"})

    def shares(self, prepared: Any, query: Query) -> bool:
        """Whether ``fetch`` runs ``query`` in a statement shared with the concurrent ones like
        it, one at a time per mapping (the SQL adapter's reads by key): such a call holds at
        most one worker whoever asks, so the gateway does not queue it per client."""
        return False

    async def count(self, prepared: Any, query: Count) -> int:
        raise UnsupportedCriteria(f"{self.name} adapter cannot count")

    batches: bool = False
    """Whether :meth:`batch` is implemented."""

    keyset_paging: bool = True
    """Whether a page can begin right after any record it returned (``Query.after`` holding
    that record's sort-key values). An adapter paging by a cursor of the backend's own, given
    only at the end of a reply (HL7 v2 continuation pointers: ``Page.end``), says False: as
    one of several sources of a type it is then read in place — the same continuation sent
    again and the records already served skipped (gateway.multisource) — so the backend must
    answer a continuation the same each time it is sent while it lives."""

    async def batch(self, work: Callable[[Fetch], T]) -> T:
        """``work(fetch)``, where ``fetch(prepared, query)`` answers one query as
        :meth:`fetch` would, synchronously: the queries ``work`` makes, one after another, in
        one go (one connection, one hop off the event loop; the connection's timeout covers
        the whole batch). ``work`` only decides and fetches: it runs on the adapter's thread.
        A failure of one query is raised by its ``fetch`` call (``work`` may go on with the
        others); whatever ``work`` raises is raised here. Only when :attr:`batches`."""
        raise UnsupportedCriteria(f"{self.name} adapter does not run batches")

    async def write(self, prepared: Any, write: Write) -> WriteResult:
        raise UnsupportedCriteria(f"{self.name} adapter does not accept writes")

    def explain(self, prepared: Any, query: Query) -> list[str]:
        """What ``fetch`` would send for ``query``, without sending it, as lines of text.
        Never a value from the query: placeholders or ``?`` stand for them. May raise
        ``UnsupportedCriteria`` as ``fetch`` would."""
        return [f"(the {self.name} adapter does not describe its queries)"]

    async def estimate(self, prepared: Any, query: Query) -> list[str]:
        """The source's own estimate of what ``query`` costs, asked without running it
        (SQL ``EXPLAIN``), as lines of text; never a value from the query."""
        return [f"(no cost estimate from the {self.name} adapter)"]

    @abc.abstractmethod
    async def ping(self) -> None: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


def all_of(items: Sequence[Criterion]) -> Criterion | None:
    if not items:
        return None
    return items[0] if len(items) == 1 else And(tuple(items))


def any_of(items: Sequence[Criterion]) -> Criterion:
    if not items:
        return Nothing()
    return items[0] if len(items) == 1 else Or(tuple(items))
