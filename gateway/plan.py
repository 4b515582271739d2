"""Turn the FHIR search parameters of one request into a query plan for a provider's adapter.

The mapping's ``search:`` declarations say which parameters work and which source
references they read; this module checks each parameter against them, parses its values
(:mod:`gateway.search`) and produces the adapter's criteria tree, sort order and page size.
The same declarations drive the CapabilityStatement, so it can only claim what works here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from adapters.base import (
    And,
    Compare,
    Criterion,
    In,
    IsNull,
    Not,
    Nothing,
    Or,
    SortKey,
    Text,
    all_of,
    any_of,
)
from gateway import nhs_number
from gateway.errors import (
    InsufficientChainCriteria,
    InsufficientSearchCriteria,
    InvalidNHSNumber,
    InvalidParameter,
    UnknownParameter,
)
from gateway.mapping.codemaps import CodeMap
from gateway.mapping.model import RefColumn, SearchParam, SearchPolicy
from gateway.mapping.storage import Storage
from gateway.search import (
    ID_RE,
    MODIFIERS,
    DateValue,
    MissingValue,
    QuantityValue,
    ReferenceValue,
    StringValue,
    TokenValue,
    parse_date,
    parse_missing,
    parse_quantity,
    parse_reference,
    parse_string,
    parse_token,
    split_values,
)

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"

# Parameters that shape the result rather than select records.
RESULT_PARAMETERS = frozenset(
    {"_count", "_sort", "_include", "_revinclude", "_summary", "_total", "_format", "_pretty",
     "_page"}
)
# Parameters that are about the response format only: never part of the query's identity.
FORMAT_PARAMETERS = frozenset({"_format", "_pretty"})


@dataclass(frozen=True, slots=True)
class Include:
    param: str
    target: str


@dataclass(frozen=True, slots=True)
class RevInclude:
    source_type: str
    param: str


@dataclass(frozen=True)
class Chained:
    """What one chained parameter or ``_has`` adds to a plan (made by gateway.chain)."""

    criterion: Criterion | None
    """Answered in this source's own query (a :class:`adapters.base.Chain`), or None."""
    deferred: Any = None
    """Else: resolved through the other type's search before the query runs."""
    searched: frozenset[str] = frozenset()
    """Types whose records decide the match: the client needs search on each."""
    policy_name: str = ""
    """How it counts for a search policy (a parameter of type reference)."""
    policies: tuple[TargetPolicy, ...] = ()
    """The search policies of the types it chains into (a forward chain's targets)."""


@dataclass(frozen=True)
class TargetPolicy:
    """A chain into a type with a search policy: that type's own rule applies to the chained
    parameters into it (``Encounter?patient.family=x`` is refused as ``Patient?family=x``)."""

    reference: str
    """The reference parameter chained through (``patient``)."""
    written: str
    """The chain's head as the client wrote it (``patient``, ``subject:Patient``)."""
    resource_type: str
    policy: SearchPolicy
    param: str
    """The target's parameter chained into (``family``)."""
    param_type: str
    others: tuple[tuple[str, str], ...] = ()
    """The target's other parameters (name, type), to suggest one the rule would take."""


@dataclass
class SearchPlan:
    criteria: Criterion | None
    sort: tuple[SortKey, ...]
    count: int
    includes: list[Include] = field(default_factory=list)
    revincludes: list[RevInclude] = field(default_factory=list)
    summary_count: bool = False
    total: Literal["accurate", "none", "auto"] = "auto"
    used: list[tuple[str, str]] = field(default_factory=list)
    """(name[:modifier], raw value) pairs that shaped the query, in request order."""
    ignored: list[str] = field(default_factory=list)
    page_token: str | None = None
    deferred: list[Any] = field(default_factory=list)
    """Chains resolved through another type's search (gateway.chain.resolve) before the
    query runs; their criteria are then ANDed into ``criteria``."""
    searched_types: set[str] = field(default_factory=set)
    """Other types a chain or ``_has`` searched (authorisation: search on each)."""
    notes: list[str] = field(default_factory=list)
    """Information for the client about how the search was answered (gateway.chain.
    resolve_request: a chain answered by searching its target first)."""
    exact: list[tuple[str, ...]] = field(default_factory=list)
    """Each ``:exact`` parameter's values as sent: a match must carry one of them, exactly
    (case and accents), as a value of the served resource (see ``matches_exactly``)."""


