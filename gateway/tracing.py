"""OpenTelemetry traces: one span per FHIR request, children per backend call, per SQL
statement, per MLLP exchange, per mapping batch and per audit write.

Off by default, and then free: no ASGI layer is added, ``span`` hands back one shared
no-op context manager, and the adapters' statement hook stays unset. On
(``CCG_OTEL_TRACES=otlp``, with the ``[otel]`` extra installed) spans go to the OTLP/HTTP
exporter configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables, in batches, off the
request path; ``console`` prints them (for trying it out).

A W3C ``traceparent`` on the request is honoured: the request span continues the caller's
trace. The trace id goes on the request's JSON log line and into the diagnostics of a 5xx
OperationOutcome, so a support call can name it. Span attributes hold shapes, never values:
an SQL statement's text has placeholders where the values go (the values are bound
parameters), an MLLP exchange carries the message type and control id (MSH-9, MSH-10), a
request span the route template, never the URL's query.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_NOOP: AbstractContextManager[Any] = contextlib.nullcontext()
_tracer: Any = None
_provider: Any = None


class TracingUnavailable(RuntimeError):
    """Traces were asked for but the ``[otel]`` extra is not installed."""


def enabled() -> bool:
    return _tracer is not None


def configure(exporter: str, service_name: str = "careconnect-gateway") -> None:
    """Set tracing up for this process from ``CCG_OTEL_TRACES`` (``""`` leaves it off)."""
    exporter = exporter.strip().lower()
    if not exporter or exporter in ("off", "none"):
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise TracingUnavailable(
            "CCG_OTEL_TRACES is set but OpenTelemetry is not installed: "
            "pip install 'careconnect-gateway[otel]'") from exc
    span_exporter: Any
    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TracingUnavailable("the OTLP exporter is not installed: "
                                     "pip install 'careconnect-gateway[otel]'") from exc
        span_exporter = OTLPSpanExporter()
    elif exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        raise TracingUnavailable(f"CCG_OTEL_TRACES must be otlp, console or empty, "
                                 f"not {exporter!r}")
    if _provider is not None:  # already set up in this process (one app per worker)
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    use_provider(provider)


def use_provider(provider: Any) -> None:
    """Trace with this SDK ``TracerProvider`` (tests: one with an in-memory exporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("careconnect-gateway")
    from adapters import observe

    observe.statement = _statement_span


def disable() -> None:
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None
    from adapters import observe

    observe.statement = None


def _unsampled() -> bool:
    """Inside a request whose trace is not kept (sampled out): its children would not be
    either, and even a non-recording span costs its creation and context switch."""
    from opentelemetry import trace

    current = trace.get_current_span()
    return current is not trace.INVALID_SPAN and not current.is_recording()


def span(name: str, attributes: dict[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A child span of the current one (a shared no-op while tracing is off, and inside a
    request that is not sampled)."""
    tracer = _tracer
    if tracer is None or _unsampled():
        return _NOOP
    # No exception events and no status text from an exception: its message can quote data.
    return tracer.start_as_current_span(  # type: ignore[no-any-return]
        name, attributes=attributes, record_exception=False, set_status_on_exception=False)


def _statement_span(connection: str, dialect: str, sql: str) -> AbstractContextManager[Any]:
    return traced(f"SQL {connection}", {"db.system": dialect, "db.statement": sql,
                                      "ccg.connection": connection})


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), or None outside a traced request."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def add_trace_id(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: ``trace_id`` on every line logged inside a traced request."""
    tid = current_trace_id()
    if tid is not None:
        event_dict.setdefault("trace_id", tid)
    return event_dict


def record_error(exc: BaseException) -> None:
    """Mark the current span failed, with the error's class only (messages can quote data)."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    current = trace.get_current_span()
    current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    current.set_attribute("error.type", type(exc).__name__)


class TracingLayer:
    """The outermost layer while tracing is on: the server span of each HTTP request."""

    def __init__(self, app: ASGIApp, classify: Callable[[Scope], tuple[str, str, str]]) -> None:
        self.app = app
        self.classify = classify
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.propagator = TraceContextTextMapPropagator()
        self.kind = SpanKind.SERVER

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = _tracer
        if scope["type"] != "http" or tracer is None:
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"traceparent", b"tracestate")}
        parent = self.propagator.extract(carrier) if carrier else None
        status = 500
        with tracer.start_as_current_span(
                f"{scope['method']} request", context=parent, kind=self.kind,
                attributes={"http.request.method": scope["method"]},
                record_exception=False, set_status_on_exception=False) as request_span:

            async def watch(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.app(scope, receive, watch)
            finally:
                route, rtype, interaction = self.classify(scope)
                request_span.update_name(f"{scope['method']} {route}")
                request_span.set_attribute("http.route", route)
                request_span.set_attribute("http.response.status_code", status)
                request_span.set_attribute("fhir.resource_type", rtype)
                request_span.set_attribute("fhir.interaction", interaction)
                if status >= 500:
                    from opentelemetry.trace import Status, StatusCode

                    request_span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


def traced(name: str, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
    """``span`` that also marks the span failed (error class only) when the block raises."""
    if _tracer is None or _unsampled():
        return _NOOP
    return _traced(name, attributes)


@contextlib.contextmanager
def _traced(name: str, attributes: dict[str, Any]) -> Iterator[None]:
    with span(name, attributes):
        try:
            yield
        except BaseException as exc:
            record_error(exc)
            raise
