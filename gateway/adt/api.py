"""Subscription over the FHIR API: create, read, search, update, delete (STU3, rest-hook).

The same SMART scopes as every other type (``user/Subscription.c`` to create, ``.r`` to read,
``.s`` to search, ``.u`` to update, ``.d`` to delete) and the same audit (the audit layer sees
these requests like any other). Subscriptions live in the ADT store, so the listener process —
which may be another process — sees them within half a second.

An update (PUT) is checked as a create is (criteria, endpoint allow-list, payload, end) and may
set the status to ``off`` (no notifications; pending ones are cancelled) or back to
``requested``/``active``. It is version-aware: ``If-Match: W/"<versionId>"`` (or
``meta.versionId`` in the body) that is not the current version is 412 ``VERSION_CONFLICT``.

The channel's headers usually carry the subscriber's credentials, so they are write-only:
every answer (create, read, search, update) shows only their names, with the
``meta.security`` label REDACTED saying so. An update that sends a header by name only keeps
its stored value; one that sends ``Name: value`` replaces it; one it leaves out is removed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import orjson
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
REDACTED = {"system": "http://hl7.org/fhir/v3/ObservationValue", "code": "REDACTED",
            "display": "redacted"}


def _bad(message: str, expression: str) -> InvalidParameter:
    return InvalidParameter(message, expression=expression)


class SubscriptionLimit(GatewayError):
    status = 422
    issue_code = "too-costly"
    error_code = "SUBSCRIPTION_LIMIT"


class VersionConflict(GatewayError):
    """an update's `If-Match` or `meta.versionId` is not the current version"""

    status = 412
    issue_code = "conflict"
    error_code = "VERSION_CONFLICT"


def end_of(resource: dict[str, Any]) -> float | None:
    end = resource.get("end")
    if not end:
        return None
    when = dt.datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    if when.tzinfo is None:  # a date or a local dateTime: read as UTC
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _checked_body(resource: dict[str, Any], settings: AdtSettings) -> None:
    """The checks a create and an update share."""
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
    try:
        end = end_of(resource)
    except ValueError:
        raise _bad("Subscription.end is not a dateTime", "Subscription.end") from None
    if end is not None and end < dt.datetime.now(dt.UTC).timestamp():
        raise _bad("Subscription.end is in the past", "Subscription.end")