@dataclass(frozen=True)
class SearchContext:
    """What the planner needs to know about one provider."""

    resource_type: str
    params: dict[str, SearchParam]
    policy: SearchPolicy | None
    sortable: Sequence[str]
    key_ref: str
    storage: Callable[[str], Storage]
    codemaps: dict[str, CodeMap]
    tz: Any
    include_targets: Callable[[str], bool]
    """Whether a resource type is served (so a reference to it can be included)."""
    revinclude_sources: Callable[[str, str], SearchParam | None]
    """The reference parameter ``param`` of provider ``type``, if it exists."""
    chain: Callable[[str, str], Chained] | None = None
    """Plans a chained parameter (``patient.family``) or ``_has`` (gateway.chain)."""
    id_prefix: str = ""
    """The source's id prefix (one of several sources of a type): ``_id`` values carry it."""
    id_prefixes: Callable[[str], Sequence[str]] = lambda _type: ()
    """The id prefixes of a served type's sources (which source a referenced id belongs to)."""


def plan_search(
    ctx: SearchContext,
    pairs: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool,
    policy: bool = True,
) -> SearchPlan:
    """``policy``: check the type's search policy (and its chains' targets'); not for a
    search standing for one already checked (a chain's resolved form, gateway.chain)."""
    criteria: list[Criterion] = []
    used: list[tuple[str, str]] = []
    ignored: list[str] = []
    used_types: dict[str, str] = {}
    chain_policies: list[TargetPolicy] = []
    plan = SearchPlan(criteria=None, sort=(), count=default_count)
    sort_spec: list[tuple[str, bool]] = []

    for key, raw in pairs:
        name, _, modifier = key.partition(":")
        if name in FORMAT_PARAMETERS:
            continue
        if name in RESULT_PARAMETERS:
            _result_parameter(ctx, plan, name, modifier, raw, sort_spec, max_count)
            if name != "_page":
                used.append((key, raw))
            continue
        if name == "_id":
            criteria.append(id_criterion(ctx, modifier, raw))
            used.append((key, raw))
            used_types[name] = "token"
            continue
        if ctx.chain is not None and (name == "_has" or "." in key):
            term = ctx.chain(key, raw)
            if term.criterion is not None:
                criteria.append(term.criterion)
            if term.deferred is not None:
                plan.deferred.append(term.deferred)
            plan.searched_types |= term.searched
            chain_policies += term.policies
            used.append((key, raw))
            used_types[term.policy_name] = "reference"
            continue
        param = ctx.params.get(name)
        if param is None:
            ignored.append(name)
            continue
        criteria.append(_criterion(ctx, name, param, modifier or None, raw))
        if modifier == "exact" and param.type == "string":
            plan.exact.append(tuple(v.strip() for v in split_values(raw)))
        used.append((key, raw))
        used_types[name] = param.type

    if ignored and strict:
        # Named all at once, before the search policy: a misspelt parameter is the problem
        # to report, not the "two parameters" rule it happens to break.
        names = ", ".join(f"'{n}'" for n in dict.fromkeys(ignored))
        raise UnknownParameter(
            f"unknown or unsupported search parameter(s) {names} for {ctx.resource_type} "
            "(send 'Prefer: handling=lenient' to have them ignored)")
    if ctx.policy and policy and not plan.page_token:
        _check_policy(ctx, ctx.policy, used_types)
    if chain_policies and policy and not plan.page_token:
        _check_chain_policies(chain_policies)

    key_sort = SortKey(ctx.key_ref)
    plan.sort = (*(SortKey(_sort_ref(ctx, name), desc) for name, desc in sort_spec), key_sort)
    plan.criteria = all_of(criteria)
    plan.used = used
    plan.ignored = ignored
    return plan


