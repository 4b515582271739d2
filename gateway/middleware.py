"""The outermost ASGI layer: request id, one log line per request, and the last-resort error
handler that turns anything unexpected into a 500 OperationOutcome without a traceback.

Also the exception handlers that render GatewayError and Starlette's HTTP errors as
OperationOutcome in the format the client negotiated.
"""

from __future__ import annotations

import re
import time
import traceback
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import logging as gateway_logging
from gateway import metrics, tracing
from gateway.errors import (
    GatewayError,
    InternalError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    issue,
    operation_outcome,
)
from gateway.formats import DEFAULT, Format, negotiate, render
from gateway.randomness import random_hex
from gateway.timing import adapter_seconds

log = structlog.get_logger("gateway.request")
CLIENT_CLOSED_REQUEST = 499
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


NO_STORE = ((b"cache-control", b"no-store"), (b"pragma", b"no-cache"))
"""On every response that can carry patient data: no shared or browser cache keeps it
(``Pragma`` for HTTP/1.0 proxies)."""


class RequestContext:
    def __init__(self, app: ASGIApp, cacheable: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.cacheable = cacheable
        """Paths whose responses hold no patient data (metadata, probes): no headers added."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        rid_token = gateway_logging.current_request_id.set(rid)  # on every line logged now
        token = adapter_seconds.set(0.0)
        started = time.perf_counter()
        status = 500
        response_started = False
        rid_header = (b"x-request-id", rid.encode())
        extra = ((rid_header,) if scope["path"] in self.cacheable
                 else (rid_header, *NO_STORE))

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client went away mid-request (an upload cut short): nobody to answer, and
            # nothing wrong with the server. 499 (as nginx logs it) in the request line.
            status = CLIENT_CLOSED_REQUEST
        except Exception as exc:  # the last resort: never a traceback to the client
            status = 500
            # Type and stack only: exception messages can quote data.
            log.error("unhandled_error", error=type(exc).__name__,
                      stack="".join(traceback.format_tb(exc.__traceback__)))
            tracing.record_error(exc)
            if not response_started:
                body = render(with_trace_id(InternalError("an unexpected error occurred")),
                              DEFAULT)
                await send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", DEFAULT.content_type.encode()), *extra]})
                await send({"type": "http.response.body", "body": body})
        finally:
            route = scope.get("route")
            elapsed = time.perf_counter() - started
            metrics.observe_request(scope, status, elapsed)
            gateway_logging.info(log, "request", {
                "method": scope["method"],
                # the template without convertors: /STU3/{type}/{id}
                "route": getattr(route, "path_format", None) or "unmatched",
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
                "adapter_ms": round(adapter_seconds.get() * 1000, 2),
            })
            adapter_seconds.reset(token)
            gateway_logging.current_request_id.reset(rid_token)


def _request_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
            break
    # 128 random bits, as uuid4 (same 32-hex shape) at a fraction of its cost: unique across
    # processes and replicas with overwhelming probability, and it reveals nothing.
    return random_hex(16)


def _format(request: Request) -> Format:
    fmt = getattr(request.state, "format", None)
    if isinstance(fmt, Format):
        return fmt
    try:  # no handler negotiated (no route matched): honour the client for the error too
        return negotiate(request.headers.get("accept"), request.query_params.get("_format"),
                         request.query_params.get("_pretty"))
    except NotAcceptable:
        return DEFAULT


def with_trace_id(error: GatewayError) -> dict[str, Any]:
    """The error's OperationOutcome; for a 5xx while tracing, naming the trace to look up."""
    outcome = error.outcome()
    if error.status >= 500:
        trace_id = tracing.current_trace_id()
        if trace_id is not None:
            first = outcome["issue"][0]
            first["diagnostics"] = f"{first['diagnostics']} (trace id {trace_id})"
    return outcome


def outcome_response(request: Request, error: GatewayError) -> Response:
    fmt = _format(request)
    try:
        body = render(with_trace_id(error), fmt)
    except Exception:  # an XML rendering problem must not hide the original error
        fmt = DEFAULT
        body = render(with_trace_id(error), fmt)
    return Response(body, status_code=error.status, headers=error.headers,
                    media_type=fmt.content_type)


async def gateway_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    if exc.status >= 500 and exc.status != 501:  # 501: the client asked for what is not served
        log.warning("backend_error" if exc.status > 500 else "server_error",
                    error=type(exc).__name__, code=exc.error_code,
                    cause=type(exc.__cause__).__name__ if exc.__cause__ else None)
    return outcome_response(request, exc)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 404:
        error = NotFound("no such endpoint on this FHIR server")
    elif exc.status_code == 405:
        error = MethodNotAllowed("method not allowed here", headers=exc.headers or {})
    else:
        return _plain(request, exc.status_code, str(exc.detail))
    return outcome_response(request, error)


def _plain(request: Request, status: int, message: str) -> Response:
    err: dict[str, Any] = operation_outcome([issue("error", "exception", "HTTP_ERROR", message)])
    fmt = _format(request)
    return Response(render(err, fmt), status_code=status, media_type=fmt.content_type)