def _stamped(resource: dict[str, Any], sub_id: str, status: str, version: int
             ) -> dict[str, Any]:
    out = dict(resource)
    out["id"] = sub_id
    out["status"] = status
    out.pop("error", None)
    out["meta"] = {"versionId": str(version),
                   "lastUpdated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return out


def checked(resource: dict[str, Any], settings: AdtSettings) -> dict[str, Any]:
    """The Subscription as stored: checked, status active, server-assigned id, version 1."""
    _checked_body(resource, settings)
    if resource.get("status") not in ("requested", "active"):
        raise _bad("a new Subscription's status is requested (or active)",
                   "Subscription.status")
    if any(":" not in str(h) for h in (resource.get("channel") or {}).get("header") or []):
        raise _bad("a channel header is 'Name: value'", "Subscription.channel.header")
    return _stamped(resource, str(uuid.uuid4()), "active", 1)


def version_of(resource: dict[str, Any]) -> int:
    try:
        return int((resource.get("meta") or {}).get("versionId") or 1)
    except ValueError:
        return 1


def _header_name(header: str) -> str:
    return header.partition(":")[0].strip()


def checked_update(resource: dict[str, Any], current: dict[str, Any],
                   settings: AdtSettings) -> dict[str, Any]:
    """The updated Subscription as stored. Headers sent by name keep their stored value."""
    stored = {_header_name(h).lower(): str(h)
              for h in (current.get("channel") or {}).get("header") or []}
    channel = resource.get("channel")
    # A channel or header list of another JSON type is left for the structure check to report.
    if isinstance(channel, dict) and isinstance(channel.get("header"), list):
        headers = []
        for h in channel["header"]:
            h = str(h)
            if ":" in h:
                headers.append(h)
            elif h.strip().lower() in stored:
                headers.append(stored[h.strip().lower()])
            else:
                raise _bad(f"the channel header {h.strip()!r} has no value, and the "
                           "Subscription has no stored header of that name",
                           "Subscription.channel.header")
        resource = {**resource, "channel": {**channel, "header": headers}}
    _checked_body(resource, settings)
    status = resource.get("status")
    if status not in ("requested", "active", "off"):
        raise _bad("an updated Subscription's status is requested, active or off (error is "
                   "the server's to set)", "Subscription.status")
    return _stamped(resource, str(current["id"]), "off" if status == "off" else "active",
                    version_of(current) + 1)


def served(resource: dict[str, Any]) -> dict[str, Any]:
    """What the API shows of a stored Subscription: channel headers by name only."""
    channel = resource.get("channel") or {}
    headers = channel.get("header")
    if not headers:
        return resource
    out = dict(resource)
    out["channel"] = {**channel, "header": [_header_name(str(h)) for h in headers]}
    meta = dict(out.get("meta") or {})
    meta["security"] = [*(c for c in meta.get("security") or []
                          if c.get("code") != REDACTED["code"]), REDACTED]
    out["meta"] = meta
    return out


def _etag(resource: dict[str, Any]) -> dict[str, str]:
    return {"ETag": f'W/"{version_of(resource)}"'}


def _if_match(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().removeprefix("W/").strip('"')
    try:
        return int(text)
    except ValueError:
        raise _bad("If-Match is a version: W/\"<versionId>\"", "If-Match") from None


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
                                                            served(resource), "created"), 201,
                                 {"Location": loc, **_etag(resource)})
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
                  "entry": [{"fullUrl": f"{url}/Subscription/{s['id']}", "resource": served(s),
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
            return self._respond(request, served(sub), headers=_etag(sub))
        if request.method == "PUT":
            return await self._update(request, sid)
        if request.method == "DELETE":
            authorize.require(request, "Subscription", "d")
            await asyncio.to_thread(self.store.delete_subscription, sid)
            return Response(status_code=204)  # idempotent, as FHIR allows
        raise MethodNotAllowed("Subscription supports GET, PUT and DELETE on an instance")

    async def _update(self, request: Request, sid: str) -> Response:
        principal = authorize.require(request, "Subscription", "u")
        body = await writes.read_body(request, self.max_body_bytes)
        if body.get("id") != sid:
            raise _bad("the Subscription's id must be the id in the URL", "Subscription.id")
        wanted = _if_match(request.headers.get("if-match"))
        if wanted is None and (body.get("meta") or {}).get("versionId") is not None:
            wanted = version_of(body)
        for _ in range(5):  # the delivery worker may change the status meanwhile: re-read
            raw = await asyncio.to_thread(self.store.stored_subscription, sid)
            if raw is None:
                raise NotFound("no Subscription with this id (an update cannot create one: "
                               "the server assigns Subscription ids)")
            current = orjson.loads(raw)
            if wanted is not None and wanted != version_of(current):
                raise VersionConflict(f"the Subscription is at version "
                                      f"{version_of(current)}, not {wanted}")
            resource = checked_update(body, current, self.settings)
            if resource["status"] == "active" and current.get("status") == "off":
                held = await asyncio.to_thread(self.store.count_subscriptions,
                                               principal.client_id)
                if held >= self.settings.max_subscriptions_per_client:
                    raise SubscriptionLimit(
                        f"this client already has {held} active Subscriptions, the most "
                        "allowed (CCG_SUBSCRIPTION_MAX_PER_CLIENT)")
            if await asyncio.to_thread(self.store.update_subscription, sid, resource, raw,
                                       end_of(resource)):
                return self._respond(request, authorize.written(
                    request, "Subscription", served(resource), "updated"),
                    headers=_etag(resource))
        raise VersionConflict("the Subscription changed while it was being updated; "
                              "read it and try again")


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