def _result_parameter(
    ctx: SearchContext,
    plan: SearchPlan,
    name: str,
    modifier: str,
    raw: str,
    sort_spec: list[tuple[str, bool]],
    max_count: int,
) -> None:
    if modifier and name not in ("_include", "_revinclude"):
        raise InvalidParameter(f"'{name}' takes no modifier")
    if name == "_count":
        if not raw.isdigit() or len(raw) > 6:
            raise InvalidParameter("'_count' must be a whole number")
        plan.count = min(int(raw), max_count)
    elif name == "_sort":
        for item in raw.split(","):
            desc = item.startswith("-")
            pname = item[1:] if desc else item
            if pname not in ctx.sortable:
                allowed = ", ".join(ctx.sortable) or "none"
                raise InvalidParameter(
                    f"cannot sort {ctx.resource_type} by '{pname}' (sortable: {allowed})"
                )
            sort_spec.append((pname, desc))
    elif name == "_summary":
        if raw == "count":
            plan.summary_count = True
        elif raw != "false":
            raise InvalidParameter("'_summary' supports count and false")
    elif name == "_total":
        if raw not in ("accurate", "none", "estimate"):
            raise InvalidParameter("'_total' takes none, estimate or accurate")
        plan.total = "accurate" if raw == "accurate" else "none"
    elif name == "_include":
        for value in raw.split(","):
            plan.includes.append(_parse_include(ctx, value))
    elif name == "_revinclude":
        for value in raw.split(","):
            plan.revincludes.append(_parse_revinclude(ctx, value))
    elif name == "_page":
        plan.page_token = raw


def _parse_include(ctx: SearchContext, value: str) -> Include:
    parts = value.split(":")
    if len(parts) not in (2, 3) or parts[0] != ctx.resource_type:
        raise InvalidParameter(
            f"'_include' must be {ctx.resource_type}:<parameter>[:<type>]"
        )
    param = ctx.params.get(parts[1])
    targets = param.reference_targets() if param and param.type == "reference" else {}
    served = [t for t in targets if ctx.include_targets(t)]
    if len(parts) == 3:
        served = [t for t in served if t == parts[2]]
    if not served:
        raise InvalidParameter(f"'_include={value}' is not supported")
    # One Include per target type keeps fetching simple.
    return Include(parts[1], served[0]) if len(served) == 1 else Include(parts[1], "*")


def _parse_revinclude(ctx: SearchContext, value: str) -> RevInclude:
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise InvalidParameter("'_revinclude' must be <Type>:<parameter>[:<target type>]")
    param = ctx.revinclude_sources(parts[0], parts[1])
    if (
        param is None
        or ctx.resource_type not in param.reference_targets()
        or (len(parts) == 3 and parts[2] != ctx.resource_type)
    ):
        raise InvalidParameter(f"'_revinclude={value}' is not supported")
    return RevInclude(parts[0], parts[1])


def _sort_ref(ctx: SearchContext, name: str) -> str:
    return ctx.params[name].refs[0]


def _check_policy(ctx: SearchContext, policy: SearchPolicy, used: dict[str, str]) -> None:
    if any(name in used for name in policy.unless_any_of):
        return
    count = len(set(used.values())) if policy.distinct_types else len(used)
    if count < policy.minimum_parameters:
        kinds = "parameters of different types" if policy.distinct_types else "parameters"
        unless = (
            f" unless searching by {' or '.join(policy.unless_any_of)}"
            if policy.unless_any_of
            else ""
        )
        raise InsufficientSearchCriteria(
            f"a {ctx.resource_type} search needs at least {policy.minimum_parameters} "
            f"{kinds}{unless}"
        )


