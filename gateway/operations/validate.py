"""The STU3 ``$validate`` operation: ``[type]/$validate`` and ``[type]/[id]/$validate``.

POST takes the resource itself (JSON or XML, read like any write body) or a ``Parameters``
resource with a ``resource`` parameter (and optionally ``profile``). GET on an instance
validates the stored resource as the gateway serves it. The answer is always 200 with an
OperationOutcome listing the issues, or one "All OK" information issue when there are none.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from gateway import writes
from gateway.auth import authorize
from gateway.errors import MethodNotAllowed, NotFound
from gateway.operations.base import Context, Invocation, Operation, Parameter
from gateway.operations.params import parameter_list
from gateway.profiles.validator import Issue, load_profiles, validate

DEFINITION = "http://hl7.org/fhir/OperationDefinition/Resource-validate"


def outcome(issues: list[Issue]) -> dict[str, Any]:
    if not issues:
        return {"resourceType": "OperationOutcome", "issue": [
            {"severity": "information", "code": "informational", "diagnostics": "All OK"}]}
    return {"resourceType": "OperationOutcome", "issue": [i.outcome_issue() for i in issues]}


def _from_parameters(body: dict[str, Any]) -> tuple[Any, str | None]:
    resource: Any = None
    profile: str | None = None
    for param in parameter_list(body):
        if not isinstance(param, dict):
            continue
        if param.get("name") == "resource":
            resource = param.get("resource")
        elif param.get("name") == "profile":
            # uri in STU3; a client written for R4 sends canonical: either names the profile
            values = [v for k, v in param.items() if k.startswith("value")]
            profile = values[0] if len(values) == 1 and isinstance(values[0], str) else ""
    return resource, profile


def _known(resource_type: str) -> list[str]:
    """The profiles this server holds for a resource type."""
    return [url for url, info in load_profiles().info.items()
            if info.type == resource_type and url in load_profiles()]


class Validate(Operation):
    name = "validate"
    levels = frozenset({"type", "instance"})
    parameters = (
        Parameter("resource", "Resource", documentation="The resource to validate"),
        Parameter("profile", "uri", documentation="A profile to validate against"),
        Parameter("return", "OperationOutcome", use="out", min=1),
    )
    scopes = ("instance: read of the type (the stored resource is disclosed); type: any of "
              "create, update or read of the type (nothing stored is touched)")
    definition_url = DEFINITION

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request, provider, rid = call.request, call.provider, call.rid
        assert provider is not None
        fmt = ctx.fmt(request)
        instance = call.level == "instance"
        allowed = ("GET", "POST") if instance else ("POST",)
        if request.method not in allowed:
            raise MethodNotAllowed("$validate supports " + " and ".join(allowed),
                                   headers={"Allow": ", ".join(allowed)})
        rtype = provider.resource_type
        # Instance: reads (and so discloses) the stored one. Type: no stored data is touched.
        authorize.require_any(request, rtype, "r" if instance else "cur")
        issues: list[Issue] = []
        profile: str | None = provider.profile
        asked_in_url = request.query_params.getlist("profile")
        if asked_in_url:  # [type]/$validate?profile=... (the operation's IN parameter)
            profile = asked_in_url[-1]
        if request.method == "GET":
            assert rid is not None
            resource: Any = await provider.read(rid)
            if resource is None:
                raise NotFound(f"{rtype} with that id was not found")
        else:
            resource = await writes.read_body(request)
            if resource.get("resourceType") == "Parameters":
                resource, asked = _from_parameters(resource)
                if asked is not None:
                    profile = asked
                if not isinstance(resource, dict):
                    issues.append(Issue("error", "required",
                                        "the Parameters need a 'resource' parameter",
                                        "Parameters.parameter"))
                    return ctx.respond(outcome(issues), fmt)
            if resource.get("resourceType") != rtype:
                issues.append(Issue("error", "invalid", f"the resource must be a {rtype}",
                                    f"{rtype}.resourceType"))
                return ctx.respond(outcome(issues), fmt)
            if rid is not None and "id" in resource and resource["id"] != rid:
                issues.append(Issue("error", "invalid",
                                    "the resource id must match the id in the URL", f"{rtype}.id"))
        if profile is not None and (not profile or profile not in load_profiles()):
            # never "All OK" against a profile that was not checked at all
            issues.append(Issue("error", "not-supported",
                                f"unknown profile {profile[:200]!r}: this server validates "
                                f"against {', '.join(sorted(_known(rtype)))}",
                                "Parameters.parameter.profile"))
            return ctx.respond(outcome(issues), fmt)
        issues += validate(resource, profile)
        return ctx.respond(outcome(issues), fmt)
