"""Subscription criteria: ``Type?param=value&...`` over the resources an ADT event maps to.

A deliberately small language: the criteria are evaluated on the resources the gateway
built (not sent to a backend), so only parameters with an obvious meaning on the resource
are accepted, and anything else is refused when the Subscription is created (never a
criteria that silently matches nothing or everything).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from gateway.errors import InvalidParameter

# type -> parameter -> how it reads the resource
SUPPORTED: dict[str, dict[str, str]] = {
    "Patient": {"_id": "id", "identifier": "identifier"},
    "Encounter": {"_id": "id", "identifier": "identifier", "patient": "subject",
                  "subject": "subject", "status": "code:status", "class": "coding:class"},
}


@dataclass(frozen=True)
class Criteria:
    resource_type: str
    params: tuple[tuple[str, tuple[str, ...]], ...]
    """AND of parameters, each an OR of values (FHIR's comma)."""

    def matches(self, resource: dict[str, Any]) -> bool:
        if resource.get("resourceType") != self.resource_type:
            return False
        how = SUPPORTED[self.resource_type]
        return all(any(_match(how[name], resource, v) for v in values)
                   for name, values in self.params)

    def patient_ids(self) -> set[str]:
        return {v.removeprefix("Patient/") for name, values in self.params
                if name in ("patient", "subject") for v in values}


def parse(text: str) -> Criteria:
    rtype, _, query = text.strip().partition("?")
    if rtype not in SUPPORTED:
        raise InvalidParameter(f"Subscription.criteria: notifications are available for "
                               f"{', '.join(sorted(SUPPORTED))} only",
                               expression="Subscription.criteria")
    params: list[tuple[str, tuple[str, ...]]] = []
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidParameter("Subscription.criteria is not a search query",
                               expression="Subscription.criteria") from None
    for name, value in pairs:
        if name not in SUPPORTED[rtype]:
            raise InvalidParameter(
                f"Subscription.criteria: {rtype} notifications can filter on "
                f"{', '.join(sorted(SUPPORTED[rtype]))}", expression="Subscription.criteria")
        values = tuple(v for v in value.split(",") if v)
        if not values:
            raise InvalidParameter(f"Subscription.criteria: {name} has no value",
                                   expression="Subscription.criteria")
        params.append((name, values))
    return Criteria(rtype, tuple(params))


def _match(how: str, resource: dict[str, Any], value: str) -> bool:
    if how == "id":
        return resource.get("id") == value
    if how == "identifier":
        system, bar, code = value.rpartition("|")
        for ident in resource.get("identifier") or []:
            if ident.get("value") != code:
                continue
            if not bar or ident.get("system") == system:
                return True
        return False
    if how == "subject":
        ref = (resource.get("subject") or {}).get("reference")
        return ref in (value, f"Patient/{value}")
    if how.startswith("code:"):
        return resource.get(how[5:]) == value.rpartition("|")[2]
    if how.startswith("coding:"):
        coding = resource.get(how[7:]) or {}
        system, bar, code = value.rpartition("|")
        return coding.get("code") == code and (not bar or coding.get("system") == system)
    return False
