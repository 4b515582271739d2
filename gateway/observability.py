"""Wiring metrics and traces into the request path and the adapters' hooks.

``gateway.metrics`` and ``gateway.tracing`` define what is measured; this module puts the
measuring points in: the adapters' hooks (``adapters.observe``), a backend call's timing
(``Provider``), and the set-up the app builder calls once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from adapters import observe
from gateway import metrics, tracing


def install(resource_types: list[str], traces: str, record_metrics: bool = True) -> None:
    """Once per app: bounded resource-type labels, adapter hooks, tracing if asked for."""
    metrics.set_resource_types(resource_types)
    metrics.set_recording(record_metrics)
    observe.exchange = _exchange
    # time by statement shape: off with the metrics (then nothing on the statement path)
    observe.statement_timer = metrics.statement_timer if record_metrics else None
    observe.event = _event
    observe.pool_wait = _pool_wait
    observe.dropped = _dropped
    tracing.configure(traces)


@contextmanager
def _exchange(connection: str, message_type: str, control_id: str) -> Iterator[None]:
    started = time.perf_counter()
    outcome = "ok"
    try:
        with tracing.traced(f"MLLP {message_type}", {
                "ccg.connection": connection, "hl7.message_type": message_type,
                "hl7.control_id": control_id}):
            yield
    except BaseException as exc:
        outcome = type(exc).__name__  # our adapter's error classes: a closed set
        raise
    finally:
        metrics.MLLP_EXCHANGES.labels(connection, message_type, outcome).observe(
            time.perf_counter() - started)
        if outcome != "ok":
            metrics.MLLP_EVENTS.labels(connection, _EVENT_NAMES.get(outcome, "error")).inc()


# the adapter's errors for an exchange, as the event an operator looks for
_EVENT_NAMES = {"BackendTimeout": "timeout", "BackendRejected": "nak",
                "BackendUnavailable": "unavailable", "BackendError": "unusable_reply",
                "WriteOutcomeUnknown": "write_outcome_unknown",
                # a write refused for what was sent (HL7 0357 205, 204, 101-104): a NAK too
                "DuplicateKey": "nak", "UnknownKey": "nak", "InvalidValue": "nak"}
_pool_children: dict[str, Any] = {}


def _pool_wait(connection: str, seconds: float) -> None:
    child = _pool_children.get(connection)
    if child is None:
        child = _pool_children[connection] = metrics.POOL_WAIT.labels(connection)
    child.observe(seconds)


def _dropped(where: str, reason: str) -> None:
    metrics.DROPPED_VALUES.labels(where, reason).inc()


def _event(connection: str, name: str) -> None:
    metrics.MLLP_EVENTS.labels(connection, name).inc()


@contextmanager
def backend_span(connection: str, adapter: str, operation: str) -> Iterator[None]:
    """The span of one adapter call (tracing on only: callers check ``tracing.enabled``)."""
    with tracing.traced(f"{adapter} {operation}", {"ccg.connection": connection,
                                                   "ccg.adapter": adapter,
                                                   "ccg.operation": operation}):
        yield


def adapter_name(adapter: Any) -> str:
    name = getattr(adapter, "name", None)
    return name if isinstance(name, str) else type(adapter).__name__
