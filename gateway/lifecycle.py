"""Process lifecycle: draining before a graceful shutdown.

On SIGTERM/SIGINT the server (``gateway.workers.GatewayServer``) first marks this process
draining: ``/_ready`` answers 503 so the load balancer or Kubernetes stops sending new
requests, while everything keeps being served for ``CCG_SHUTDOWN_DRAIN_SECONDS``. Then uvicorn
stops accepting connections and waits (up to ``CCG_SHUTDOWN_TIMEOUT`` seconds) for the
requests in flight — and the MLLP exchanges and SQL statements they wait on — to finish.
"""

from __future__ import annotations

import threading

_draining = threading.Event()


def draining() -> bool:
    return _draining.is_set()


def start_draining() -> None:
    from gateway import metrics

    _draining.set()
    metrics.SHUTTING_DOWN.set(1)


def reset() -> None:
    """Back to serving (tests that build several apps in one process)."""
    from gateway import metrics

    _draining.clear()
    metrics.SHUTTING_DOWN.set(0)
