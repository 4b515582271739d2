"""Process lifecycle: draining before a graceful shutdown.

On SIGTERM/SIGINT the server (``gateway.workers.GatewayServer``) first marks this process
draining: ``/_ready`` answers 503 so the load balancer or Kubernetes stops sending new
requests, while everything keeps being served for ``CCG_SHUTDOWN_DRAIN_SECONDS``. Then uvicorn
stops accepting connections and waits (up to ``CCG_SHUTDOWN_TIMEOUT`` seconds) for the
requests in flight — and the MLLP exchanges and SQL statements they wait on — to finish.

The other long-running commands (``adt-listener``, ``pas-simulator``) run under
``run_until_stopped``: the same signals, the same bound, the same second-signal rule.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import structlog

_draining = threading.Event()

STOP_MARGIN = 5.0
"""Seconds past a stop's bound (or after a second signal) before the process exits anyway,
status 1: for a thread that does not return (a store that stopped answering)."""


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


def run_until_stopped(main: Callable[[asyncio.Event], Awaitable[None]], *, name: str,
                      timeout: float) -> int:
    """Run ``main(stop)`` in an event loop until it returns; the exit status (0).

    SIGTERM (what systemd, Docker and Kubernetes send) or SIGINT sets ``stop``: ``main`` then
    finishes the work in flight, for at most ``timeout`` seconds, and returns. A second
    signal cancels ``main``, which stops at once (whatever it interrupts must be safe to
    interrupt). A process still alive ``STOP_MARGIN`` seconds past either bound exits with
    status 1. SIGINT inherited ignored (a background job, nohup) stays ignored, as Python
    leaves it. One info line (``<name>_stopped``) says which signal and how long it took.
    """
    return asyncio.run(_supervise(main, name, timeout))


async def _supervise(main: Callable[[asyncio.Event], Awaitable[None]], name: str,
                     timeout: float) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.ensure_future(main(stop))
    signals: list[str] = []
    asked = 0.0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal asked
        signals.append(sig.name)
        if len(signals) == 1:
            asked = time.monotonic()
            print(f"{sig.name}: stopping ({name}): finishing the work in flight, at most "
                  f"{timeout:g} s; a second signal stops at once", file=sys.stderr, flush=True)
            stop.set()
            _exit_after(timeout + STOP_MARGIN, name)
        elif len(signals) == 2:
            task.cancel()
            _exit_after(STOP_MARGIN, name)

    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        handled.append(signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await task
    except asyncio.CancelledError:
        if len(signals) < 2:  # not ours
            raise
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    structlog.get_logger("gateway.lifecycle").info(
        f"{name}_stopped", signal=signals[0] if signals else None,
        seconds=round(time.monotonic() - asked, 3) if signals else None,
        at_once=len(signals) > 1)
    return 0


def _exit_after(seconds: float, name: str) -> None:
    """Exit (status 1) in ``seconds`` unless the process has ended by then; a thread, so a
    blocked event loop or a thread that does not return cannot hold the process."""
    def hard_exit() -> None:
        structlog.get_logger("gateway.lifecycle").error(f"{name}_stop_timed_out",
                                                        seconds=seconds)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()
