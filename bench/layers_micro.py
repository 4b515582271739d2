"""What each ASGI layer of the gateway costs a request, timed in-process around a trivial
endpoint (no routing, no SQL, no mapping): the fixed toll every request pays before and
after the work it asked for.

    python bench/layers_micro.py                  # the app as ``serve`` builds it
    python bench/layers_micro.py --number 5000 --repeat 9

The app is built exactly as ``careconnect-gateway serve`` builds it (``build_app`` with the
environment's settings, the per-client limits off as in the speed rounds of http_bench.py,
``--shipped-limits`` for the defaults). Then the router at the centre is swapped for an
endpoint that answers ``200 {}`` at once, and the request is timed through:

* ``bare`` — the endpoint alone;
* ``starlette`` — Starlette's own two layers (ServerErrorMiddleware, ExceptionMiddleware), what
  the hand-written baseline of http_bench.py pays too;
* ``gateway`` — the full stack (Starlette's two and every gateway layer);
* each gateway layer alone around the endpoint (its cost when the others are not there).

Time is wall-clock per request, best of ``--repeat`` runs of ``--number`` requests
(best-of: what the code costs when the shared machine lets it run). The audit trail goes to a
temporary file, the request log lines to /dev/null.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import SPEED_ENV, apply_gateway_env, machine, versions

ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/fhir+json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def scope_for(path: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": [(b"host", b"gw")],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def time_app(app: ASGI, number: int) -> float:
    """µs per request of ``number`` requests, one after the other."""
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    path = "/STU3/Patient/100001"
    t0 = time.perf_counter()
    for _ in range(number):
        await app(scope_for(path), receive, send)
    elapsed = time.perf_counter() - t0
    bad = [s for s in statuses if s != 200]
    if bad:
        raise SystemExit(f"non-200 answers through the stack: {sorted(set(bad))}")
    return elapsed / number * 1e6


def stack(layers: list[Any], inner: ASGI) -> ASGI:
    app: Any = inner
    for cls, args, kwargs in reversed(layers):
        app = cls(app, *args, **kwargs)
    result: ASGI = app
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--number", type=int, default=3000, help="requests per timed run")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per variant (best kept)")
    ap.add_argument("--shipped-limits", action="store_true",
                    help="every per-client layer as shipped (the rates raised so that this "
                         "one client is never refused)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ccg-layers-"))
    extra = {"CCG_AUDIT_LOG": str(tmp / "audit.jsonl"), "CCG_LOG_LEVEL": "info",
             "CCG_PROGRESS": "false", "CCG_DATA_DIR": str(tmp)}
    apply_gateway_env(**extra)  # the bench defaults include SPEED_ENV: limits off
    if args.shipped_limits:
        for key in SPEED_ENV:
            os.environ.pop(key, None)
        # every layer there and doing its work, but the rates so high nothing is refused
        # (this bench is one client on one address)
        for key in ("CCG_RATE_LIMIT_PER_MINUTE", "CCG_SOURCE_RATE_LIMIT_PER_MINUTE"):
            os.environ[key] = str(10**12)
        for key in ("CCG_RATE_LIMIT_BURST", "CCG_SOURCE_RATE_LIMIT_BURST"):
            os.environ[key] = str(10**9)
    from starlette.middleware import Middleware
    from starlette.middleware.errors import ServerErrorMiddleware
    from starlette.middleware.exceptions import ExceptionMiddleware

    from gateway.app import build_app
    from gateway.settings import Settings

    # The request lines go to /dev/null (a file, as a server's log): the logging set-up
    # binds the stdout of the moment it runs.
    real_stdout = sys.stdout
    sink = sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - open for the process's life
    try:
        app = build_app(Settings.from_env())
    finally:
        sys.stdout = real_stdout
    from gateway.workers import tune_gc

    tune_gc()  # as serve does after building the app
    user = list(app.user_middleware)
    starlette_two_outer = [Middleware(ServerErrorMiddleware, handler=None, debug=False)]
    starlette_two_inner = [Middleware(ExceptionMiddleware, handlers={}, debug=False)]
    variants: dict[str, ASGI] = {
        "bare endpoint": endpoint,
        "starlette (baseline's layers)": stack([*starlette_two_outer, *starlette_two_inner],
                                               endpoint),
        "gateway (full stack)": stack([*starlette_two_outer, *user, *starlette_two_inner],
                                      endpoint),
    }
    for m in user:
        variants[f"  {getattr(m.cls, '__name__', str(m.cls))} alone"] = stack([m], endpoint)

    async def run() -> dict[str, float]:
        best: dict[str, float] = {}
        async with app.router.lifespan_context(app):
            for app_ in variants.values():  # warm-up
                await time_app(app_, 200)
            for _ in range(args.repeat):
                for name, app_ in variants.items():  # interleaved: drift spreads evenly
                    us = await time_app(app_, args.number)
                    best[name] = min(best.get(name, us), us)
        return best

    best = asyncio.run(run())
    sink.close()
    print(versions())
    print(machine())
    limits = ("as shipped (rates raised: nothing refused)" if args.shipped_limits
              else "off (SPEED_ENV)")
    print(f"per-client limits: {limits}; "
          f"best of {args.repeat} x {args.number} requests, wall-clock us per request")
    print()
    print("| variant | us/request | over the bare endpoint |")
    print("|---|---:|---:|")
    for name, us in best.items():
        print(f"| {name} | {us:.2f} | {us - best['bare endpoint']:+.2f} |")
    gw, base = best["gateway (full stack)"], best["starlette (baseline's layers)"]
    print(f"\nthe gateway's layers add {gw - base:.1f} us per request over Starlette's own two")
    return 0


if __name__ == "__main__":
    sys.exit(main())
