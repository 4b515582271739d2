"""Patient-compartment enforcement for tokens that only hold SMART ``patient/`` scopes.

When the request's principal is patient-restricted (``Principal.patient_restricted``), every
request is confined to the token's ``patient`` claim, in two independent places:

1. **In the query.** Every query a provider sends to its backend (search, count, read,
   ``read_many`` for ``_include``, the ``_revinclude`` sub-searches, the conditional-create
   probe, the ``$validate`` read) is ANDed with the compartment criterion: the Patient key
   equals the patient, or the patient reference column equals the patient. The criterion is
   added at the provider's backend choke points (``Provider._fetch`` / ``_count``), so no
   handler can forget it. For SQL it becomes a bound predicate; for HL7 v2 a QPD-3 pair
   (``@PID.3.1^<patient>`` with ``@PID.3.5^PI``).
2. **On every resource built for the response** (``Provider.resource``): a Patient must have
   the patient's id; any other compartment resource must carry the patient in its link column
   (record) AND reference ``Patient/<patient>`` in the element the mapping emits for it. A
   resource that fails means the query predicate did not hold (a mapping or backend fault):
   the request fails closed with 500 ``COMPARTMENT_VIOLATION`` and a security warning is
   logged (no ids in the application log; the audit record has them).

Which element links a type to a patient comes from the mapping: Patient is linked by its own
key; another type by every ``reference`` search parameter that targets Patient (Encounter
``patient``/``subject`` → ``s.PATNT_REFNO``). A type with no such parameter (Practitioner,
Organization, Location) is not patient data and is not restricted: a ``patient/`` scope that
names it (or ``patient/*``) reads it like any other scope (authorisation decides that). A
type whose output references a Patient but that declares no Patient search parameter cannot
be restricted in the query, so patient-restricted tokens are refused on it (403).

Other decisions: a read of another patient's resource is 404 (the backend query simply finds
nothing: indistinguishable from a missing resource, so existence is not confirmed). Paging
links carry the compartment in their fingerprint (``fingerprint_pairs``), so a link minted
for one patient is a 400 for any other token. Writes: a patient-restricted token cannot
create a Patient and can update only its own; any other compartment resource it writes must
refer to its patient (403 otherwise). A patient-restricted token without a ``patient`` claim
is refused on compartment types (403).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from adapters.base import (
    And,
    Compare,
    Count,
    Criterion,
    In,
    Nothing,
    Query,
    Write,
    all_of,
    any_of,
)
from gateway.auth.principal import get_principal
from gateway.errors import GatewayError
from gateway.errors import InternalError as _InternalError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from gateway.mapping.loader import CompiledMapping
    from gateway.mapping.model import SearchParam

security_log = structlog.get_logger("gateway.security")

PATIENT = "Patient"
_STATE_KEY = "compartment"


class CompartmentForbidden(GatewayError):
    """The request cannot be confined to the token's patient (→ 403)."""

    status = 403
    issue_code = "forbidden"
    error_code = "COMPARTMENT_FORBIDDEN"


class CompartmentViolation(_InternalError):
    """A resource outside the patient's compartment reached the response (→ 500)."""

    error_code = "COMPARTMENT_VIOLATION"


# --- how each resource type links to a patient ------------------------------------------------


class Source(Protocol):
    """What this module (and the audit trail) reads of one source's provider: a protocol, so
    neither imports gateway.providers (which calls both on every backend query)."""

    resource_type: str
    key: str
    params: dict[str, SearchParam]
    mapping: CompiledMapping
    compartment_link: Link | None

    def reference_values(self, rec: Any, ref: str) -> Iterator[str]: ...


Provider = Source


@dataclass(frozen=True)
class Link:
    kind: str
    """``self`` (Patient: its own key), ``reference`` (a Patient reference column), ``none``
    (not patient data) or ``unrestrictable`` (references a Patient, but cannot be queried)."""
    refs: tuple[str, ...] = ()
    """Source references holding the patient key (the key itself for ``self``)."""
    paths: tuple[tuple[str, ...], ...] = ()
    """Element paths of the resource's Patient references (``("subject", "reference")``)."""


def link(provider: Provider) -> Link:
    # Kept on the provider: asked for every resource served (a weak-keyed dict cost ~1 µs).
    found = provider.compartment_link
    if found is None:
        found = provider.compartment_link = _link(provider)
    return found


