"""The CapabilityStatement, generated from what is registered and mapped — never hand-written.

Each resource lists the interactions its provider serves, the search parameters its mapping
declares (for a type with several sources: those every source declares), the ``_include``
values whose target type is served, and the ``_revinclude`` values that other providers'
reference parameters make possible; a reference parameter's documentation lists the chains
it takes and the resource's the ``_has`` it answers (STU3 CapabilityStatement has no element
for either); the operations come from the operation registry. Nothing else is claimed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from gateway.binary import binary_capability
from gateway.chain import (
    MAX_CHAIN_MATCHES,
    MAX_HAS_RECORDS,
    chain_joined,
    chain_names,
    has_names,
)
from gateway.operations import OperationRegistry
from gateway.registry import Registry, TypeProvider

FHIR_VERSION = "3.0.2"
FORMATS = ["application/fhir+json", "application/fhir+xml", "json", "xml"]


def _software_version() -> str:
    try:
        return version("careconnect-gateway")
    except PackageNotFoundError:
        return "0+unknown"


def resource_capability(provider: TypeProvider, registry: Registry) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "_id", "type": "token", "documentation": "The logical id of the resource"}
    ]
    includes: list[str] = []
    for name, p in sorted(provider.params.items()):
        entry: dict[str, Any] = {"name": name, "type": p.type}
        # Several sources: each one's description, once (they say what the value means there).
        described = dict.fromkeys(d for s in provider.sources
                                  if (d := s.params[name].description))
        doc = "; ".join(described)
        chains = chain_names(registry, provider, name) if p.type == "reference" else []
        if chains:  # STU3 has no chain element here (SearchParameter.chain is not served)
            doc += (". " if doc else "") + "Chains (one level): " + ", ".join(chains)
            if not chain_joined(registry, provider, name):
                doc += (f" (resolved through a search of the target, at most "
                        f"{MAX_CHAIN_MATCHES} matches)")
            for t in p.reference_targets():
                rule = registry.get(t).policy if t in registry else None
                if rule is not None and rule.minimum_parameters > 1 and rule.chains:
                    doc += (f". A chain into {t} follows {t}'s own rule: at least "
                            f"{rule.minimum_parameters} chained parameters"
                            + (" of different types" if rule.distinct_types else "")
                            + (f" unless by {' or '.join(rule.unless_any_of)}"
                               if rule.unless_any_of else ""))
        if doc:
            entry["documentation"] = doc
        params.append(entry)
        if p.type == "reference":
            served = [t for t in p.reference_targets() if t in registry]
            includes += [f"{provider.resource_type}:{name}" for _ in served[:1]]
            if len(served) > 1:
                includes += [f"{provider.resource_type}:{name}:{t}" for t in served]
    revincludes = [
        f"{other.resource_type}:{name}"
        for other in registry
        for name, p in sorted(other.params.items())
        if p.type == "reference" and provider.resource_type in p.reference_targets()
    ]
    out: dict[str, Any] = {
        "type": provider.resource_type,
        "profile": {"reference": provider.profile},
        "interaction": [{"code": c} for c in ("read", "search-type", "create", "update")
                        if c in provider.interactions],
        "versioning": "no-version",
        "readHistory": False,
        "updateCreate": False,
        "conditionalCreate": "create" in provider.interactions,
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": params,
    }
    sortable = provider.sortable
    policy = provider.policy
    notes = []
    if sortable:
        notes.append("_sort supports: " + ", ".join(sortable) + " (prefix - for descending)")
    if policy and policy.minimum_parameters > 1:
        notes.append(
            f"A search needs at least {policy.minimum_parameters} parameters"
            + (" of different types" if policy.distinct_types else "")
            + (f" unless searching by {' or '.join(policy.unless_any_of)}"
               if policy.unless_any_of else "")
        )
    has = has_names(registry, provider)
    if has:
        notes.append("_has supports: " + ", ".join(
            f"_has:{h}:<parameter>" + ("" if joined else
                                        f" (through a search, at most {MAX_CHAIN_MATCHES}"
                                        f" ids from at most {MAX_HAS_RECORDS} records)")
            for h, joined in has) + " (one level)")
    if notes:
        out["documentation"] = ". ".join(notes) + "."
    if includes:
        out["searchInclude"] = includes
    if revincludes:
        out["searchRevInclude"] = revincludes
    return out


def operation_capability(operations: OperationRegistry | None, base_url: str
                         ) -> list[dict[str, Any]]:
    """Every registered operation, by name, with its OperationDefinition."""
    return [{"name": op.name, "definition": {"reference": op.definition_reference(base_url)}}
            for op in operations or ()]


def capability_statement(registry: Registry, base_url: str,
                         operations: OperationRegistry | None = None,
                         extra: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """``extra``: resource entries served outside the registry (the ADT feed's Subscription)."""
    out = _statement(registry, base_url, operations, extra)
    # FHIR messaging: the events the messaging declaration routes (gateway.messaging)
    messaging = [op.messaging_capability(base_url) for op in operations or ()
                 if hasattr(op, "messaging_capability")]
    if messaging:
        out["messaging"] = messaging
    return out


def _statement(registry: Registry, base_url: str, operations: OperationRegistry | None,
               extra: Iterable[dict[str, Any]]) -> dict[str, Any]:
    resources = [resource_capability(p, registry) for p in registry]
    resources += [t.capability() for t in registry.terminology_providers()]
    binary = binary_capability(registry)  # not a provider: gateway.binary serves it
    if binary is not None:
        resources = [*resources, binary]
    resources = sorted([*resources, *extra], key=lambda r: str(r["type"]))
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": dt.date.today().isoformat(),
        "publisher": "Care Connect Gateway",
        "kind": "instance",
        "software": {"name": "careconnect-gateway", "version": _software_version()},
        "implementation": {
            "description": "Care Connect API gateway over legacy clinical systems",
            "url": base_url,
        },
        "fhirVersion": FHIR_VERSION,
        "acceptUnknown": "no",
        "format": FORMATS,
        "rest": [
            {
                "mode": "server",
                "resource": resources,
                "operation": operation_capability(operations, base_url),
            }
        ],
    }
