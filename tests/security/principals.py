"""Test principals: a layer that puts a chosen ``Principal`` on each request.

The app runs with ``auth_mode="insecure-demo"`` (authentication lets everything in as a
``system/*.*`` principal); this layer sits just inside it and replaces that principal with the one
named by the ``X-Test-As`` header, so one app can serve several tokens (replay tests).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth.principal import PRINCIPAL_SCOPE_KEY, Principal, parse_scopes

HEADER = b"x-test-as"


def patient_token(patient: str | None, scopes: str = "patient/*.read",
                  client_id: str = "patient-app") -> Principal:
    return Principal(client_id=client_id, subject=f"user-of-{patient}", role="patient",
                     scopes=parse_scopes(scopes), patient=patient, mode="jwt")


def user_token(scopes: str = "user/*.*", client_id: str = "clinician-app") -> Principal:
    return Principal(client_id=client_id, subject="dr-who", role="clinician",
                     scopes=parse_scopes(scopes), patient=None, mode="jwt")


class PrincipalInjector:
    def __init__(self, app: ASGIApp, principals: dict[str, Principal]) -> None:
        self.app = app
        self.principals = principals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            name = next((v.decode() for k, v in scope["headers"] if k == HEADER), None)
            if name is not None:
                scope.setdefault("state", {})[PRINCIPAL_SCOPE_KEY] = self.principals[name]
        await self.app(scope, receive, send)


def install(app: Starlette, principals: dict[str, Principal]) -> None:
    """Add the injector just inside authentication, where a real principal appears (before
    the app first runs and builds its stack), so rate limits and the compartment see it."""
    layer = Middleware(PrincipalInjector, principals=principals)
    names = [getattr(m.cls, "__name__", "") for m in app.user_middleware]
    if "Authentication" in names:
        app.user_middleware.insert(names.index("Authentication") + 1, layer)
    else:
        app.user_middleware.append(layer)


def as_(name: str) -> dict[str, str]:
    return {"X-Test-As": name}