def _link(provider: Provider) -> Link:
    if provider.resource_type == PATIENT:
        return Link("self", (provider.key,))
    refs = tuple(dict.fromkeys(  # a Patient reference is never prefixed (the loader checks)
        c.ref for p in provider.params.values() if p.type == "reference"
        for c in p.reference_columns() if c.target == PATIENT
    ))
    paths = tuple(dict.fromkeys(
        _path(path) for path, target, _child in provider.mapping.references if target == PATIENT
    ))
    if refs:
        return Link("reference", refs, paths)
    if paths:
        return Link("unrestrictable", (), paths)
    return Link("none")


def _path(text: str) -> tuple[str, ...]:
    """``participant[0].individual.reference`` → ("participant", "individual", "reference").
    List positions are ignored: every repetition is looked at."""
    return tuple(part.split("[", 1)[0] for part in text.split("."))


def _values(node: Any, path: tuple[str, ...]) -> list[Any]:
    """The values at ``path``, every repetition of a list looked at (document order). An
    explicit stack: asked of every resource a record access serves (audit), where a
    recursive generator cost more than the lookups themselves; and first a plain descent,
    for the usual path through dicts only (``subject.reference``)."""
    n = node
    for key in path:
        if n.__class__ is not dict:
            break  # a list (or nothing) on the way: the walk below
        if key not in n:
            return []
        n = n[key]
    else:
        return [n]
    out: list[Any] = []
    stack = [(node, 0)]
    end = len(path)
    while stack:
        n, i = stack.pop()
        if i == end:
            out.append(n)
        elif isinstance(n, list):
            stack.extend((item, i) for item in reversed(n))
        elif isinstance(n, dict) and path[i] in n:
            stack.append((n[path[i]], i + 1))
    return out


# --- the restriction of the current request ---------------------------------------------------


@dataclass(frozen=True)
class Restriction:
    patient: str | None
    """The token's patient (None: patient-restricted but no patient claim → refuse)."""


_scope: ContextVar[MutableMapping[str, Any] | None] = ContextVar("compartment_scope",
                                                                 default=None)


@contextlib.contextmanager
def confined_to(scope: MutableMapping[str, Any]) -> Iterator[None]:
    """Work done outside a request for it (the asynchronous messaging worker) is confined as
    the request was: ``scope`` carries its principal (gateway.audit.caller)."""
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def current() -> Restriction | None:
    """The restriction of the request being served, or None (not patient-restricted)."""
    scope = _scope.get()
    if scope is None:
        return None
    state = scope.get("state")
    if not isinstance(state, dict):
        return None
    cached = state.get(_STATE_KEY)
    if isinstance(cached, Restriction):
        return cached
    if cached is False:
        return None
    principal = get_principal(scope)
    if principal is None:  # not (yet) authenticated: nothing to confine to; not cached
        return None
    if not principal.patient_restricted:
        state[_STATE_KEY] = False
        return None
    restriction = Restriction(principal.patient or None)
    state[_STATE_KEY] = restriction
    return restriction