def _check_chain_policies(policies: list[TargetPolicy]) -> None:
    """Each chained-into type's own search policy, on the chained parameters into it through
    one reference (``patient.family`` and ``patient.birthdate`` count together)."""
    groups: dict[tuple[str, str], list[TargetPolicy]] = {}
    for tp in policies:
        groups.setdefault((tp.reference, tp.resource_type), []).append(tp)
    for (_ref, rtype), items in groups.items():
        policy = items[0].policy
        used = {tp.param: tp.param_type for tp in items}
        if any(name in used for name in policy.unless_any_of):
            continue
        count = len(set(used.values())) if policy.distinct_types else len(used)
        if count >= policy.minimum_parameters:
            continue
        head = items[0].written
        kinds = "parameters of different types" if policy.distinct_types else "parameters"
        unless = (f" unless searching by {' or '.join(policy.unless_any_of)}"
                  if policy.unless_any_of else "")
        taken = set(used.values()) if policy.distinct_types else set()
        other = next((n for n, t in items[0].others if n not in used and t not in taken
                      and t != "reference" and n not in policy.unless_any_of), None)
        adds = [f"{head}.{u}" for u in policy.unless_any_of]
        if other is not None:
            adds.append(f"another {head}.<parameter>"
                        + (" of a different type" if policy.distinct_types else "")
                        + f" (e.g. {head}.{other})")
        chained = ", ".join(f"{head}.{n}" for n in used)
        raise InsufficientChainCriteria(
            f"'{chained}': a chained {rtype} search needs at least "
            f"{policy.minimum_parameters} {kinds}{unless}, as a {rtype} search does"
            + (f"; add {' or '.join(adds)}" if adds else ""))


# --- one parameter → criteria -----------------------------------------------------------------


def id_criterion(ctx: SearchContext, modifier: str, raw: str) -> Criterion:
    """``_id=a,b``: the record key is one of them."""
    if modifier:
        raise InvalidParameter("'_id' takes no modifier")
    ids = split_values(raw)
    if not all(ID_RE.match(i) for i in ids):
        raise InvalidParameter("'_id' is not a valid resource id")
    pre = ctx.id_prefix  # one of several sources: only its own ids, without the prefix
    return any_of([_key_equals(ctx, ctx.key_ref, i.removeprefix(pre))
                   for i in ids if i.startswith(pre)])


def param_criterion(
    ctx: SearchContext, name: str, param: SearchParam, modifier: str | None, raw: str
) -> Criterion:
    """One declared parameter's criteria (also a chained parameter's, on its target)."""
    return _criterion(ctx, name, param, modifier, raw)


def _criterion(
    ctx: SearchContext, name: str, param: SearchParam, modifier: str | None, raw: str
) -> Criterion:
    if (
        modifier is not None
        and modifier not in MODIFIERS[param.type]
        and not (param.type == "reference" and modifier in param.reference_targets())
    ):
        raise InvalidParameter(f"'{name}' does not support the modifier ':{modifier}'")
    if modifier == "missing":
        missing = parse_missing(name, raw)
        refs = param.refs[:1] if param.period or param.unit else param.refs
        if missing.missing:
            return all_of([IsNull(r) for r in refs]) or Nothing()
        return any_of([IsNull(r, null=False) for r in refs])
    values = split_values(raw)
    if param.type == "string":
        return any_of([_string(param, parse_string(name, v, modifier)) for v in values])
    if param.type == "token":
        alternatives = [_token(ctx, name, param, parse_token(name, v)) for v in values]
        found = any_of(alternatives)
        if modifier == "not":
            # Null-safe leaves keep NOT two-valued: a resource without the value matches.
            return Not(_null_safe(found))
        return found
    if param.type == "date":
        return any_of([_date(ctx, param, parse_date(name, v, ctx.tz)) for v in values])
    if param.type == "quantity":
        return any_of([_quantity(ctx, name, param, parse_quantity(name, v)) for v in values])
    targets = param.reference_targets()
    restrict = modifier if modifier in targets else None
    out: list[Criterion] = []
    for v in values:
        ref = parse_reference(name, v, tuple(targets))
        if restrict and ref.type not in (None, restrict):
            raise InvalidParameter(f"'{name}:{restrict}' cannot take a {ref.type} reference")
        out.append(_reference(ctx, param.reference_columns(),
                              ReferenceValue(ref.type or restrict, ref.id)))
    return any_of(out)


