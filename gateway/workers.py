"""Serving: one process, or N worker processes sharing one listening socket (uvicorn's
supervisor), each a full gateway; graceful shutdown with a readiness drain.

With ``--workers N`` (N > 1):

* the parent checks the configuration once (mappings, authentication; builds the demo PAS and
  the development key) so a bad configuration fails before any worker starts, then passes the
  settings to the workers as ``CCG_*`` variables;
* a paging secret is generated once for all workers when none is configured (a link from one
  worker must open on another);
* Prometheus metrics go through files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary
  directory unless one is set) so ``/metrics`` reports the sum over the workers;
* rate limits and the ``jti`` replay cache are per process unless ``CCG_REDIS_URL`` is set;
* ``SIGHUP`` to the parent reloads the mappings in every worker (``Supervisor``): each re-reads,
  checks and swaps in place (``gateway.reload``), or keeps its old mappings on a problem —
  uvicorn's own SIGHUP would restart the workers instead, and a worker started on a bad
  mapping directory would stop the whole service.

On SIGTERM or SIGINT a process first drains (``gateway.lifecycle``): ``/_ready`` answers 503
for ``CCG_SHUTDOWN_DRAIN_SECONDS`` while requests are still served, then uvicorn stops
accepting and waits up to ``CCG_SHUTDOWN_TIMEOUT`` seconds for requests in flight. A second
signal stops at once.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import structlog

from gateway.settings import Settings

log = structlog.get_logger("gateway.workers")

_ENV_OVERRIDES = ("mappings_dir", "demo_patients", "base_path", "log_level", "data_dir",
                  "paging_secret")


def tune_gc() -> None:
    # Everything built so far (fhir.resources' models, mappings, code maps) lives as long as
    # the process, yet every full collection walked it: under load those took 9% of the time,
    # up to 36 ms each (the p99 of a read). Frozen, the collector leaves it alone.
    gc.collect()
    gc.freeze()
    # A search page allocates thousands of short-lived dicts; at the default 700 the young
    # generation was collected ~200 times a second under load (GC 184 ms in 8 s of family
    # searches; 45 ms at 10,000). Nearly all of it is freed by reference counting anyway.
    gc.set_threshold(10_000, 20, 100)


def install_drain(drain_seconds: float) -> None:
    """Wrap the server's SIGTERM/SIGINT handlers: drain first (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    from gateway import lifecycle

    for sig in (signal.SIGTERM, signal.SIGINT):
        original = signal.getsignal(sig)
        if not callable(original):
            continue

        def handler(signum: int, frame: Any, original: Any = original) -> None:
            if lifecycle.draining() or drain_seconds <= 0:
                lifecycle.start_draining()
                original(signum, frame)
                return
            lifecycle.start_draining()
            print(f"draining: not ready for {drain_seconds:g} s, then stopping",
                  file=sys.stderr, flush=True)
            timer = threading.Timer(drain_seconds, original, (signum, frame))
            timer.daemon = True
            timer.start()

        signal.signal(sig, handler)


def worker_app() -> Any:
    """The uvicorn factory each worker process calls (settings from ``CCG_*``)."""
    from gateway.app import build_app

    settings = Settings.from_env(progress=False)
    app = build_app(settings)
    tune_gc()
    install_drain(settings.shutdown_drain_seconds)
    return app


def prepare_multiprocess(settings: Settings) -> Settings:
    """Before anything imports ``gateway.metrics``: what every worker must share."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("*.db"):  # a previous run's values
            stale.unlink(missing_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ccg-metrics-")
    if not settings.paging_secret:
        from dataclasses import replace

        settings = replace(settings, paging_secret=secrets.token_urlsafe(32))
    for name in _ENV_OVERRIDES:
        os.environ[f"CCG_{name.upper()}"] = str(getattr(settings, name))
    return settings


def serve(app: Any, settings: Settings, *, proxy_headers: bool, tls: dict[str, Any]) -> None:
    """Serve ``app`` in this process, or (``settings.workers`` > 1) in worker processes."""
    import uvicorn

    from gateway import metrics

    if settings.metrics and settings.metrics_port:
        metrics.serve_separately(settings.metrics_host, settings.metrics_port)
    from gateway.server import uvicorn_options

    common: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_config": None,
        "access_log": False, "server_header": False, "proxy_headers": proxy_headers,
        "timeout_graceful_shutdown": settings.shutdown_timeout, **tls,
        **uvicorn_options(settings.header_timeout_seconds, tls.get("http")),
    }
    if settings.workers <= 1:
        def single() -> Any:
            install_drain(settings.shutdown_drain_seconds)
            return app

        # workers=1 given: uvicorn would otherwise read WEB_CONCURRENCY (the gateway does not)
        uvicorn.Server(uvicorn.Config(single, factory=True, workers=1, **common)).run()
        return
    # The workers are spawned with a pickled config: a class made at run time (the header
    # deadline's protocol) cannot travel, so each worker builds its own by name.
    common["http"] = "gateway.workers:HttpProtocol"
    config = uvicorn.Config("gateway.workers:worker_app", factory=True,
                            workers=settings.workers, **common)
    sock = config.bind_socket()
    _supervisor_class()(config, sockets=[sock]).run()


def _supervisor_class() -> Any:
    from uvicorn.supervisors.multiprocess import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's supervisor, with SIGHUP forwarded to the workers (a reload in place).

        A worker still starting has no SIGHUP handler yet (the default action would kill
        it): it is signalled once it reports ready, after its start-up has read the mappings.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.pending_hup: set[int] = set()

        def handle_hup(self) -> None:
            pids = [p.pid for p in self.processes if p.pid is not None]
            self.pending_hup.update(pids)
            log.info("mappings_reload_requested", signal="SIGHUP", workers=pids)
            self.forward_hup()

        def forward_hup(self) -> None:
            for process in self.processes:
                pid = process.pid
                if pid is None or pid not in self.pending_hup:
                    continue
                if not process.process.is_alive():
                    self.pending_hup.discard(pid)  # replaced: its successor reads afresh
                elif process.is_ready(timeout=1):
                    self.pending_hup.discard(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)
            self.pending_hup &= {p.pid for p in self.processes}

        def keep_subprocess_alive(self) -> None:
            super().keep_subprocess_alive()
            if self.pending_hup and not self.should_exit.is_set():
                self.forward_hup()

    return Supervisor


_http_protocol: Any = None


def __getattr__(name: str) -> Any:
    """``HttpProtocol``: uvicorn's HTTP protocol with the header deadline (and mTLS's hook),
    built in a worker from its ``CCG_*`` settings (uvicorn imports it by name)."""
    global _http_protocol
    if name != "HttpProtocol":
        raise AttributeError(name)
    if _http_protocol is None:
        from gateway.auth.serve import uvicorn_tls_options
        from gateway.server import uvicorn_options

        settings = Settings.from_env(progress=False)
        _http_protocol = uvicorn_options(settings.header_timeout_seconds,
                                         uvicorn_tls_options(settings).get("http"))["http"]
    return _http_protocol