class CompartmentLayer:
    """Makes the request (and the principal authentication puts on it) visible to providers.

    The principal is read when the first backend query is made, so this layer may sit
    anywhere outside the routes, before or after authentication.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        token = _scope.set(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            _scope.reset(token)


def fingerprint_pairs() -> list[tuple[str, str]]:
    """Extra query identity for paging links: the compartment the search ran in."""
    r = current()
    if r is None:
        return []
    return [("_compartment", f"Patient/{r.patient or ''}")]


def _criterion(provider: Provider, r: Restriction) -> Criterion | None:
    lk = link(provider)
    if lk.kind == "none":
        return None
    if lk.kind == "unrestrictable":
        raise CompartmentForbidden(
            f"{provider.resource_type} cannot be limited to one patient by this server, so "
            "patient-restricted access to it is refused")
    if r.patient is None:
        raise CompartmentForbidden("the token has patient/ scopes but no patient context")
    out: list[Criterion] = []
    for ref in lk.refs:
        try:
            out.append(Compare(ref, "=", provider.mapping.storage(ref).parse_key(r.patient)))
        except ValueError:  # a patient id that cannot exist in this column: nothing matches
            out.append(Nothing())
    return any_of(out)


def restrict(criteria: Criterion | None, extra: Criterion) -> Criterion:
    """``criteria AND extra``, folding what the top level already says about extra's column.

    When ``extra`` is ``ref = v`` and the criteria already hold ``ref = v`` (or ``ref IN (...
    v ...)``), the condition is not repeated, so a Patient read stays a key lookup (HL7 v2
    Q21). A different value is a contradiction: nothing matches, and no query is sent. The
    patient link is single-valued (a resource belongs to one patient), so this is exact.
    """
    if criteria is None:
        return extra
    if isinstance(extra, Nothing) or isinstance(criteria, Nothing):
        return Nothing()
    leaves = list(criteria.items) if isinstance(criteria, And) else [criteria]
    if not isinstance(extra, Compare):
        return And((*leaves, extra))
    out: list[Criterion] = []
    satisfied = False
    for leaf in leaves:
        if isinstance(leaf, Compare) and leaf.ref == extra.ref and leaf.op == "=":
            if leaf.value != extra.value:
                return Nothing()
            if satisfied:
                continue
            satisfied = True
        elif isinstance(leaf, In) and leaf.ref == extra.ref:
            if extra.value not in leaf.values:
                return Nothing()
            if satisfied:
                continue
            leaf, satisfied = extra, True
        out.append(leaf)
    if not satisfied:
        out.append(extra)
    result = all_of(out)
    assert result is not None
    return result


def restrict_query(provider: Provider, query: Query) -> Query:
    r = current()
    if r is None:
        return query
    extra = _criterion(provider, r)
    if extra is None:
        return query
    return dataclasses.replace(query, criteria=restrict(query.criteria, extra))


def restrict_count(provider: Provider, query: Count) -> Count:
    r = current()
    if r is None:
        return query
    extra = _criterion(provider, r)
    if extra is None:
        return query
    return Count(restrict(query.criteria, extra))


def _holds(provider: Provider, record: Any, patient: str, refs: tuple[str, ...]
           ) -> bool:
    for ref in refs:
        try:
            key: Any = provider.mapping.storage(ref).parse_key(patient)
        except ValueError:
            key = patient
        for value in provider.reference_values(record, ref):
            if value == str(key) or value == patient:
                return True
    return False


def check_resources(provider: Provider, records: Sequence[Any],
                    resources: Sequence[dict[str, Any]]) -> None:
    """:func:`check_resource` for each (record, resource); nothing to do, once, when the
    request is not patient-restricted."""
    if current() is None:
        return
    for record, resource in zip(records, resources, strict=True):
        check_resource(provider, record, resource)


def check_resource(provider: Provider, record: Any, resource: dict[str, Any]
                   ) -> None:
    """Fail the request if a resource outside the compartment is about to be served."""
    r = current()
    if r is None:
        return
    lk = link(provider)
    if lk.kind == "none":
        return
    if lk.kind == "self":
        ok = r.patient is not None and resource.get("id") == r.patient
    elif lk.kind == "reference" and r.patient is not None:
        wanted = f"{PATIENT}/{r.patient}"
        ok = _holds(provider, record, r.patient, lk.refs) and (
            not lk.paths
            or any(v == wanted for path in lk.paths for v in _values(resource, path))
        )
    else:
        ok = False
    if not ok:
        # No ids here: the application log carries no patient identifiers (audit has them).
        security_log.warning("compartment_violation", resource_type=provider.resource_type,
                             hint="a backend returned a resource outside the token's patient "
                                  "compartment; check the mapping's patient reference")
        raise CompartmentViolation("the response was withheld by a security check")


def check_write(provider: Provider, write: Write) -> None:
    """A patient-restricted token writes only its own patient's data (403 otherwise)."""
    r = current()
    if r is None:
        return
    lk = link(provider)
    if lk.kind == "none":
        return
    _criterion(provider, r)  # refuses unrestrictable types and a missing patient claim
    assert r.patient is not None
    if lk.kind == "self":
        if write.interaction == "create":
            raise CompartmentForbidden("a patient-restricted token cannot create a Patient")
        if write.id != r.patient:
            raise CompartmentForbidden("a patient-restricted token can only update its own "
                                       "Patient")
        return
    pairs = [(ref, v) for ref in lk.refs for v in provider.reference_values(write.record, ref)]
    if not pairs or not all(_holds(provider, {ref: v}, r.patient, (ref,)) for ref, v in pairs):
        raise CompartmentForbidden(f"the {provider.resource_type} must refer to the token's "
                                   "patient")
