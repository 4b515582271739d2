"""What metrics and (switched-off) tracing add to one request, piece by piece, timed in
isolation: on a shared machine the end-to-end figures (observability_micro.py, scale_bench.py)
move by more than the few µs measured here, so the pieces are timed alone (best of
``--repeat`` runs of ``--number`` calls), beside the code they replaced.

    python bench/hotpath_micro.py

Per Patient read the request path runs: one ``observe_request`` (metrics), one backend call
wrapper (``_backend_call``: metrics + the tracing check), one pool-wait observation (the
read's SQL call; a coalesced batch shares one), one ``tracing.traced`` around the
audit write (a shared no-op while off), and the adapters' hook checks (one attribute read
per SQL statement). The "before" wrapper is the one at 693a6f2, copied below.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters import observe
from adapters.base import BackendError, UnsupportedCriteria
from gateway import metrics, providers, tracing

_before_seconds: ContextVar[float] = ContextVar("before_seconds", default=0.0)


@contextmanager
def before_backend_call() -> Iterator[None]:
    """``gateway.providers._backend_call`` as it was before this work (693a6f2)."""
    started = time.perf_counter()
    try:
        yield
    except (BackendError, UnsupportedCriteria) as exc:
        raise providers.translate_backend_error(exc) from exc
    finally:
        _before_seconds.set(_before_seconds.get() + time.perf_counter() - started)


class _Adapter:
    name = "sql"


class _Mapping:
    connection = "pas"
    adapter = _Adapter()


class _Provider:
    mapping = _Mapping()


class _Route:
    path_format = "/STU3/{type}/{id}"


def best(fn: Any, number: int, repeat: int) -> float:
    # this thread's CPU time, not wall time: on a shared machine being descheduled would
    # count otherwise
    return min(timeit.repeat(fn, number=number, repeat=repeat,
                             timer=time.thread_time)) / number * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--number", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    n, r = args.number, args.repeat
    assert not tracing.enabled()
    provider: Any = _Provider()
    scope = {"route": _Route(), "path_params": {"type": "Patient", "id": "100001"},
             "method": "GET"}
    metrics.set_resource_types(["Patient"])

    def old_call() -> None:
        with before_backend_call():
            pass

    def new_call() -> None:
        with providers._backend_call(provider, "fetch"):
            pass

    def traced_off() -> None:
        with tracing.traced("audit write", {"ccg.audit.records": 1}):
            pass

    def hook_check() -> None:
        if observe.statement is not None:
            raise AssertionError

    rows = []
    metrics.set_recording(False)
    rows.append(("backend call wrapper, before (693a6f2)", best(old_call, n, r)))
    rows.append(("backend call wrapper, now, metrics off, traces off", best(new_call, n, r)))
    metrics.set_recording(True)
    rows.append(("backend call wrapper, now, metrics on, traces off", best(new_call, n, r)))
    rows.append(("observe_request (metrics on)", best(
        lambda: metrics.observe_request(scope, 200, 0.001), n, r)))
    from gateway import observability

    observability.install(["Patient"], "")
    pool_wait = observe.pool_wait
    assert pool_wait is not None
    rows.append(("pool-wait observation per SQL call (metrics on)",
                 best(lambda: pool_wait("pas", 0.0001), n, r)))
    rows.append(("tracing.traced(...) around the audit write, traces off",
                 best(traced_off, n, r)))
    rows.append(("adapter hook check per SQL statement, traces off", best(hook_check, n, r)))
    before = rows[0][1]
    off_added = (rows[1][1] - before) + rows[5][1] + 4 * rows[6][1]
    on_added = (rows[2][1] - before) + rows[3][1] + rows[4][1] + rows[5][1] + 4 * rows[6][1]
    print(f"best of {r} x {n:,} calls each (µs of thread CPU time per call)\n")
    print("| piece | µs |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.3f} |")
    print(f"| **added per read, traces off and metrics off** (wrapper delta + traced + "
          f"4 hook checks) | {off_added:.2f} |")
    print(f"| **added per read, as shipped** (metrics on, traces off; one pool wait) | "
          f"{on_added:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
