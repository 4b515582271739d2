"""The authentication layer: a pure ASGI middleware inside ``RequestContext``.

Every HTTP request except the public endpoints (``[base]/metadata``, ``/_health``,
``/_ready``) must authenticate with the configured mode; the result is a ``Principal`` in
``scope["state"]["principal"]`` (``request.state.principal``). A request that does not
authenticate is answered here with a 401 OperationOutcome (and ``WWW-Authenticate``) and never
reaches the routes. WebSocket connections are refused: the gateway serves none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth.apikeys import ApiKeyAuthenticator
from gateway.auth.config import AuthConfig
from gateway.auth.errors import AuthenticationRequired, InvalidToken
from gateway.auth.mtls import MtlsAuthenticator
from gateway.auth.principal import PRINCIPAL_SCOPE_KEY, Principal
from gateway.auth.principal import Scope as SmartScope
from gateway.auth.tokens import JwtVerifier
from gateway.errors import GatewayError
from gateway.middleware import outcome_response

log = structlog.get_logger("gateway.auth")

INSECURE_PRINCIPAL = Principal(
    client_id="insecure-demo", subject=None, role=None,
    scopes=(SmartScope("system", "*", frozenset("cruds")),), patient=None, mode="insecure-demo")


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    values = [v for k, v in headers if k == b"authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise InvalidToken("send exactly one Authorization header")
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthenticationRequired("a Bearer access token is required")
    token = token.strip()
    if not token:
        raise InvalidToken("the Bearer token is empty")
    return token


def route_path(scope: Scope) -> str:
    """The path the router matches (the same rule as Starlette: without ``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def _any_patient_id(_claim: str) -> bool:
    return True


class Authentication:
    def __init__(self, app: ASGIApp, config: AuthConfig, base_path: str,
                 patient_id: Callable[[str], bool] = _any_patient_id,
                 shared_state: Any = None, public: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.config = config
        self.patient_id = patient_id
        """Whether a ``patient`` claim can name a Patient here (its id as this server serves
        ids): a claim that cannot is refused now, not failed on every request after."""
        self.public = frozenset({"/_health", "/_ready", f"{base_path.rstrip('/')}/metadata",
                                 *public})
        self.jwt = (JwtVerifier(config.jwt, shared_replay=shared_state)
                    if config.jwt is not None else None)
        self.api_keys = ApiKeyAuthenticator(config.api_keys) if config.mode == "api-key" else None
        self.mtls = MtlsAuthenticator(config.mtls_clients) if config.mode == "mtls" else None

    async def authenticate(self, scope: Scope) -> Principal:
        mode = self.config.mode
        if mode == "insecure-demo":
            return INSECURE_PRINCIPAL
        if self.jwt is not None:
            token = bearer_token(scope["headers"])
            if token is None:
                raise AuthenticationRequired("a Bearer access token is required")
            return await self.jwt.principal(token)
        if self.api_keys is not None:
            return self.api_keys.authenticate(scope["headers"])
        if self.mtls is not None:
            return self.mtls.authenticate(scope)
        raise AuthenticationRequired()  # unreachable with a checked AuthConfig: deny

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        if route_path(scope) in self.public:
            await self.app(scope, receive, send)
            return
        try:
            principal = await self.authenticate(scope)
            if principal.patient is not None and not self.patient_id(principal.patient):
                raise InvalidToken("the patient claim is not a patient id on this server")
        except GatewayError as error:
            response = outcome_response(Request(scope), error)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[PRINCIPAL_SCOPE_KEY] = principal
        await self.app(scope, receive, send)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                self.log_startup()
            return message

        return wrapped

    def log_startup(self) -> None:
        mode = self.config.mode
        if mode == "insecure-demo":
            log.warning("insecure_demo_auth",
                        warning="AUTHENTICATION IS OFF: every request is allowed as system/*.* "
                                "(demo data only; never expose this gateway)")
        else:
            details: dict[str, Any] = {"mode": mode}
            if self.config.jwt is not None:
                details["dev_key"] = self.config.jwt.dev
            log.info("authentication", **details)
