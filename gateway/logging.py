"""structlog set-up: JSON lines on stdout (the current one: see ``StdoutLogger``), one per
request, plus an error stream.

PHI never goes to info level: request lines carry the route template, status and timings,
never the query string, bodies or resource content.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

current_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
"""The id of the request being served (set by ``RequestContext``): on every line logged
while it is. A plain ContextVar: cheaper per request than binding a structlog context var."""


def _add_request_id(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    rid = current_request_id.get()
    if rid is not None:
        event_dict.setdefault("request_id", rid)
    return event_dict


# structlog's own context variables (``bind_contextvars``), made when something is first bound;
# None if a structlog release keeps them elsewhere (then every line merges, as before).
_BOUND_VARS: dict[str, Any] | None = getattr(structlog.contextvars, "_CONTEXT_VARS", None)


def _merge_contextvars(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """``structlog.contextvars.merge_contextvars``, skipped while nothing was ever bound.

    structlog's walks every context variable of the context, not only its own: with the
    ~15 a request sets (request id, audit, limits, compartment, mapping generation, asyncio's)
    that was ~3.5 µs per log line, on every request, to find nothing. Once anything is bound
    (a deployment's own processors, tests), every line merges again."""
    if _BOUND_VARS is not None and not _BOUND_VARS:
        return event_dict
    return structlog.contextvars.merge_contextvars(logger, method, event_dict)


_second: tuple[int, str] = (-1, "")


def utc_now() -> tuple[str, int]:
    """Now in UTC as (``YYYY-MM-DDTHH:MM:SS``, microseconds): what ``datetime.now(UTC)``
    reads (the same clock, floored to the microsecond), with the formatted second reused
    while it lasts; formatting a datetime per line was a measurable part of a request."""
    global _second
    ns = time.time_ns()
    sec = ns // 1_000_000_000
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return cached[1], ns % 1_000_000_000 // 1000


def _timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """``structlog.processors.TimeStamper(fmt="iso", utc=True)``, to the byte."""
    text, us = utc_now()
    event_dict["timestamp"] = f"{text}.{us:06d}Z" if us else f"{text}Z"
    return event_dict


def _fallback(obj: Any) -> Any:
    """What structlog's JSONRenderer does with a value JSON cannot hold."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def render_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> bytes:
    """``structlog.processors.JSONRenderer(serializer=orjson.dumps)``, called directly."""
    return orjson.dumps(event_dict, default=_fallback)


class StdoutLogger:
    """``structlog.BytesLogger`` on the stdout of the moment: ``sys.stdout`` is looked up at
    each line, as the audit sink does with its streams.

    A logger holding the stream it was configured with keeps writing there after the process
    replaces ``sys.stdout`` (a test's fd capture, a supervisor's redirect): to a stream nobody
    reads any more, or, once that is closed, into ``ValueError: write to closed file`` raised
    from the request layer — and the request's line is lost. One lock for every thread.
    """

    _lock = threading.Lock()

    def msg(self, message: bytes) -> None:
        stream: Any = sys.stdout
        if stream is None:  # no stdout at all (pythonw): nowhere to write
            return
        buffer = getattr(stream, "buffer", None)
        with self._lock:
            if buffer is not None:
                buffer.write(message + b"\n")
                buffer.flush()
            else:  # a text-only stream (io.StringIO)
                stream.write(message.decode("utf-8") + "\n")
                stream.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_STDOUT = StdoutLogger()


def _stdout_logger(*_args: Any) -> StdoutLogger:
    """The structlog logger factory: one logger for every name, writing to the current stdout."""
    return _STDOUT


class _Pipeline:
    """What ``configure`` installed, so ``info`` can run those very processors directly.

    The configuration is not cached (see ``configure``), so every ``log.info`` through a
    module-level logger builds a new bound logger and a new ``BytesLogger``: several µs per
    call, paid on every request for the request line. ``info`` skips only that construction.
    """

    def __init__(self, processors: list[Any], factory: Any, wrapper: Any, level: int) -> None:
        self.processors = processors
        self.snapshot = list(processors)
        self.factory = factory
        self.wrapper = wrapper
        self.level = level
        self.logger = _STDOUT

    def active(self) -> bool:
        """Still the configuration in force? (Not after another ``structlog.configure``, and
        not inside ``structlog.testing.capture_logs``, which edits the list in place.)"""
        cfg = structlog.get_config()
        return (cfg["processors"] is self.processors and cfg["logger_factory"] is self.factory
                and cfg["wrapper_class"] is self.wrapper and self.processors == self.snapshot)


_pipeline: _Pipeline | None = None


def configure(level: str = "info", extra: tuple[Any, ...] = ()) -> None:
    """``extra``: processors run right after the request id (tracing's trace id)."""
    global _pipeline
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    processors: list[Any] = [
        _add_request_id,
        *extra,
        _merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
        render_json,
    ]
    wrapper = structlog.make_filtering_bound_logger(lvl)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=_stdout_logger,
        # Not cached: a cached logger keeps the level of the first configure().
        cache_logger_on_first_use=False,
    )
    _pipeline = _Pipeline(processors, _stdout_logger, wrapper, lvl)


def info(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """``logger.info(event, **fields)``: the same line (same processors, same order, same
    stream), cheaper while ``configure``'s set-up is in force; otherwise ``logger`` itself.

    ``fields`` is consumed (it becomes the event dict).
    """
    pipe = _pipeline
    if pipe is None or not pipe.active():
        logger.info(event, **fields)
        return
    if pipe.level > logging.INFO:  # as the filtering bound logger: below the level, nothing
        return
    event_dict: Any = fields
    event_dict["event"] = event
    try:
        for processor in pipe.snapshot:
            event_dict = processor(pipe.logger, "info", event_dict)
    except structlog.DropEvent:
        return
    pipe.logger.msg(event_dict)


class DebugLog:
    """``structlog.get_logger(name).debug``, not even called when the set-up drops it.

    structlog is configured without caching loggers (a cached one would keep the first
    set-up's level and stream), so every call through the lazy proxy binds a new logger,
    ~2 µs, only for a filtering logger to drop the line. For debug lines on hot paths (an
    unmapped code met per resource) checking the configured class first costs ~0.2 µs.
    """

    # structlog's level-filtering classes above debug (one class per level, made once).
    _DROPPING = frozenset(structlog.make_filtering_bound_logger(level)
                          for level in (logging.INFO, logging.WARNING, logging.ERROR,
                                        logging.CRITICAL))

    def __init__(self, name: str) -> None:
        self._proxy = structlog.get_logger(name)

    def debug(self, event: str, **kw: Any) -> None:
        if structlog.get_config()["wrapper_class"] not in self._DROPPING:
            self._proxy.debug(event, **kw)
