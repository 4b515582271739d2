"""Build the ASGI application: mappings → providers → routes, wrapped in the middleware layers.

This is the one place the application is assembled. Loading fails loudly: a bad mapping
raises MappingError (with file:line for every problem) and the server does not start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from adapters import registry as adapter_registry
from gateway import logging as gateway_logging
from gateway.audit import AuditLayer, AuditTrail
from gateway.audit import destination as audit_destination
from gateway.auth.config import resolve_auth
from gateway.auth.middleware import Authentication
from gateway.bundle import Pager
from gateway.compartment import CompartmentLayer
from gateway.errors import GatewayError
from gateway.limits import BodyLimit, ConcurrencyLimit, RateLimit
from gateway.mapping.loader import LoadedSet, load_directory
from gateway.middleware import RequestContext, gateway_error_handler, http_error_handler
from gateway.providers import Provider, Registry
from gateway.reload import LiveMappings, PinLayer
from gateway.routes import Api, routes
from gateway.settings import Settings

log = structlog.get_logger("gateway.app")


def demo_database_url(settings: Settings) -> str:
    from gateway.demo_pas import ensure_sqlite_demo

    path = settings.data_dir / f"demo-pas-{settings.demo_patients}.sqlite"
    ensure_sqlite_demo(path, patients=settings.demo_patients, progress=settings.progress)
    return f"sqlite:///{path}"


def build_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    gateway_logging.configure(settings.log_level)
    settings, generated_secret = settings.with_secret()
    if generated_secret:
        log.warning("paging_secret_generated",
                    hint="set CCG_PAGING_SECRET so paging links survive restarts and replicas")
    loaded = load_directory(
        settings.mappings_dir, adapter_registry.create,
        demo_url=lambda: demo_database_url(settings),
        urls=settings.connection_urls,
    )
    auth = resolve_auth(settings)  # AuthConfigError: refuse to start (after mapping errors)
    registry = Registry(Provider(m) for m in loaded.mappings)
    if settings.validate_responses:
        from gateway.profiles import runtime

        app_validation: runtime.ResponseValidation | None = runtime.install(registry)
    else:
        app_validation = None

    def load_again() -> LoadedSet:  # a reload: the same directory and connections
        return load_directory(settings.mappings_dir, adapter_registry.create,
                              demo_url=lambda: demo_database_url(settings),
                              urls=settings.connection_urls)

    def prepare(new: Registry) -> None:
        if app_validation is not None:
            for provider in new:
                app_validation.wrap(provider)

    live = LiveMappings(registry, str(loaded.directory), load_again, prepare)
    api = Api(live, settings, Pager(settings.paging_secret))
    audit_trail = AuditTrail(audit_destination(settings),
                             fhir_destination=settings.audit_fhir_log,
                             fail_closed=settings.audit_fail_closed)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        audit_trail.open()  # closed by the end of a previous lifespan
        log.info("started", resources=[p.resource_type for p in registry],
                 mappings=str(loaded.directory), reload_on_sighup=live.install_signal())
        yield
        live.remove_signal()
        await live.aclose()
        audit_trail.close()

    app = Starlette(
        routes=routes(api, live, settings.base_path.rstrip("/")),
        middleware=[Middleware(RequestContext),
                    # audit sees every outcome, including the limits' and authentication's
                    Middleware(AuditLayer, trail=audit_trail, base_path=settings.base_path),
                    Middleware(ConcurrencyLimit, max_in_flight=settings.max_in_flight),
                    Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
                    Middleware(Authentication, config=auth, base_path=settings.base_path),
                    # inside authentication: these need the principal it sets
                    Middleware(RateLimit, per_minute=settings.rate_limit_per_minute,
                               burst=settings.rate_limit_burst),
                    Middleware(CompartmentLayer),
                    # innermost: a request is served by the mappings current when it began
                    Middleware(PinLayer, live=live)],
        exception_handlers={GatewayError: gateway_error_handler,
                            HTTPException: http_error_handler},
        lifespan=lifespan,
    )
    app.state.registry = registry  # the first generation; app.state.mappings is the live set
    app.state.mappings = live
    app.state.settings = settings
    app.state.response_validation = app_validation
    app.state.audit = audit_trail
    return app
