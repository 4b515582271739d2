"""The authenticated caller and the SMART on FHIR scopes it holds.

This module is the contract between authentication (which builds a ``Principal``) and
everything that depends on who is calling: authorisation, patient-compartment enforcement,
audit and limits. It has no dependencies beyond the standard library.

Scope grammar (SMART App Launch v1 and v2)::

    scope      = context "/" resource "." permission
    context    = "patient" | "user" | "system"
    resource   = "*" | FHIR resource type (e.g. "Patient")
    permission = v1: "read" | "write" | "*"
               | v2: one or more of "c" "r" "u" "d" "s", in that order, no repeats

v1 ``read`` means ``{r, s}``, v1 ``write`` means ``{c, u, d}`` and v1 ``*`` means all five.
Anything else (``openid``, ``fhirUser``, ``launch/patient``, ``offline_access``, typos,
unknown contexts, lower-case resource names, ``.rr``, ``.sr``...) is ignored: an
unrecognised scope never grants anything.

**v2 query parameters** (``patient/Observation.rs?category=laboratory``) narrow a scope to
matching resources. The gateway does not evaluate them, so a scope carrying a ``?`` query is
dropped entirely (it grants nothing) rather than being widened to the whole resource type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

PRINCIPAL_SCOPE_KEY = "principal"
"""Key of the principal in the ASGI ``scope["state"]`` (``request.state.principal``)."""

Context = Literal["patient", "user", "system"]
AuthMode = Literal["jwt", "api-key", "mtls", "insecure-demo"]

PERMISSIONS: frozenset[str] = frozenset("cruds")
_V2_ORDER = "cruds"
_V1 = {
    "read": frozenset("rs"),
    "write": frozenset("cud"),
    "*": PERMISSIONS,
}
_SCOPE_RE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<resource>\*|[A-Z][A-Za-z]{0,63})\.(?P<perm>[a-z*]+)$"
)


@dataclass(frozen=True)
class Scope:
    context: Context
    resource: str
    """``"*"`` or a FHIR resource type."""
    permissions: frozenset[str]
    """A non-empty subset of ``{"c", "r", "u", "d", "s"}``."""

    def grants(self, resource_type: str, permission: str) -> bool:
        return (self.resource in ("*", resource_type)) and permission in self.permissions

    def __str__(self) -> str:
        perms = "".join(p for p in _V2_ORDER if p in self.permissions)
        return f"{self.context}/{self.resource}.{perms}"


def _parse_permissions(text: str) -> frozenset[str] | None:
    if text in _V1:
        return _V1[text]
    # v2: a non-empty, strictly ordered subsequence of "cruds".
    position = 0
    for char in text:
        index = _V2_ORDER.find(char, position)
        if index < 0:
            return None
        position = index + 1
    return frozenset(text) if text else None


def parse_scope(token: str) -> Scope | None:
    """One scope string → ``Scope``, or None when it is not a valid resource scope."""
    if "?" in token:  # v2 query-narrowed scope: not evaluated, so never granted (see module doc)
        return None
    match = _SCOPE_RE.match(token)
    if match is None:
        return None
    permissions = _parse_permissions(match["perm"])
    if not permissions:
        return None
    context: Context = match["context"]  # type: ignore[assignment]
    return Scope(context, match["resource"], permissions)


def parse_scopes(text: str | Iterable[str]) -> tuple[Scope, ...]:
    """A space-separated scope string (or a list of scope strings, as in a ``scp`` claim).

    Invalid or unknown scopes are ignored; the result never grants more than the input.
    Duplicates are removed, order is kept.
    """
    items = text.split() if isinstance(text, str) else [
        part for item in text if isinstance(item, str) for part in item.split()
    ]
    result: dict[Scope, None] = {}
    for item in items:
        scope = parse_scope(item)
        if scope is not None:
            result[scope] = None
    return tuple(result)


@dataclass(frozen=True)
class Principal:
    client_id: str
    """The OAuth client / API-key owner / mTLS certificate subject."""
    subject: str | None
    """The end user (``sub`` of a user token), or None for an application-only credential."""
    role: str | None
    scopes: tuple[Scope, ...]
    patient: str | None
    """The SMART ``patient`` launch-context claim (a Patient logical id)."""
    mode: AuthMode

    def allows(self, resource_type: str, permission: str) -> bool:
        """True when some scope grants ``permission`` (one of c r u d s) on the type."""
        return any(s.grants(resource_type, permission) for s in self.scopes)

    def patient_restricted_for(self, resource_type: str, permission: str) -> bool:
        """True when ``permission`` on ``resource_type`` is granted ONLY by patient/ scopes.

        This is the precise question for compartment enforcement on one interaction.
        """
        granted_by_patient = False
        for s in self.scopes:
            if s.grants(resource_type, permission):
                if s.context != "patient":
                    return False
                granted_by_patient = True
        return granted_by_patient

    @cached_property  # asked on every request (compartment, audit); the principal is immutable
    def patient_restricted(self) -> bool:
        """True when some access is granted only through patient/ scopes.

        A token whose patient/ scopes are all covered by user/ or system/ scopes is not
        restricted; a mixed token (``patient/*.read user/Practitioner.read``) is, because
        reading a Patient is granted only by the patient/ scope. This errs towards
        restriction; ``patient_restricted_for`` answers per resource type and permission.
        """
        wider = [s for s in self.scopes if s.context != "patient"]
        for s in self.scopes:
            if s.context != "patient":
                continue
            for perm in s.permissions:
                if not any(w.permissions >= {perm} and w.resource in ("*", s.resource)
                           for w in wider):
                    return True
        return False

    @cached_property  # in every audit record; a principal is immutable (and often reused)
    def scope_text(self) -> str:
        return " ".join(str(s) for s in self.scopes)


def get_principal(scope_or_state: Mapping[str, Any] | Any) -> Principal | None:
    """The principal of a request: pass an ASGI scope, a ``Request`` or ``request.state``."""
    state: Any = scope_or_state
    if type(scope_or_state) is dict:  # an ASGI scope, the common case: no ABC checks
        state = scope_or_state.get("state")
        if type(state) is dict:
            value = state.get(PRINCIPAL_SCOPE_KEY)
            return value if isinstance(value, Principal) else None
    if isinstance(scope_or_state, Mapping):
        state = scope_or_state.get("state") or {}
        value = state.get(PRINCIPAL_SCOPE_KEY) if isinstance(state, Mapping) else None
        return value if isinstance(value, Principal) else None
    state = getattr(scope_or_state, "state", scope_or_state)
    value = getattr(state, PRINCIPAL_SCOPE_KEY, None)
    return value if isinstance(value, Principal) else None