def _quantity(ctx: SearchContext, name: str, param: SearchParam, q: QuantityValue
              ) -> Criterion:
    """STU3 quantity search: the number by its prefix (``eq``/``ne``/``ap`` over its implicit
    precision range), and the unit by code — as the code map translates the stored unit
    into the system named (UCUM), or, with no system (``number||code``), as stored too."""
    ref = param.refs[0]

    def cmp(op: Literal["<", "<=", ">", ">="], v: Decimal) -> Compare:
        return Compare(ref, op, float(v), numeric=True)

    number: Criterion
    if q.prefix == "eq":
        number = And((cmp(">=", q.low), cmp("<", q.high)))
    elif q.prefix == "ne":
        number = Or((cmp("<", q.low), cmp(">=", q.high)))
    elif q.prefix == "ap":  # STU3 leaves "approximately" to the server: 10%, at least the precision
        margin = max(abs(q.number) / 10, q.high - q.number)
        number = And((cmp(">=", q.number - margin), cmp("<=", q.number + margin)))
    else:
        op = {"gt": ">", "sa": ">", "lt": "<", "eb": "<", "ge": ">=", "le": "<="}[q.prefix]
        number = cmp(op, q.number)  # type: ignore[arg-type]
    if q.code is None:
        return number
    if param.unit is None:
        raise InvalidParameter(f"'{name}' cannot be searched by unit on this server: "
                               "send the number alone")
    cmap = ctx.codemaps.get(param.unit.codemap) if param.unit.codemap else None
    local: set[str] = set()
    if cmap is not None and q.system in (None, cmap.target_system or ""):
        local.update(cmap.local_codes(q.code))
    if q.system is None:
        local.add(q.code)  # the unit as the source writes it
    if not local:
        return Nothing()
    units = tuple(sorted(local))
    unit = In(param.unit.column, units) if len(units) > 1 else Compare(
        param.unit.column, "=", units[0])
    return And((number, unit))


def _null_safe(c: Criterion) -> Criterion:
    """Make every comparison false, not unknown, where its column is empty."""
    if isinstance(c, And | Or):
        return type(c)(tuple(_null_safe(i) for i in c.items))
    if isinstance(c, Not):
        return Not(_null_safe(c.item))
    if isinstance(c, Compare | In | Text):
        return And((IsNull(c.ref, null=False), c))
    return c


def _string(param: SearchParam, value: StringValue) -> Criterion:
    return any_of([Text(ref, value.mode, value.value) for ref in param.refs])


def _key_equals(ctx: SearchContext, ref: str, code: str) -> Criterion:
    try:
        return Compare(ref, "=", ctx.storage(ref).parse_key(code))
    except ValueError:
        return Nothing()


def _token(ctx: SearchContext, name: str, param: SearchParam, value: TokenValue) -> Criterion:
    if param.systems:
        systems = [s for s in param.systems if value.system is None or s.system == value.system]
        out: list[Criterion] = []
        for s in systems:
            only: list[Criterion] = [
                In(ref, tuple(v)) if isinstance(v, list) else Compare(ref, "=", v)
                for ref, v in s.when.items()
            ]
            if value.code is None:
                has: Criterion = IsNull(s.source_ref, null=False)
                if s.codemap:  # "has a code in this system": a local code the map translates
                    cmap = ctx.codemaps[s.codemap]
                    mapped = tuple(cmap.entries)
                    if cmap.unmapped != "default":
                        has = In(s.source_ref, mapped) if mapped else Nothing()
                out.append(all_of([has, *only]) or Nothing())
                continue
            if s.codemap:
                local = ctx.codemaps[s.codemap].local_codes(value.code)
                if local:
                    match = (In(s.source_ref, local) if len(local) > 1
                             else Compare(s.source_ref, "=", local[0]))
                    out.append(all_of([match, *only]) or Nothing())
                continue
            if s.check == "nhs-number" and not nhs_number.is_valid(value.code):
                if value.system == s.system:
                    raise InvalidNHSNumber(
                        f"'{name}' has an NHS number that is not 10 digits with a valid "
                        "check digit"
                    )
                continue  # without a system, it is simply not an NHS number
            out.append(all_of([_key_equals(ctx, s.source_ref, value.code), *only]) or Nothing())
        return any_of(out)
    if param.codemap:
        cmap = ctx.codemaps[param.codemap]
        if value.system is not None and value.system != (cmap.target_system or ""):
            return Nothing()
        if value.code is None:
            return any_of([IsNull(r, null=False) for r in param.refs])
        local = cmap.local_codes(value.code)
        if not local:
            return Nothing()
        return any_of([In(r, local) if len(local) > 1 else Compare(r, "=", local[0])
                       for r in param.refs])
    if value.system is not None and value.system != (param.system or ""):
        return Nothing()
    if value.code is None:
        return any_of([IsNull(r, null=False) for r in param.refs])
    return any_of([_key_equals(ctx, r, value.code) for r in param.refs])


