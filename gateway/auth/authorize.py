"""Authorisation: every FHIR interaction checked against the principal's SMART scopes.

Deny by default: a request without a principal is 401, an interaction no scope grants is 403
(``ACCESS_DENIED``). Routes call these helpers once they know the resource type and the
interaction, after what is public anyway (unknown type 404, unsupported method 405):

============================  =================================================
interaction                   permission needed on the resource type
============================  =================================================
read (``GET [type]/[id]``)    ``r``
search (GET/POST, paging)     ``s``
``_include=[type]:[param]``   ``r`` on every type the include can add
``_revinclude=[type]:[p]``    ``s`` on the including (source) type
chained ``p.x``, ``_has``     ``s`` on each type a chain or ``_has`` looks into
create                        ``c`` (conditional create: also ``s``)
update                        ``u``
``[type]/$validate``          any of ``c``, ``u``, ``r`` (touches no stored data)
``[type]/[id]/$validate``     ``r`` (validates, and so discloses, the stored one)
terminology operations        ``r`` on ConceptMap / ValueSet / CodeSystem (not patient data)
============================  =================================================

A search whose ``_include``/``_revinclude`` names a type the principal may not see is refused
(403), not silently trimmed. Create and update return the stored resource only to a principal
that may read the type; otherwise an informational OperationOutcome (the Location header still
names the resource). Patient-compartment filtering for ``patient/`` scopes is not done here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gateway.auth.errors import AccessDenied, AuthenticationRequired, bearer_challenge
from gateway.auth.principal import Principal, get_principal

if TYPE_CHECKING:
    from gateway.plan import SearchPlan
    from gateway.registry import Registry
    from gateway.registry import TypeProvider as Provider

NAMES = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def principal_of(request: Any) -> Principal:
    principal = get_principal(request)
    if principal is None:  # no authentication layer ran: never serve data
        raise AuthenticationRequired()
    return principal


def _deny(principal: Principal, resource_type: str, permissions: Iterable[str]) -> AccessDenied:
    wanted = "/".join(NAMES[p] for p in permissions)
    headers: dict[str, str] = {}
    if principal.mode == "jwt":
        needed = " ".join(f"{c}/{resource_type}.{''.join(permissions)}"
                          for c in ("patient", "user", "system"))
        headers["WWW-Authenticate"] = bearer_challenge("insufficient_scope", None, needed)
    return AccessDenied(f"the client's scopes do not allow {wanted} of {resource_type}",
                        headers=headers)


def admin(request: Any, roles: str) -> Principal | None:
    """The principal, if its role is one of ``roles`` (comma-separated; ``CCG_ADMIN_ROLES``):
    who may ask for diagnostics about the gateway itself (never more data)."""
    principal = get_principal(request)
    if principal is None or not principal.role:
        return None
    allowed = {r.strip() for r in roles.split(",") if r.strip()}
    return principal if principal.role in allowed else None


def require(request: Any, resource_type: str, permission: str) -> Principal:
    principal = principal_of(request)
    if not principal.allows(resource_type, permission):
        raise _deny(principal, resource_type, permission)
    return principal


def require_any(request: Any, resource_type: str, permissions: str) -> Principal:
    principal = principal_of(request)
    if not any(principal.allows(resource_type, p) for p in permissions):
        raise _deny(principal, resource_type, permissions)
    return principal


def include_types(registry: Registry, provider: Provider, plan: SearchPlan
                  ) -> tuple[set[str], set[str]]:
    """Types an ``_include`` may add (need r) and ``_revinclude`` sources (need s)."""
    read: set[str] = set()
    for inc in plan.includes:
        targets = provider.params[inc.param].reference_targets()
        read |= {t for t in targets if inc.target in ("*", t) and t in registry}
    search = {rev.source_type for rev in plan.revincludes} | plan.searched_types
    return read, search


def require_includes(request: Any, registry: Registry, provider: Provider, plan: SearchPlan
                     ) -> None:
    principal = principal_of(request)
    read, search = include_types(registry, provider, plan)
    for rtype in sorted(read):
        if not principal.allows(rtype, "r"):
            raise _deny(principal, rtype, "r")
    for rtype in sorted(search):
        if not principal.allows(rtype, "s"):
            raise _deny(principal, rtype, "s")


def written(request: Any, resource_type: str, resource: dict[str, Any], what: str
            ) -> dict[str, Any]:
    """The body after a create/update: the stored resource only if the client may read it."""
    if principal_of(request).allows(resource_type, "r"):
        return resource
    return {"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational",
        "diagnostics": f"{resource_type} {what}"}]}
