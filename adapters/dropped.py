"""Source values that could not be mapped: logged (without PHI) and counted, never silent.

A clinical value the gateway reads but cannot turn into FHIR (a date of death ``20241310``,
a visit without its spell number) is left out of the resource — and :func:`note` is called,
so that leaving it out is visible: one warning log line naming *where* (a storage type, a
mapping field, a segment) and *why*, never the value, and one count in :data:`COUNTS`.

:data:`COUNTS` is the one place to read them: ``{(where, reason): count}`` since start,
ready to be exported as a Prometheus counter (``ccg_dropped_values_total{where, reason}``).
"""

from __future__ import annotations

import threading
from collections import Counter

import structlog

from adapters import observe

__all__ = ["COUNTS", "note", "snapshot"]

log = structlog.get_logger("adapters.dropped")

COUNTS: Counter[tuple[str, str]] = Counter()
_lock = threading.Lock()  # storage converters also run in worker threads


def note(where: str, reason: str) -> None:
    """Count one value left out at ``where`` (no PHI: a type, field path or segment name) for
    ``reason`` (a short fixed phrase), and log it the first time for each (where, reason);
    after that the count says how often (this runs per value, on hot paths)."""
    key = (where, reason)
    with _lock:
        COUNTS[key] += 1
        first = COUNTS[key] == 1
    hook = observe.dropped
    if hook is not None:  # ccg_dropped_values_total (gateway.metrics)
        hook(where, reason)
    if first:
        log.warning("value_not_mapped", where=where, reason=reason,
                    hint="counted in adapters.dropped.COUNTS from now on")


def snapshot() -> dict[tuple[str, str], int]:
    with _lock:
        return dict(COUNTS)
