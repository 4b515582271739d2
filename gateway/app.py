"""Build the ASGI application: mappings → providers → routes, wrapped in the middleware layers.

This is the one place the application is assembled. Loading fails loudly: a bad mapping
raises MappingError (with file:line for every problem) and the server does not start.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from adapters import registry as adapter_registry
from gateway import logging as gateway_logging
from gateway import metrics, observability, terminology, tracing
from gateway import state as shared_state
from gateway.audit import AuditLayer, AuditTrail, Deferred, DenialCounter
from gateway.audit import destination as audit_destination
from gateway.auth.config import resolve_auth
from gateway.auth.middleware import Authentication
from gateway.bundle import Pager
from gateway.compartment import CompartmentLayer
from gateway.errors import GatewayError
from gateway.limits import (
    BodyLimit,
    ClientConcurrency,
    ClientQueues,
    ConcurrencyLimit,
    CountedSlots,
    RateLimit,
    SourceLimit,
    TokenBuckets,
)
from gateway.mapping.loader import LoadedSet, load_directory
from gateway.messaging.config import load_messaging
from gateway.messaging.delivery import Outbox
from gateway.messaging.process import Messaging, ProcessMessage
from gateway.messaging.store import MessageStore
from gateway.middleware import RequestContext, gateway_error_handler, http_error_handler
from gateway.operations import OperationRegistry
from gateway.operations.document import Document, load_documents
from gateway.operations.everything import Everything
from gateway.operations.structured import load_operations
from gateway.operations.validate import Validate
from gateway.providers import Provider
from gateway.registry import Registry
from gateway.reload import LiveMappings, PinLayer
from gateway.retry import Backoff
from gateway.routes import Api, routes
from gateway.settings import Settings
from gateway.terminology.operations import served_operations as served_terminology_operations

log = structlog.get_logger("gateway.app")


def demo_database_url(settings: Settings) -> str:
    from gateway.demo_pas import demo_file_name, ensure_sqlite_demo

    path = settings.data_dir / demo_file_name(settings.demo_patients)
    ensure_sqlite_demo(path, patients=settings.demo_patients, progress=settings.progress)
    return f"sqlite:///{path}"


async def _sweep(denials: DenialCounter) -> None:
    """Counted denials reach the trail soon after their window, also when the flood stops."""
    while True:
        await asyncio.sleep(max(0.05, denials.window / 4))
        denials.sweep()


def _buckets(per_minute: int, burst: int) -> TokenBuckets | None:
    return TokenBuckets(per_minute / 60.0, burst) if per_minute > 0 else None


def patient_id_check(registry: Registry) -> Callable[[str], bool]:
    """Whether a token's ``patient`` claim is an id the Patient mapping serves: its key
    storage takes it and gives it back unchanged (``0100001`` is not ``100001``)."""
    if "Patient" not in registry:
        return lambda _claim: True
    # Several Patient sources: the claim is one source's id (its prefix, then its key).
    keys = [(s.id_prefix, s.mapping.storage(s.key)) for s in registry.get("Patient").sources]

    def check(claim: str) -> bool:
        for prefix, storage in keys:
            key = claim.removeprefix(prefix)
            if not claim.startswith(prefix):
                continue
            try:
                if str(storage.parse_key(key)) == key:
                    return True
            except ValueError:
                continue
        return False

    return check


def live_patient_id_check(live: LiveMappings) -> Callable[[str], bool]:
    """``patient_id_check`` over the request's generation: a reload may change the Patient
    sources (their prefixes, their key storage)."""
    checks: dict[int, tuple[Registry, Callable[[str], bool]]] = {}

    def check(claim: str) -> bool:
        registry = live.registry
        found = checks.get(id(registry))
        if found is None or found[0] is not registry:
            checks.clear()  # only the current generations are asked
            found = checks[id(registry)] = (registry, patient_id_check(registry))
        return found[1](claim)

    return check


def build_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    gateway_logging.configure(settings.log_level)
    settings, generated_secret = settings.with_secret()
    if generated_secret:
        log.warning("paging_secret_generated",
                    hint="set CCG_PAGING_SECRET so paging links survive restarts and replicas")
    def load_mappings() -> LoadedSet:  # at start, and again on each reload
        return load_directory(settings.mappings_dir, adapter_registry.create,
                              demo_url=lambda: demo_database_url(settings),
                              urls=settings.connection_urls)

    loaded = load_mappings()
    auth = resolve_auth(settings)  # AuthConfigError: refuse to start (after mapping errors)
    def build_registry(from_set: LoadedSet) -> Registry:
        # the mapped types, and the terminology the code maps and Care Connect make (FHIR
        # ConceptMap, ValueSet, CodeSystem: gateway.terminology)
        return Registry((Provider(m) for m in from_set.mappings),
                        terminology.providers(from_set.codemaps, terminology.catalogue()))

    registry = build_registry(loaded)
    observability.install([p.resource_type for p in registry], settings.otel_traces,
                          record_metrics=settings.metrics)
    if tracing.enabled():  # the trace id on every log line of a traced request
        gateway_logging.configure(settings.log_level, extra=(tracing.add_trace_id,))
    shared = shared_state.create(settings.redis_url, settings.redis_timeout_ms)
    if not settings.redis_url and settings.workers > 1:
        log.warning("local_shared_state", workers=settings.workers,
                    hint="rate limits, in-flight caps and the jti replay cache are per "
                         "process: set "
                         "CCG_REDIS_URL to share them between workers and replicas")
    if settings.validate_responses:
        from gateway.profiles import runtime

        app_validation: runtime.ResponseValidation | None = runtime.install(registry)
    else:
        app_validation = None

    def prepare(new: Registry) -> None:
        if app_validation is not None:
            for provider in new.sources():
                app_validation.wrap(provider)

    # The messaging state (store, outbox, workers) is built once and outlives reloads; it
    # finds providers through the live mappings, and a reload re-reads its declaration.
    messaging: Messaging | None = None
    messaging_spec = load_messaging(loaded.directory, registry)
    if messaging_spec is not None:
        store = MessageStore(settings.data_dir / "messages.sqlite")
        allow = [u.strip() for u in settings.messaging_response_urls.split(",") if u.strip()]
        messaging = Messaging(messaging_spec, registry, store, allow, Outbox(
            store, allow, max_attempts=settings.messaging_max_attempts,
            backoff_base=settings.messaging_retry_seconds,
            backoff_max=settings.messaging_retry_max_seconds,
            retention_seconds=settings.messaging_retention_days * 86_400),
            retry_seconds=settings.messaging_retry_seconds, retry=Backoff(
                settings.messaging_retry_seconds, settings.messaging_retry_max_seconds,
                settings.messaging_process_max_attempts,
                settings.messaging_process_max_age_seconds))

    def build_operations(from_set: LoadedSet, over: Registry) -> OperationRegistry:
        documents = load_documents(from_set.directory, over)
        spec = load_messaging(from_set.directory, over) if messaging is not None else None
        built = OperationRegistry([Validate(), Everything(),
                                   *load_operations(from_set.directory, over),
                                   *served_terminology_operations(over),
                                   *([Document(documents)] if documents else []),
                                   *([ProcessMessage(messaging)] if spec is not None
                                     and messaging is not None else [])])
        if spec is not None and messaging is not None:
            messaging.spec = spec  # last: nothing after this can refuse the reload
        return built

    operations = build_operations(loaded, registry)
    live = LiveMappings(registry, str(loaded.directory), load_mappings, prepare,
                        operations=operations, build_operations=build_operations,
                        build_registry=build_registry)
    if messaging is not None:
        messaging.registry_source = live
    api = Api(live, settings, Pager(settings.paging_secret))
    from gateway.adt.app import AdtPart  # the ADT feed and Subscription, when configured

    adt_part = AdtPart.build(settings)
    audit_trail = AuditTrail(audit_destination(settings),
                             fhir_destination=settings.audit_fhir_log,
                             fail_closed=settings.audit_fail_closed,
                             denial_window=settings.audit_denial_window_seconds)
    if messaging is not None:  # its worker's writes: the same trail as the requests'
        messaging.audit = Deferred(audit_trail, settings.base_path)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        audit_trail.open()  # closed by the end of a previous lifespan
        log.info("started", resources=[p.resource_type for p in registry],
                 mappings=str(loaded.directory), reload_on_sighup=live.install_signal(),
                 pid=os.getpid())  # which worker, with --workers
        sweeper = (asyncio.create_task(_sweep(audit_trail.denials))
                   if audit_trail.denials is not None else None)
        await adt_part.start()
        if messaging is not None:
            await messaging.start()
        yield
        if messaging is not None:
            await messaging.stop()
        await adt_part.stop()
        if sweeper is not None:
            sweeper.cancel()
        live.remove_signal()
        await live.aclose()
        await shared.aclose()
        audit_trail.close()

    # With Redis, a client's rate and its in-flight lease are one call (ClientConcurrency)
    rated_lease = bool(settings.redis_url and settings.rate_limit_per_minute > 0
                       and settings.max_in_flight_per_client > 0)
    app_routes = routes(api, live, settings.base_path.rstrip("/"))
    if settings.metrics and not settings.metrics_port:  # else: on its own port (cli.py)
        app_routes.append(Route("/metrics", metrics.metrics_endpoint, methods=["GET"]))
    # Traces off: not even a layer to pass through.
    tracing_layers = ([Middleware(tracing.TracingLayer, classify=metrics.classify)]
                      if tracing.enabled() else [])
    # A limit that is off adds no layer: every layer costs each request its call, its checks
    # and its frame, also when it only passes the request on.
    source_requests = _buckets(settings.source_rate_limit_per_minute,
                               settings.source_rate_limit_burst)
    source_failures = _buckets(settings.auth_failures_per_minute, settings.auth_failures_burst)
    client_slots = (CountedSlots(settings.max_in_flight_per_client)
                    if settings.max_in_flight_per_client > 0 else None)
    backend_calls = settings.backend_calls_per_client(
        [c.pool_size for c in loaded.settings.connections.values()])
    client_queues = ClientQueues(backend_calls) if backend_calls > 0 else None
    app = Starlette(
        routes=[*adt_part.routes(), *app_routes],
        middleware=[*tracing_layers,
                    Middleware(RequestContext, cacheable=frozenset({
                        "/_health", "/_ready",
                        settings.base_path.rstrip("/") + "/metadata"})),
                    # audit sees every outcome, including the limits' and authentication's
                    Middleware(AuditLayer, trail=audit_trail, base_path=settings.base_path),
                    # before authentication: by source address, whoever it claims to be
                    *([Middleware(SourceLimit, requests=source_requests,
                                  failures=source_failures,
                                  shared=shared if settings.redis_url else None)]
                      if source_requests is not None or source_failures is not None else []),
                    *([Middleware(ConcurrencyLimit, max_in_flight=settings.max_in_flight)]
                      if settings.max_in_flight > 0 else []),
                    *([Middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                                  timeout=settings.body_timeout_seconds)]
                      if settings.max_body_bytes > 0 or settings.body_timeout_seconds > 0
                      else []),
                    Middleware(Authentication, config=auth, base_path=settings.base_path,
                               patient_id=live_patient_id_check(live),
                               shared_state=shared if settings.redis_url else None,
                               public=frozenset({"/metrics"})),
                    # inside authentication: these need the principal it sets
                    *([Middleware(RateLimit, per_minute=settings.rate_limit_per_minute,
                                  burst=settings.rate_limit_burst,
                                  shared=shared if settings.redis_url else None)]
                      if settings.rate_limit_per_minute > 0 and not rated_lease else []),
                    # in-flight cap: in Redis when set; the backend queue is per process
                    # (it guards this process's pool): deploy/README.md "Shared state"
                    *([Middleware(ClientConcurrency, slots=client_slots, backend=client_queues,
                                  shared=shared if settings.redis_url else None,
                                  limit=settings.max_in_flight_per_client,
                                  lease_seconds=float(settings.concurrency_lease_seconds),
                                  rate=((settings.rate_limit_per_minute / 60.0,
                                         max(1, settings.rate_limit_burst))
                                        if rated_lease else None))]
                      if client_slots is not None or client_queues is not None else []),
                    Middleware(CompartmentLayer), *adt_part.middleware(),
                    # innermost: a request is served by the mappings current when it began
                    Middleware(PinLayer, live=live)],
        exception_handlers={GatewayError: gateway_error_handler,
                            HTTPException: http_error_handler},
        lifespan=lifespan,
    )
    app.state.registry = registry  # the first generation; app.state.mappings is the live set
    app.state.operations = operations
    app.state.messaging = messaging
    app.state.mappings = live
    app.state.settings = settings
    app.state.response_validation = app_validation
    app.state.audit = audit_trail
    app.state.capability_extra = adt_part.capability()
    app.state.shared_state = shared
    return app