def _reference(ctx: SearchContext, columns: Sequence[RefColumn], value: ReferenceValue
               ) -> Criterion:
    """The columns holding keys of the source the id belongs to (by its prefix), compared
    with the id without it: ``encounter=ae-5`` is ``AEATT_REFNO = 5`` where the parameter has
    an A&E column, and matches nothing where it has none — never the spell numbered 5."""
    out: list[Criterion] = []
    for c in columns:
        if value.type not in (None, c.target) or owner(ctx, c.target, value.id) != c.prefix:
            continue
        out.append(_key_equals(ctx, c.ref, value.id[len(c.prefix):]))
    return any_of(out)


def owner(ctx: SearchContext, target: str, rid: str) -> str:
    """The id prefix of the source of ``target`` that ``rid`` belongs to ("" for none): the
    longest of its sources' prefixes the id starts with."""
    return max((p for p in ctx.id_prefixes(target) if rid.startswith(p)), key=len, default="")


def _date(ctx: SearchContext, param: SearchParam, value: DateValue) -> Criterion:
    """Compare a search range [lo, hi) with a target.

    A stored value t stands for the range [t, t + unit) of its storage's precision (a day, a
    minute). A point target is one stored value; a period target is [start, end + unit), end
    empty while it is ongoing. "Starts before x" is ``t < bound(x)`` (``bound`` rounds up to
    the storage precision); "ends after x" is ``t >= _ends_after(x)``: the two comparisons
    every prefix is made of, exact for discrete stored values even when the search value is
    more precise than the storage (a minute searched against dates of birth).
    """
    lo, hi = _clip(value.low), _clip(value.high)
    p = value.prefix
    if param.period:
        start, end = param.period.start, param.period.end
        s_store, e_store = ctx.storage(start), ctx.storage(end)
        lo, hi = _as_served(s_store, lo, hi)
        sl, sh = s_store.bound(lo), s_store.bound(hi)
        # the least stored end whose unit ends after lo, after hi
        el, eh = _ends_after(e_store, lo), _ends_after(e_store, hi)
        # ongoing: begun and not ended; a record with no period at all matches no range
        ongoing = And((IsNull(start, null=False), IsNull(end)))
        ended = IsNull(end, null=False)
        # start within and end within [lo, hi)
        within = And((Compare(start, ">=", sl), ended, Compare(end, "<", eh)))
        if p == "eq":
            return within
        if p == "ne":
            return Not(within)
        if p == "gt":
            return Or((ongoing, Compare(end, ">=", eh)))
        if p == "ge":
            return Or((ongoing, Compare(end, ">=", eh), within))
        if p == "lt":
            return Compare(start, "<", sl)
        if p == "le":
            return Or((Compare(start, "<", sl), within))
        if p == "sa":
            return Compare(start, ">=", sh)
        if p == "eb":
            return And((ended, Compare(end, "<", el)))
        # ap: overlaps the widened range
        return And((Compare(start, "<", sh), Or((ongoing, Compare(end, ">=", el)))))

    ref = param.refs[0]
    store = ctx.storage(ref)
    lo, hi = _as_served(store, lo, hi)
    if p in ("eq", "ap"):  # [t, t + unit) within [lo, hi)
        return And((Compare(ref, ">=", store.bound(lo)),
                    Compare(ref, "<", _ends_after(store, hi))))
    if p == "ne":
        return Or((Compare(ref, "<", store.bound(lo)),
                   Compare(ref, ">=", _ends_after(store, hi))))
    if p == "gt":  # ends after the value's range
        return Compare(ref, ">=", _ends_after(store, hi))
    if p == "sa":  # starts after it
        return Compare(ref, ">=", store.bound(hi))
    if p == "lt":  # starts before it
        return Compare(ref, "<", store.bound(lo))
    if p == "eb":  # ends before it starts
        return Compare(ref, "<", _ends_after(store, lo))
    # ge: gt, or within; le: lt, or within (bound rounds up, so it keeps the order of times)
    if p == "ge":
        return Compare(ref, ">=", store.bound(min(lo, _last_start(store, hi))))
    return Compare(ref, "<", store.bound(max(lo, _last_start(store, hi))))


