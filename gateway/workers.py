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
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from gateway.retry import Backoff
from gateway.settings import Settings
from gateway.worker_status import STATUS_ENV

log = structlog.get_logger("gateway.workers")
STARTUP_FAILURE = 3
"""The exit status when the service cannot start (uvicorn's, for a worker)."""

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
    """The uvicorn factory each worker process calls (settings from ``CCG_*``). A worker that
    cannot build its app (the mappings on disk changed since the parent checked them, a
    resource is exhausted) logs why and exits with ``STARTUP_FAILURE``: the supervisor keeps
    the other workers serving and tries again later."""
    from gateway import logging as gateway_logging
    from gateway.app import build_app
    from gateway.auth.errors import AuthConfigError
    from gateway.mapping.loader import MappingError

    settings = Settings.from_env(progress=False)
    gateway_logging.configure(settings.log_level)
    try:
        app = build_app(settings)
    except MappingError as exc:  # file:line: problem — configuration, never request data
        log.error("worker_cannot_start", pid=os.getpid(), error="MappingError",
                  problems=[str(p) for p in exc.problems[:20]])
        sys.exit(STARTUP_FAILURE)
    except (AuthConfigError, OSError) as exc:
        log.error("worker_cannot_start", pid=os.getpid(), error=type(exc).__name__,
                  detail=str(exc)[:300])
        sys.exit(STARTUP_FAILURE)
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
    os.environ[STATUS_ENV] = str(Path(tempfile.mkdtemp(prefix="ccg-workers-")) / "workers.json")
    return settings


def serve(app: Any, settings: Settings, *, proxy_headers: bool, tls: dict[str, Any]) -> int:
    """Serve ``app`` in this process, or (``settings.workers`` > 1) in worker processes; the
    exit status (``STARTUP_FAILURE`` when every worker failed to start)."""
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
        return 0
    # The workers are spawned with a pickled config: a class made at run time (the header
    # deadline's protocol) cannot travel, so each worker builds its own by name.
    common["http"] = "gateway.workers:HttpProtocol"
    config = uvicorn.Config("gateway.workers:worker_app", factory=True,
                            workers=settings.workers, **common)
    sock = config.bind_socket()
    status = os.environ.get(STATUS_ENV)
    supervisor = _supervisor_class()(
        config, sockets=[sock], status_file=Path(status) if status else None,
        retry=Backoff(settings.worker_restart_seconds, settings.worker_restart_max_seconds, 0))
    try:
        supervisor.run()
    finally:
        if status:
            shutil.rmtree(Path(status).parent, ignore_errors=True)
    return STARTUP_FAILURE if supervisor.failed else 0


