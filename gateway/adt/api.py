"""Subscription over the FHIR API: create, read, search, delete (STU3, rest-hook channel).

The same SMART scopes as every other type (``user/Subscription.c`` to create, ``.r`` to read,
``.s`` to search, ``.d`` to delete) and the same audit (the audit layer sees these requests
like any other). Subscriptions live in the ADT store, so the listener process — which may be
another process — sees them within half a second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway import writes
from gateway.adt import criteria
from gateway.adt.config import AdtSettings
from gateway.adt.store import AdtStore
from gateway.auth import authorize
from gateway.errors import GatewayError, InvalidParameter, MethodNotAllowed, NotFound
from gateway.formats import negotiate, render
from gateway.search import ID_RE

PAYLOADS = ("application/fhir+json", "application/json+fhir")
STATUSES = ("requested", "active", "error", "off")


def _bad(message: str, expression: str) -> InvalidParameter:
    return InvalidParameter(message, expression=expression)


class SubscriptionLimit(GatewayError):
    status = 422
    issue_code = "too-costly"
    error_code = "SUBSCRIPTION_LIMIT"


def end_of(resource: dict[str, Any]) -> float | None:
    end = resource.get("end")
    if not end:
        return None
    when = dt.datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    if when.tzinfo is None:  # a date or a local dateTime: read as UTC
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def checked(resource: dict[str, Any], settings: AdtSettings) -> dict[str, Any]:
    """The Subscription as stored: checked, status active, server-assigned id."""
    if resource.get("resourceType") != "Subscription":
        raise _bad("the body must be a Subscription", "Subscription")
    writes.validate(resource, "Subscription")  # STU3 structure: reason, criteria, channel...
    criteria.parse(str(resource.get("criteria", "")))
    channel = resource.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise _bad("only the rest-hook channel is supported", "Subscription.channel.type")
    endpoint = str(channel.get("endpoint") or "")
    if not settings.endpoint_allowed(endpoint):
        raise _bad("Subscription.channel.endpoint is not an endpoint this gateway is "
                   "configured to notify (CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS)",
                   "Subscription.channel.endpoint")
    payload = channel.get("payload")
    if payload not in (None, *PAYLOADS):
        raise _bad("Subscription.channel.payload must be application/fhir+json or absent",
                   "Subscription.channel.payload")
    if resource.get("status") not in ("requested", "active"):
        raise _bad("a new Subscription's status is requested (or active)",
                   "Subscription.status")
    try:
        end = end_of(resource)
    except ValueError:
        raise _bad("Subscription.end is not a dateTime", "Subscription.end") from None
    if end is not None and end < dt.datetime.now(dt.UTC).timestamp():
        raise _bad("Subscription.end is in the past", "Subscription.end")
    out = dict(resource)
    out["id"] = str(uuid.uuid4())
    out["status"] = "active"
    out.pop("error", None)
    out["meta"] = {"lastUpdated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return out


class SubscriptionApi:
    def __init__(self, store: AdtStore, settings: AdtSettings, max_body_bytes: int) -> None:
        self.store = store
        self.settings = settings
        self.max_body_bytes = max_body_bytes

    @staticmethod
    def _respond(request: Request, body: dict[str, Any], status: int = 200,
                 headers: dict[str, str] | None = None) -> Response:
        fmt = negotiate(request.headers.get("accept"), request.query_params.get("_format"),
                        request.query_params.get("_pretty"))
        return Response(render(body, fmt), status_code=status, headers=headers,
                        media_type=fmt.content_type)

    def _base(self, request: Request, base: str) -> str:
        return str(request.base_url).rstrip("/") + base

    async def type_level(self, request: Request) -> Response:
        base = request.scope.get("ccg_base", "")
        if request.method == "POST":
            principal = authorize.require(request, "Subscription", "c")
            body = await writes.read_body(request, self.max_body_bytes)
            resource = checked(body, self.settings)
            held = await asyncio.to_thread(self.store.count_subscriptions, principal.client_id)
            if held >= self.settings.max_subscriptions_per_client:
                raise SubscriptionLimit(
                    f"this client already has {held} active Subscriptions, the most allowed "
                    "(CCG_SUBSCRIPTION_MAX_PER_CLIENT); delete one first")
            await asyncio.to_thread(self.store.add_subscription, resource["id"], resource,
                                    principal.client_id, end_of(resource))
            loc = f"{self._base(request, base)}/Subscription/{resource['id']}"
            return self._respond(request, authorize.written(request, "Subscription",
                                                            resource, "created"), 201,
                                 {"Location": loc})
        if request.method != "GET":
            raise MethodNotAllowed("Subscription supports GET (search) and POST (create)")
        authorize.require(request, "Subscription", "s")
        statuses = None
        for name, value in request.query_params.multi_items():
            if name == "status":
                statuses = [v for v in value.split(",") if v]
                if any(s not in STATUSES for s in statuses):
                    raise _bad(f"status is one of {', '.join(STATUSES)}", "status")
            elif name not in ("_format", "_pretty"):
                raise _bad("Subscription search supports the status parameter only", name)
        found = await asyncio.to_thread(self.store.search_subscriptions, statuses)
        if statuses is not None:  # the stored resource's status may say error
            found = [s for s in found if s.get("status") in statuses]
        url = self._base(request, base)
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                  "link": [{"relation": "self", "url": str(request.url)}],
                  "entry": [{"fullUrl": f"{url}/Subscription/{s['id']}", "resource": s,
                             "search": {"mode": "match"}} for s in found]}
        return self._respond(request, bundle)

    async def instance(self, request: Request) -> Response:
        sid = request.path_params["id"]
        if not ID_RE.match(sid):
            raise NotFound("no Subscription with this id")
        if request.method == "GET":
            authorize.require(request, "Subscription", "r")
            sub = await asyncio.to_thread(self.store.get_subscription, sid)
            if sub is None:
                raise NotFound("no Subscription with this id")
            return self._respond(request, sub)
        if request.method == "DELETE":
            authorize.require(request, "Subscription", "d")
            await asyncio.to_thread(self.store.delete_subscription, sid)
            return Response(status_code=204)  # idempotent, as FHIR allows
        raise MethodNotAllowed("Subscription supports GET and DELETE on an instance")


def subscription_routes(api: SubscriptionApi, base: str) -> list[BaseRoute]:
    every = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]

    def with_base(endpoint: Any) -> Any:
        async def call(request: Request) -> Response:
            request.scope["ccg_base"] = base
            response: Response = await endpoint(request)
            return response
        return call

    return [Route(f"{base}/Subscription", with_base(api.type_level), methods=every),
            Route(f"{base}/Subscription/{{id}}", with_base(api.instance), methods=every)]
