"""Time spent waiting on backends during the current request, for the request log line.

A module of its own so the outermost layer (gateway.middleware) can read it without
importing the providers it times.
"""

from __future__ import annotations

from contextvars import ContextVar

adapter_seconds: ContextVar[float] = ContextVar("adapter_seconds", default=0.0)