def matches_exactly(resource: dict[str, Any], exact: list[tuple[str, ...]]) -> bool:
    """Whether the resource carries, for every ``:exact`` parameter, one of its values exactly.

    STU3 ``:exact`` is case- and accent-sensitive. The backend finds the values equal when
    case and accents are ignored (its column may hold ``SMITH`` for a served ``Smith``);
    this keeps those whose served values hold the searched value as it was sent.
    """
    if not exact:
        return True
    served: set[str] = set()
    _strings(resource, served)
    return all(any(v in served for v in values) for values in exact)


def _strings(node: Any, out: set[str]) -> None:
    if isinstance(node, str):
        out.add(node)
    elif isinstance(node, dict):
        for v in node.values():
            _strings(v, out)
    elif isinstance(node, list):
        for v in node:
            _strings(v, out)


_TICK = dt.timedelta(microseconds=1)


def _as_served(store: Storage, lo: dt.datetime, hi: dt.datetime
               ) -> tuple[dt.datetime, dt.datetime]:
    """A search value more precise than the storage, on one of its stored values, as that value.

    A minute-precision column is served with ``:00`` seconds (FHIR dateTime needs them), so a
    client searching with the exact value it was given (``eq2020-03-01T10:30:00``) asks for a
    second the stored minute only partly covers; it means the minute. Values between stored
    values keep their own precision (``10:30:20`` still finds nothing stored at 10:30).
    """
    unit = store.unit
    if unit is None or hi - lo >= unit or _ceil_to(lo, unit) != lo:
        return lo, hi
    return lo, _clip(lo + unit)


def _ceil_to(t: dt.datetime, unit: dt.timedelta) -> dt.datetime:
    rem = (t - dt.datetime(1, 1, 1)) % unit
    return t if not rem else t + (unit - rem)


def _last_start(store: Storage, x: dt.datetime) -> dt.datetime:
    """A time whose rounding up is the least stored value whose range ends after ``x``."""
    return x if store.unit is None else _clip(x - store.unit + _TICK)


def _ends_after(store: Storage, x: dt.datetime) -> Any:
    """The least stored value t whose range [t, t + unit) ends after ``x``."""
    return store.bound(_last_start(store, x))


def _clip(t: dt.datetime) -> dt.datetime:
    # Keep bounds inside what strftime can print for four-digit years.
    return max(min(t, dt.datetime(9999, 12, 31, 23, 59)), dt.datetime(1000, 1, 1))


__all__ = [
    "FORMAT_PARAMETERS",
    "RESULT_PARAMETERS",
    "Chained",
    "Include",
    "MissingValue",
    "RevInclude",
    "SearchContext",
    "SearchPlan",
    "id_criterion",
    "matches_exactly",
    "param_criterion",
    "plan_search",
]
