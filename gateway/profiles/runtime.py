"""Optional response validation (``CCG_VALIDATE_RESPONSES=true``): every resource the
gateway builds is validated against its provider's profile; each error or warning is logged
(resource type, id, issue expression and code — never a value) and counted. Responses are
never changed: a non-conformant resource is still served, and the log says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from gateway.profiles.validator import Profiles, load_profiles, validate
from gateway.providers import Provider
from gateway.registry import Registry

log = structlog.get_logger("gateway.profiles")


class ResponseValidation:
    def __init__(self, profiles: Profiles | None = None) -> None:
        self.profiles = profiles or load_profiles()
        self.resources = 0
        self.counts: Counter[tuple[str, str, str]] = Counter()
        """(resource type, severity, issue code) → issues seen."""

    def check(self, resource: dict[str, Any], profile: str) -> None:
        self.resources += 1
        try:
            issues = validate(resource, profile, self.profiles)
        except Exception:  # validation must never break serving
            log.exception("response_validation_failed", resource_type=resource.get("resourceType"))
            return
        for issue in issues:
            if issue.severity == "information":
                continue
            rtype = str(resource.get("resourceType"))
            self.counts[(rtype, issue.severity, issue.code)] += 1
            log.warning("response_not_conformant", resource_type=rtype, id=resource.get("id"),
                        severity=issue.severity, code=issue.code, expression=issue.expression)

    def wrap(self, provider: Provider) -> None:
        build: Callable[[dict[str, Any]], dict[str, Any]] = provider.resource
        profile = provider.profile

        def resource(rec: dict[str, Any]) -> dict[str, Any]:
            out = build(rec)
            self.check(out, profile)
            return out

        setattr(provider, "resource", resource)  # noqa: B010 (an instance attribute, on purpose)
        build_many: Callable[[Sequence[Any]], list[dict[str, Any]]] | None = getattr(
            provider, "resources", None)
        if build_many is None:
            return

        def resources(recs: Sequence[Any]) -> list[dict[str, Any]]:  # the batch path too
            assert build_many is not None
            out = build_many(recs)
            for r in out:
                self.check(r, profile)
            return out

        setattr(provider, "resources", resources)  # noqa: B010


def install(registry: Registry, profiles: Profiles | None = None) -> ResponseValidation:
    """Validate what every provider in ``registry`` builds from now on."""
    rv = ResponseValidation(profiles)
    for provider in registry.sources():
        rv.wrap(provider)
    return rv
