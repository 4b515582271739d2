"""Search across references: chained parameters and ``_has``, one level deep.

* ``Encounter?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018`` — a chained
  parameter: the part after the dot is a search parameter of the type the reference points
  to, planned with *that* type's mapping (its columns, storage formats, code maps and checks
  such as the NHS number check digit). ``subject:Patient.birthdate=...`` names the target
  type, as a reference to several types (``general-practitioner``) may need; without it the
  chain applies to every served target type that has the parameter.
* ``Patient?_has:Encounter:patient:status=finished`` — the reverse: patients that some
  Encounter refers to through its ``patient`` parameter, where that Encounter matches.

Both are declared by nothing new: any ``reference`` search parameter a mapping declares can
be chained, into any parameter its target's mapping declares (and ``_id``).

How it is answered:

* When both mappings are on the same adapter and it says it can (``Adapter.chains``, the
  SQL adapter for two mappings on one connection), the chain is one
  :class:`adapters.base.Chain` criterion: the source's query holds the target's as a
  subquery, so a page is still one statement and paging, ``_sort``, ``_count`` and totals
  work unchanged.
* Otherwise (two databases, an HL7 v2 source) the target's own search runs first (read on
  through a source's own pages: an HL7 v2 PAS's short replies), bounded by what the
  rewritten request carries, never silently cut (400 ``CHAIN_TOO_BROAD``):

  - a chained parameter: at most :data:`MAX_CHAIN_MATCHES` target records, each one
    reference;
  - ``_has``: at most :data:`MAX_CHAIN_MATCHES` distinct ids its records refer to, the
    records read in pages of MAX_CHAIN_MATCHES + 1 up to :data:`MAX_HAS_RECORDS` (many
    records may refer to one id: a patient's hundred results), which bounds the work.

  For a client's search (:func:`resolve_request`) what it found
  replaces the chain in the request (``patient=Patient/1,Patient/7``; ``_id=`` for
  ``_has``), which then runs as if sent so: the self link says what was used, as STU3
  asks, and the paging links page over that set (the chain is not resolved again per
  page; a chain beside ``_page`` is no link of ours: 400). The first page says so in an
  information entry (``CHAIN_RESOLVED_BY_SEARCH``). What the links name is audited: a
  chained parameter's records as served (they are what is named), a ``_has``'s ids of the
  searched type with the patients of the records that referred to them (the other type's
  records are read, not served: gateway.audit.note_disclosed).
  Other plans (a conditional create, the record operations) resolve each source's chains
  just before its query (:func:`resolve`), to keys of the target sources its columns hold.

The patient compartment (``patient/`` tokens) confines the target's records too, and the
client needs search permission on every type a chain or ``_has`` looks into (see
gateway.auth.authorize). Errors are 400 with a stable code, whatever ``Prefer: handling``
says: ignoring a chain would widen the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode

from adapters.base import (
    And,
    Chain,
    Compare,
    Count,
    Criterion,
    Nothing,
    SortKey,
    all_of,
    any_of,
)
from gateway import audit, compartment
from gateway.errors import BadRequest
from gateway.plan import (
    Chained,
    SearchPlan,
    TargetPolicy,
    id_criterion,
    matches_exactly,
    param_criterion,
)
from gateway.search import split_values

if TYPE_CHECKING:
    from adapters.base import Page
    from gateway.mapping.model import SearchParam
    from gateway.mapping.storage import Storage
    from gateway.plan import SearchContext


# What a chain needs of providers and the registry, as protocols: gateway.providers and
# gateway.registry call into this module, so it does not import them (no import circle).
class Provider(compartment.Source, Protocol):
    """One source of a type (gateway.providers.Provider)."""

    id_prefix: str
    """Set when one of several sources of a type: its ids carry it."""

    async def search(self, plan: SearchPlan, after: tuple[Any, ...] | None = None,
                     backwards: bool = False, extra: Criterion | None = None) -> Page: ...
    def record_id(self, rec: Any) -> str: ...
    def reference_ids(self, rec: Any, param: str, target: str) -> Iterator[str]: ...
    def resources(self, recs: Sequence[Any]) -> list[dict[str, Any]]: ...


class TypeProvider(Protocol):
    """A served type: one source, or several (gateway.multisource.MultiSource)."""

    @property
    def resource_type(self) -> str: ...
    @property
    def params(self) -> Mapping[str, SearchParam]: ...


class Registry(Protocol):
    """gateway.registry.Registry."""

    def __contains__(self, resource_type: str) -> bool: ...
    def __iter__(self) -> Iterator[Any]: ...
    def get(self, resource_type: str) -> Any: ...
    def search_context(self, provider: Any) -> SearchContext: ...

MAX_CHAIN_MATCHES = 100
"""At most this many target records when a chained parameter is resolved through the
target's search (each is one reference the rewritten request carries), and at most this many
distinct ids a ``_has`` resolved so finds (what its ``_id=`` carries)."""

MAX_HAS_RECORDS = 10 * MAX_CHAIN_MATCHES
"""At most this many records of the other type read to resolve one ``_has`` (or an
``:exact`` chain, whose database matches are kept only if served exactly) through its
search. Its records are not what the rewritten request carries (the ids they refer to are),
and many may refer to one id (a patient's hundred results), so the id bound alone would
refuse ``Patient?_has:Observation:patient:code=X`` at its 101st result; this bounds the work
instead. Read in pages of MAX_CHAIN_MATCHES + 1 (the first is the statement a chained
parameter sends; reading stops at the page past either bound), so at most ten keyset
statements, or a PAS's replies to the same number of records, and only one page held at a
time: 1,000 records is a walk a client could make in a few requests of ``_count`` hundreds."""

MAX_LINK_QUERY = 8 * 1024
"""At most this many bytes of query in a link carrying what chains found: each chain is
bounded, several together are not, and many proxies refuse a request line over 8 KiB."""


class UnknownChain(BadRequest):
    issue_code = "not-supported"
    error_code = "UNKNOWN_CHAIN"


class ChainOnNonReference(BadRequest):
    error_code = "CHAIN_NOT_REFERENCE"


class ChainTooDeep(BadRequest):
    issue_code = "not-supported"
    error_code = "CHAIN_TOO_DEEP"


class ChainTooBroad(BadRequest):
    issue_code = "too-costly"
    error_code = "CHAIN_TOO_BROAD"


# --- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One target type of a chain resolved through that type's search."""

    target: Provider
    criteria: Criterion
    """On the target's references (its search adds the compartment)."""
    ref: str
    """This source's reference that takes what is found."""
    storage: Storage
    target_ref: str
    """What is taken from the found records, as stored: their key (a chained parameter) or
    their reference to this type (``_has``)."""


@dataclass(frozen=True)
class Deferred:
    label: str
    parts: tuple[_Part, ...]
    forward: bool = False
    """A chained parameter (not ``_has``): chains through the same reference into the same
    targets are one search of the target (``patient.family`` with ``patient.birthdate``)."""
    keys: tuple[str, ...] = ()
    """The request's parameter names it stands for (``patient.family:exact``)."""


def plan_chain(registry: Registry, provider: Provider, key: str, raw: str) -> Chained:
    """A chained parameter (``patient.family``) or ``_has`` of ``provider``'s search."""
    if key.split(":", 1)[0] == "_has":
        return _has(registry, provider, key, raw)
    return _forward(registry, provider, key, raw)


def _forward(registry: Registry, provider: Provider, key: str, raw: str) -> Chained:
    head, _, tail = key.partition(".")
    name, _, rtype = head.partition(":")
    tname, _, tmod = tail.partition(":")
    if "." in tail or tname == "_has":
        raise ChainTooDeep(f"'{_safe(key)}': this server follows one level of chaining")
    if not name or not tname:
        raise UnknownChain(f"'{_safe(key)}' is not a chained parameter")
    param = provider.params.get(name)
    if param is None:
        raise UnknownChain(
            f"'{_safe(name)}' is not a search parameter of {provider.resource_type}")
    if param.type != "reference":
        raise ChainOnNonReference(
            f"'{name}' is a {param.type} parameter, not a reference: it cannot be chained")
    columns = param.reference_columns()
    if rtype:
        columns = [c for c in columns if c.target == rtype]
        if not columns:
            raise UnknownChain(f"'{name}' does not refer to {_safe(rtype)}")
    targets = list(dict.fromkeys(c.target for c in columns))
    having = [source for t in targets if t in registry for source in _sources(registry.get(t))
              if _has_param(source, tname)]
    if not having:
        raise UnknownChain(
            f"'{name}' refers to {', '.join(targets)}: none has a search parameter "
            f"'{_safe(tname)}' on this server")
    searched = frozenset(t.resource_type for t in having)
    label = f"{name}.{tname}"
    policies = _policies(registry, name, head, searched, tname)
    # (a target source, this source's reference column): each column is joined to the one
    # source of its target whose keys it holds (its id_prefix). Joining a column to another
    # source's keys would match unrelated records that happen to share a number.
    found = [(t, c.ref) for c in columns for t in having
             if t.resource_type == c.target and t.id_prefix == c.prefix]
    if not found:
        return Chained(Nothing(), None, searched, label, policies=policies)
    # :exact is case- and accent-sensitive on the served value, which SQL does not compare:
    # resolved first, where the found records are checked as served (resolve_request)
    if tmod != "exact" and all(_joinable(provider, t) for t, _ in found):
        return Chained(any_of([
            Chain(ref, t.mapping.prepared, t.key,
                  _confined(t, _target_criteria(registry, t, tname, tmod, raw)))
            for t, ref in found]), None, searched, label, policies=policies)
    # one of them cannot be joined: all go through their target's search
    parts = tuple(_Part(t, _target_criteria(registry, t, tname, tmod, raw), ref,
                        provider.mapping.storage(ref), t.key) for t, ref in found)
    return Chained(None, Deferred(label, parts, forward=True, keys=(key,)), searched, label,
                   policies=policies)


def _policies(registry: Registry, name: str, head: str, types: frozenset[str], tname: str
              ) -> tuple[TargetPolicy, ...]:
    """The search policy of each type chained into, as its own search would apply it."""
    out: list[TargetPolicy] = []
    for t in sorted(types):
        target = registry.get(t)
        policy = target.policy
        if policy is None or not policy.chains:
            continue
        ptype = "token" if tname == "_id" else next(
            s.params[tname].type for s in _sources(target) if tname in s.params)
        others = tuple((n, p.type) for n, p in target.params.items())
        out.append(TargetPolicy(name, head, t, policy, tname, ptype, others))
    return tuple(out)


def _has(registry: Registry, provider: Provider, key: str, raw: str) -> Chained:
    parts = key.split(":")
    if len(parts) > 3 and (parts[3] == "_has" or "." in parts[3]):
        raise ChainTooDeep("'_has' cannot be nested or chained: this server follows one level")
    if len(parts) not in (4, 5) or not all(parts[1:4]):
        raise UnknownChain("'_has' takes _has:<type>:<reference parameter>:<parameter>")
    _, rtype, name, tname, *mod = parts
    if rtype not in registry:
        raise UnknownChain(f"'_has': this server does not serve {_safe(rtype)}")
    # (a source of the other type, its reference column to this source)
    found: list[tuple[Provider, str]] = []
    asked = False
    for source in _sources(registry.get(rtype)):
        param = source.params.get(name)
        if param is None:
            continue
        if param.type != "reference":
            raise ChainOnNonReference(f"'_has': {rtype} '{name}' is a {param.type} "
                                      "parameter, not a reference")
        columns = [c for c in param.reference_columns() if c.target == provider.resource_type]
        if not columns:
            raise UnknownChain(
                f"'_has': {rtype} '{name}' does not refer to {provider.resource_type}")
        if not _has_param(source, tname):
            raise UnknownChain(
                f"'_has': '{_safe(tname)}' is not a search parameter of {rtype}")
        asked = True
        # only its columns holding this source's keys (see _forward)
        found += [(source, c.ref) for c in columns if c.prefix == provider.id_prefix]
    if not asked:
        raise UnknownChain(f"'_has': '{_safe(name)}' is not a search parameter of {rtype}")
    modifier = mod[0] if mod else ""
    label = f"_has:{rtype}:{name}:{tname}"
    searched = frozenset({rtype})
    if not found:
        # nothing of the other type refers to this source's records (one of several
        # sources of this type, whose keys none of its reference columns holds)
        return Chained(Nothing(), None, searched, label)
    if modifier != "exact" and all(_joinable(provider, s) for s, _ in found):  # see _forward
        return Chained(any_of([
            Chain(provider.key, s.mapping.prepared, ref,
                  _confined(s, _target_criteria(registry, s, tname, modifier, raw)))
            for s, ref in found]), None, searched, label)
    keys = provider.mapping.storage(provider.key)
    deferred = tuple(_Part(s, _target_criteria(registry, s, tname, modifier, raw),
                           provider.key, keys, ref) for s, ref in found)
    return Chained(None, Deferred(label, deferred, keys=(key,)), searched, label)


def _sources(provider: Any) -> list[Provider]:
    """The per-source providers of a type (one, unless several mappings serve it)."""
    return list(getattr(provider, "sources", [provider]))


def _has_param(target: Provider, name: str) -> bool:
    return name == "_id" or name in target.params


def _target_criteria(registry: Registry, target: Provider, name: str, modifier: str,
                     raw: str) -> Criterion:
    ctx = registry.search_context(target)
    if name == "_id":
        return id_criterion(ctx, modifier, raw)
    return param_criterion(ctx, name, target.params[name], modifier or None, raw)


def _joinable(provider: Provider, target: Provider) -> bool:
    adapter = provider.mapping.adapter
    return (target.mapping.adapter is adapter
            and adapter.chains(provider.mapping.prepared, target.mapping.prepared))


def _confined(target: Provider, criteria: Criterion) -> Criterion:
    """The target's criteria within the request's patient compartment, if any."""
    confined = compartment.restrict_count(target, Count(criteria)).criteria
    assert confined is not None
    return confined


def _safe(text: str) -> str:
    """A client-supplied name, shortened for an error message (names, never values)."""
    return text if len(text) <= 64 else text[:61] + "..."


# --- resolving what could not be joined ------------------------------------------------------


async def resolve(plan: SearchPlan) -> None:
    """Run the deferred chains' searches and AND what they found into the plan's criteria."""
    if not plan.deferred:
        return
    found = [await _resolve(d) for d in combined(plan.deferred)]
    if any(isinstance(c, Nothing) for c in found):
        plan.criteria = Nothing()  # a chain found nothing: no query (HL7 v2 takes no AND false)
    else:
        plan.criteria = all_of([c for c in (plan.criteria, *found) if c is not None])
    plan.deferred = []


def combined(deferred: list[Deferred]) -> list[Deferred]:
    """Chained parameters through one reference into the same targets, as one search of each
    target (their criteria ANDed): a single-valued reference makes that the same answer, and
    a target's search policy (gateway.plan.TargetPolicy) may ask for both together."""
    out: dict[Any, Deferred] = {}
    for i, d in enumerate(deferred):
        key = (tuple((id(p.target), p.ref) for p in d.parts) if d.forward else i)
        had = out.get(key)
        if had is None:
            out[key] = d
            continue
        out[key] = Deferred(f"{had.label}, {d.label}", tuple(
            replace(a, criteria=And((a.criteria, b.criteria)))
            for a, b in zip(had.parts, d.parts, strict=True)), forward=True,
            keys=(*had.keys, *d.keys))
    return list(out.values())


async def _resolve(d: Deferred) -> Criterion:
    if not d.forward:  # _has: the keys its records refer to (every part's: this source's key)
        keys: dict[Any, None] = {}
        budget = MAX_HAS_RECORDS
        for part in d.parts:
            def take(records: list[Any], part: _Part = part) -> None:
                for rec in records:
                    for v in part.target.reference_values(rec, part.target_ref):
                        try:
                            keys[part.storage.parse_key(v)] = None
                        except ValueError:
                            continue  # cannot exist in this source's column
                if len(keys) > MAX_CHAIN_MATCHES:
                    raise _too_many_ids(f"'{d.label}'", MAX_CHAIN_MATCHES, part.target)

            budget -= await _read(part.target, part.criteria, budget, MAX_CHAIN_MATCHES + 1,
                                  _too_many_records(f"'{d.label}'", part.target), take)
        return any_of([Compare(d.parts[0].ref, "=", k) for k in keys])
    out: list[Criterion] = []
    for part in d.parts:
        target = part.target
        records = await _records(target, part.criteria, MAX_CHAIN_MATCHES, f"'{d.label}'")
        values = [v for rec in records for v in target.reference_values(rec, part.target_ref)]
        found: dict[Any, None] = {}
        for v in values:
            try:
                found[part.storage.parse_key(v)] = None
            except ValueError:
                continue  # cannot exist in this source's column
        # Alternatives as an OR of equalities: a source that cannot ask for several values
        # refuses an OR (400) rather than answering for the first one only.
        out.append(any_of([Compare(part.ref, "=", k) for k in found]))
    return any_of(out)


def deferred_searches(plan: SearchPlan) -> Iterator[tuple[Criterion, str]]:
    """(criteria, key reference) of each search ``resolve`` will run on another type, so
    that its cost is checked with the plan's own before anything runs."""
    for d in plan.deferred:
        for part in d.parts:
            yield part.criteria, part.target.key


# --- a client's search: chains resolved first, and the links say so ------------------------


def unresolved(plan: SearchPlan) -> list[str]:
    """The request's chain parameters some source of the type cannot join."""
    parts: list[SearchPlan] = getattr(plan, "parts", None) or [plan]
    return list(dict.fromkeys(k for p in parts for d in p.deferred for k in d.keys))


@dataclass
class _Lookup:
    """One search of another type standing for some of the request's chains: a chained
    parameter's target (what it finds becomes the reference parameter) or a ``_has``'s
    other type (what its records refer to becomes ``_id``)."""

    param: str
    targets: list[Provider]
    has: str = ""
    """``_has``: the other type's reference parameter to the searched type."""
    keys: list[str] = field(default_factory=list)
    criteria: dict[int, list[Criterion]] = field(default_factory=dict)
    """By index in ``targets``: the chains' criteria on that source (ANDed)."""
    exact: list[tuple[str, ...]] = field(default_factory=list)
    """Each ``:exact`` chain's values: a found record must serve one of them as sent."""


@dataclass(frozen=True)
class Resolved:
    pairs: list[tuple[str, str]] | None
    """The request with its chains replaced by what their searches found; None: a chain
    found nothing, so nothing matches."""
    notes: list[str]
    """For the client: which parameters were answered that way."""


async def resolve_request(registry: Registry, provider: TypeProvider,
                          pairs: list[tuple[str, str]], keys: list[str], max_values: int
                          ) -> Resolved:
    """The client's search with the chains in ``keys`` (see :func:`unresolved`) answered by
    searching their targets first, as the client could have done: ``patient.family=x``
    becomes ``patient=Patient/1,Patient/7``, ``_has:Encounter:patient:status=y`` becomes
    ``_id=...``. The search then goes on as that request, so its self link says what the
    chain found (STU3: the parameters actually used) and its paging links page over that
    set, instead of resolving the chain again on every page.

    Every source of each target type is searched (also those a source of this type could
    join: the rewritten request stands for all sources), finding at most MAX_CHAIN_MATCHES
    and ``max_values`` references or ids (a paging link must be accepted back; a ``_has``
    reading at most MAX_HAS_RECORDS records to find them), else 400 CHAIN_TOO_BROAD.
    Chains are already checked by planning (names, policies)."""
    limit = min(MAX_CHAIN_MATCHES, max_values) if max_values else MAX_CHAIN_MATCHES
    wanted = set(keys)
    lookups: dict[tuple[Any, ...], _Lookup] = {}
    of_key: dict[str, _Lookup] = {}
    for key, raw in pairs:
        if key not in wanted:
            continue
        if key not in of_key:
            of_key[key] = _lookup(registry, provider, key, lookups)
        lookup = of_key[key]
        if key not in lookup.keys:
            lookup.keys.append(key)
        tname, _, tmod = _tail(key)
        if tmod == "exact":
            lookup.exact.append(tuple(v.strip() for v in split_values(raw)))
        for i, target in enumerate(lookup.targets):
            lookup.criteria.setdefault(i, []).append(
                _confined(target, _target_criteria(registry, target, tname, tmod, raw)))
    found: dict[int, list[str]] = {}
    notes: list[str] = []
    read: list[tuple[Provider, list[Any]]] = []
    disclosed: list[dict[str, set[str]]] = []
    for lookup in lookups.values():
        disclosed.append({})
        values = await _run(lookup, provider.resource_type, limit, read, disclosed[-1])
        found[id(lookup)] = values
        types = ", ".join(dict.fromkeys(t.resource_type for t in lookup.targets))
        label = ", ".join(f"'{k}'" for k in lookup.keys)
        notes.append(
            f"{label} answered by searching {types} first ({len(values)} found; at most "
            f"{limit}): the self link gives what was found as '{lookup.param}', and the "
            "paging links page over that" if values else
            f"{label} answered by searching {types} first, which found nothing")
    if not all(found.values()):
        return Resolved(None, notes)
    out: list[tuple[str, str]] = []
    done: set[int] = set()
    for key, raw in pairs:
        if key not in of_key:
            out.append((key, raw))
        elif id(of_key[key]) not in done:  # where its first chain was
            done.add(id(of_key[key]))
            out.append((of_key[key].param, ",".join(found[id(of_key[key])])))
    if len(urlencode(out)) > MAX_LINK_QUERY:
        raise ChainTooBroad(
            f"{', '.join(repr(k) for k in keys)} found more together than a paging link can "
            f"carry ({MAX_LINK_QUERY} bytes of query): narrow them")
    # What was found goes back to the client in the links. A chained parameter's records
    # (the patients it found) are named there: audited as served (gateway.audit), and
    # checked within the compartment (their search was confined to it). A _has names the
    # ids of the searched type its records refer to, not those records (up to
    # MAX_HAS_RECORDS, never served): the ids are audited, with the patients whose records
    # named them.
    for target, records in read:
        target.resources(records)
    for ids in disclosed:
        for rid, patients in ids.items():
            audit.note_disclosed(provider.resource_type, rid, patients)
    return Resolved(out, notes)


def _tail(key: str) -> tuple[str, str, str]:
    """(target parameter, ":", modifier) of a chained key or ``_has``."""
    if key.startswith("_has:"):
        parts = key.split(":")
        return parts[3], ":", parts[4] if len(parts) > 4 else ""
    return key.partition(".")[2].partition(":")


def _lookup(registry: Registry, provider: TypeProvider, key: str,
            lookups: dict[tuple[Any, ...], _Lookup]) -> _Lookup:
    """The search that answers ``key``: shared by chains through one reference into the same
    targets (``patient.family`` with ``patient:Patient.birthdate``), and by ``_has`` on one
    reference of one type."""
    tname = _tail(key)[0]
    if key.startswith("_has:"):
        _, rtype, name, *_rest = key.split(":")
        targets = [s for s in _sources(registry.get(rtype))
                   if name in s.params and _has_param(s, tname)
                   and provider.resource_type in s.params[name].reference_targets()]
        group: tuple[Any, ...] = ("_has", rtype, name)
        param, has = "_id", name
    else:
        head = key.partition(".")[0]
        param, _, rtype = head.partition(":")
        types = [t for t in provider.params[param].reference_targets()
                 if t in registry and rtype in ("", t)]
        targets = [s for t in types for s in _sources(registry.get(t)) if _has_param(s, tname)]
        group, has = (param, *(id(t) for t in targets)), ""
    if group not in lookups:
        lookups[group] = _Lookup(param, targets, has)
    return lookups[group]


async def _run(lookup: _Lookup, searched: str, limit: int,
               read: list[tuple[Provider, list[Any]]], disclosed: dict[str, set[str]]
               ) -> list[str]:
    """The served references (or ids) the lookup's search finds, in the order found: for a
    chained parameter the records found are added to ``read``, for a ``_has`` the ids found
    to ``disclosed`` (with the patients of the records referring to each)."""
    label = ", ".join(f"'{k}'" for k in lookup.keys)
    if lookup.has:
        await _referred(lookup, searched, limit, label, disclosed)
        return list(disclosed)
    values: dict[str, None] = {}
    for i, target in enumerate(lookup.targets):
        if lookup.exact:
            records = await _exact(target, all_of(lookup.criteria[i]), limit, label,
                                   lookup.exact)
        else:
            records = await _records(target, all_of(lookup.criteria[i]), limit, label)
        read.append((target, records))
        values.update((f"{target.resource_type}/{target.record_id(rec)}", None)
                      for rec in records)
        if len(values) > limit:
            raise _too_broad(label, limit, target)
    return list(values)


async def _referred(lookup: _Lookup, searched: str, limit: int, label: str,
                    disclosed: dict[str, set[str]]) -> None:
    """A ``_has``: the ``searched`` ids the other type's matching records refer to, into
    ``disclosed``. What the rewritten request carries is those ids, so they are bounded
    (``limit``), and the records read to find them by MAX_HAS_RECORDS; past either, 400."""
    budget = MAX_HAS_RECORDS
    for i, target in enumerate(lookup.targets):
        # A Patient reference only in the built resource (compartment "unrestrictable"):
        # built to find whose record it is, as for :exact, never noted as served.
        build = bool(lookup.exact) or not compartment.link(target).refs

        def take(records: list[Any], target: Provider = target, build: bool = build) -> None:
            shown: list[dict[str, Any] | None] = [None] * len(records)
            if build:
                with audit.unserved():
                    shown = list(target.resources(records))
            for rec, res in zip(records, shown, strict=True):
                if lookup.exact and not (res is not None and matches_exactly(res, lookup.exact)):
                    continue  # as the other type's own search does
                ids = dict.fromkeys(target.reference_ids(rec, lookup.has, searched))
                if not ids:
                    continue
                patients = audit.record_patients(target, rec, target.record_id(rec), res)
                for rid in ids:
                    disclosed.setdefault(rid, set()).update(patients)
            if len(disclosed) > limit:
                raise _too_many_ids(label, limit, target, searched)

        budget -= await _read(target, all_of(lookup.criteria[i]), budget, limit + 1,
                              _too_many_records(label, target), take)


async def _exact(target: Provider, criteria: Criterion | None, limit: int, label: str,
                 exact: list[tuple[str, ...]]) -> list[Any]:
    """:func:`_records` for an ``:exact`` chain: the database matches case- and
    accent-insensitively (``smith`` finds every SMITH), so records are read on, up to
    MAX_HAS_RECORDS, and only those serving the value as sent are kept (as the target's own
    search does, gateway.plan.matches_exactly) and count towards ``limit``."""
    kept: list[Any] = []

    def take(records: list[Any]) -> None:
        with audit.unserved():  # built to compare, not served
            shown = target.resources(records)
        kept.extend(r for r, res in zip(records, shown, strict=True)
                    if matches_exactly(res, exact))
        if len(kept) > limit:
            raise _too_broad(label, limit, target)

    await _read(target, criteria, MAX_HAS_RECORDS, limit + 1,
                _too_many_records(label, target), take)
    return kept


async def _records(target: Provider, criteria: Criterion | None, limit: int, label: str
                   ) -> list[Any]:
    """The target's records matching ``criteria``: at most ``limit``, more is a 400
    CHAIN_TOO_BROAD (never a cut)."""
    records: list[Any] = []
    await _read(target, criteria, limit, limit + 1, _too_broad(label, limit, target),
                records.extend)
    return records


async def _read(target: Provider, criteria: Criterion | None, limit: int, size: int,
                too_broad: ChainTooBroad, take: Callable[[list[Any]], None]) -> int:
    """Hands ``take`` the target's records matching ``criteria`` a page at a time (at most
    ``size`` asked at once), at most ``limit`` in all: more is ``too_broad`` raised (never a
    cut); returns how many were read. A source answering in parts is read on to the end or
    past the bound, as a client walking its pages would: an HL7 v2 PAS may send a few
    records a reply (RCP-2 is a most, not a promise) with a DSC-1 pointer to the rest, and
    a short reply is not "more than the bound"."""
    seen = 0
    after: tuple[Any, ...] | None = None
    for _ in range(limit + 1):  # a part with no record (filtered on the reply) counts too
        sub = SearchPlan(criteria=criteria, sort=(SortKey(target.key),),
                         count=min(size, limit - seen + 1), total="none")
        page = await target.search(sub, after)
        seen += len(page.records)
        if seen > limit:
            break
        take(page.records)
        if not page.more:
            return seen
        if page.end is None:
            break  # more, and no way on: not known to be within the bound
        after = page.end
    raise too_broad


def _too_broad(label: str, limit: int, target: Provider) -> ChainTooBroad:
    return ChainTooBroad(
        f"{label} matches more than {limit} {target.resource_type} resources, and this "
        "server cannot join them in one query: narrow it")


def _too_many_ids(label: str, limit: int, target: Provider, searched: str = "") -> ChainTooBroad:
    return ChainTooBroad(
        f"{label}: the {target.resource_type} resources it matches refer to more than "
        f"{limit} {searched or 'different'} resources, and this server cannot join them in "
        "one query: narrow it")


def _too_many_records(label: str, target: Provider) -> ChainTooBroad:
    return ChainTooBroad(
        f"{label} matches more than {MAX_HAS_RECORDS} {target.resource_type} resources, "
        "more than this server reads to find what they refer to (it cannot join them in one "
        "query): narrow it")


def nothing(plan: SearchPlan) -> None:
    """The plan (and each source's) matches nothing: a chain found no target."""
    for part in (getattr(plan, "parts", None) or [plan]):
        part.criteria = Nothing()
        part.deferred = []
    plan.criteria = Nothing()
    plan.deferred = []


# --- what the CapabilityStatement says -------------------------------------------------------


def chain_names(registry: Registry, provider: TypeProvider, name: str) -> list[str]:
    """The chained parameters a reference parameter of ``provider`` takes, as a client
    writes them: ``patient.family``; ``general-practitioner:Practitioner.family`` when the
    reference may point to several served types."""
    param = provider.params[name]
    targets = [t for t in param.reference_targets() if t in registry]
    return [f"{name}.{n}" if len(targets) == 1 else f"{name}:{t}.{n}"
            for t in targets for n in ["_id", *sorted(registry.get(t).params)]]


def chain_joined(registry: Registry, provider: TypeProvider, name: str) -> bool:
    """Whether every chain of this reference parameter is answered in the same query."""
    targets = [t for t in provider.params[name].reference_targets() if t in registry]
    return all(_joinable(s, t) for s in _sources(provider) for rtype in targets
               for t in _sources(registry.get(rtype)))


def has_names(registry: Registry, provider: TypeProvider) -> list[tuple[str, bool]]:
    """``_has`` prefixes that work on ``provider`` (``Encounter:patient``), each with whether
    it is answered in the same query."""
    return [(f"{other.resource_type}:{n}",
             all(_joinable(s, o) for s in _sources(provider) for o in _sources(other)))
            for other in registry
            for n, p in sorted(other.params.items())
            if p.type == "reference" and provider.resource_type in p.reference_targets()]


__all__ = [
    "MAX_CHAIN_MATCHES",
    "MAX_HAS_RECORDS",
    "ChainOnNonReference",
    "ChainTooBroad",
    "ChainTooDeep",
    "Deferred",
    "Resolved",
    "UnknownChain",
    "chain_joined",
    "chain_names",
    "deferred_searches",
    "has_names",
    "nothing",
    "plan_chain",
    "resolve",
    "resolve_request",
    "unresolved",
]
