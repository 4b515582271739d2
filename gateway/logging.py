"""structlog set-up: JSON lines on stdout, one per request, plus an error stream.

PHI never goes to info level: request lines carry the route template, status and timings,
never the query string, bodies or resource content.
"""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure(level: str = "info") -> None:
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.BytesLoggerFactory(file=sys.stdout.buffer),
        # Not cached: a cached logger keeps the level and stream of the first configure().
        cache_logger_on_first_use=False,
    )