def _supervisor_class() -> Any:
    from uvicorn.supervisors.multiprocess import Multiprocess, Process

    from gateway import metrics

    class Supervisor(Multiprocess):
        """uvicorn's supervisor, with SIGHUP forwarded to the workers (a reload in place),
        and a worker that fails to start retried with backoff while the others serve.

        A worker still starting has no SIGHUP handler yet (the default action would kill
        it): it is signalled once it reports ready, after its start-up has read the mappings.

        uvicorn stops the whole service when a replacement worker fails to start (a bad
        mapping directory left on disk, a resource exhausted): here the workers still serving
        go on, the failure is logged (no request data: slot, pid, exit code), counted
        (``ccg_worker_start_failures_total``, ``ccg_workers{state}``), reported by every
        worker's ``/_health`` (``warn``), and the slot is started again after a delay
        (``retry``: doubled each time, capped). Only when no worker is serving or starting
        any more does the parent stop (``failed``), so that the service manager restarts it
        rather than leave a listening socket nobody answers.
        """

        def __init__(self, *args: Any, retry: Backoff, status_file: Path | None = None,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.pending_hup: set[int] = set()
            self.retry = retry
            self.status_file = status_file
            self.serving: set[int] = set()
            """Pids of workers that reported ready."""
            self.waiting: dict[int, float] = {}
            """Slot → when (monotonic) it is started again, after its worker failed to start."""
            self.failures: dict[int, int] = {}
            """Slot → its failed starts in a row."""
            self.start_failures = 0
            self.failed = False
            self._status: dict[str, Any] = {}

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
            if self.should_exit.is_set():
                return
            now = time.monotonic()
            for idx in [i for i in self.waiting if i >= len(self.processes)]:  # SIGTTOU
                del self.waiting[idx]
            for idx, process in enumerate(self.processes):
                if idx in self.waiting:
                    if now >= self.waiting[idx]:
                        del self.waiting[idx]
                        self._start(idx, again=True)
                    continue
                if self._alive(process):
                    continue
                process.kill()  # hung, or gone: make sure
                process.join()
                pid, code = process.pid, process.exitcode
                was_serving = pid in self.serving
                self.serving.discard(pid or 0)
                if pid is not None:
                    metrics.worker_exited(pid)
                if self.should_exit.is_set():
                    return
                if was_serving:  # it served, then died: replaced at once (as uvicorn does)
                    log.warning("worker_died", slot=idx, pid=pid, exitcode=code)
                    self._start(idx)
                    continue
                self._start_failed(idx, pid, code, now)
                if self.failed:
                    return
            self._publish()
            if self.pending_hup and not self.should_exit.is_set():
                self.forward_hup()

        def _alive(self, process: Process) -> bool:
            """Alive and answering; a worker's first ready answer marks it serving."""
            if not process.process.is_alive():
                return False
            timeout = self.config.timeout_worker_healthcheck
            if process.pid in self.serving:
                return process.ping(timeout)
            if process.is_ready(timeout):
                self.serving.add(process.pid or 0)
                idx = self.processes.index(process)
                if self.failures.pop(idx, 0):
                    log.info("worker_recovered", slot=idx, pid=process.pid)
                return True
            return process.ping(timeout)  # still starting (or hung: no answer)

        def _start(self, idx: int, again: bool = False) -> None:
            process = Process(self.config, self.sockets)
            process.start()
            self.processes[idx] = process
            if again:
                log.info("worker_restarting", slot=idx, pid=process.pid,
                         attempt=self.failures.get(idx, 0) + 1)

        def _start_failed(self, idx: int, pid: int | None, code: int | None,
                          now: float) -> None:
            attempts = self.failures[idx] = self.failures.get(idx, 0) + 1
            self.start_failures += 1
            metrics.WORKER_START_FAILURES.inc()
            others = [p for i, p in enumerate(self.processes)
                      if i != idx and i not in self.waiting and p.process.is_alive()]
            if not others:  # nothing serves, nothing is starting: stop, loudly
                log.error("workers_failed_to_start", slot=idx, pid=pid, exitcode=code,
                          attempts=attempts, action="stopping: no worker is serving")
                self.failed = True
                self.should_exit.set()
                self._publish()
                return
            delay = self.retry.delay(attempts)
            self.waiting[idx] = now + delay
            log.error("worker_start_failed", slot=idx, pid=pid, exitcode=code,
                      attempts=attempts, retry_in_seconds=round(delay, 1),
                      serving=len(self.serving))

        def _publish(self) -> None:
            """The workers' states: the gauges, and the file every worker's /_health reads."""
            alive = {p.pid for i, p in enumerate(self.processes) if i not in self.waiting}
            status = {"workers": len(self.processes),
                      "serving": len(self.serving & alive),
                      "starting": len(alive - self.serving),
                      "restart_pending": len(self.waiting),
                      "start_failures": self.start_failures}
            if status == self._status:
                return
            self._status = status
            for state in ("serving", "starting", "restart_pending"):
                metrics.WORKERS.labels(state).set(status[state])
            if self.status_file is not None:
                tmp = self.status_file.with_suffix(".tmp")
                try:
                    tmp.write_text(json.dumps(status), encoding="utf-8")
                    os.replace(tmp, self.status_file)
                except OSError as exc:  # the supervisor must go on: /_health is stale then
                    log.warning("workers_status_not_written", error=type(exc).__name__)

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
