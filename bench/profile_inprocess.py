"""Where a gateway request's CPU time goes: the ASGI app driven in-process, under cProfile.

    python bench/profile_inprocess.py                  # scenario a (read), 10,000 patients
    python bench/profile_inprocess.py --scenario c --requests 300

No HTTP server and no HTTP client: each request is a bare ASGI call (scope, receive, send)
straight into the Starlette app that ``careconnect-gateway serve`` runs, so everything measured
is the gateway's own work (routing, middleware, logging, planning, SQL adapter, mapping,
rendering). The SQL adapter normally hands each query to a worker thread; here
``anyio.to_thread.run_sync`` is replaced (in this process only) by a direct call so that
cProfile, which follows one thread, sees the database work too (an adapter with its own
thread pool gets an inline executor instead). The thread hop itself is
therefore *not* in these figures (http_bench.py includes it).

Prints: µs per request without the profiler, then the profiled share of the main
components (inclusive time of named functions; they nest, so the shares do not add up to
100 %) and the top functions by own time. The .pstats file goes to bench/.data/profiles/.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import logging
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, apply_gateway_env, ensure_demo
from http_bench import workload

# (label, filename suffix, function name) — inclusive time of each
COMPONENTS = [
    ("whole request (Starlette app)", "starlette/applications.py", "__call__"),
    ("  RequestContext middleware (incl. everything below)", "gateway/middleware.py",
     "__call__"),
    ("    request log line (gateway.logging.info)", "gateway/logging.py", "info"),
    ("    request id (random_hex, from a block)", "gateway/middleware.py", "_request_id"),
    ("  routing (Router.__call__ → endpoint)", "starlette/routing.py", "handle"),
    ("    search planning (plan_search)", "gateway/plan.py", "plan_search"),
    ("    SQL adapter: fetch (pool, statements, children)", "adapters/sql.py", "_fetch_sync"),
    ("      engine.connect() incl. pool_pre_ping", "sqlalchemy/engine/base.py", "connect"),
    ("        pool_pre_ping (SELECT 1 per checkout)", "sqlalchemy/engine/default.py",
     "do_ping"),
    ("      main statement build (_page_statement)", "adapters/sql.py", "_page_statement"),
    ("      child queries (_attach_children)", "adapters/sql.py", "_attach_children"),
    ("      statements run (SqlAdapter._rows: cursor or SQLAlchemy)", "adapters/sql.py",
     "_rows"),
    ("        sqlite3 cursor.execute (the database itself)", "~", "<method 'execute' of "
     "'sqlite3.Cursor' objects>"),
    ("        sqlite3 cursor.fetchall (the rest of the scan)", "~", "<method 'fetchall' of "
     "'sqlite3.Cursor' objects>"),
    ("          ccg_fold() SQL function, per row (_py_fold)", "adapters/sql.py", "_py_fold"),
    ("    mapping: Provider.resource", "gateway/providers.py", "resource"),
    ("    paging link (Pager.token: AES-SIV)", "gateway/bundle.py", "token"),
    ("    $everything (Everything.run)", "gateway/operations/everything.py", "run"),
    ("      referenced resources (record.referenced_of)", "gateway/operations/record.py",
     "referenced_of"),
    ("      section plans (record.section_plan)", "gateway/operations/record.py",
     "section_plan"),
    ("      audit (note_operation)", "gateway/audit.py", "note_operation"),
    ("      bundle entries (bundle.entry)", "gateway/bundle.py", "entry"),
    ("    render (orjson)", "gateway/formats.py", "render"),
    ("    Last-Modified (http_date)", "gateway/routes.py", "http_date"),
]


class InlineWorkers:
    """adapters.threads.Workers, but each call runs at once in the calling thread (cProfile)."""

    async def run(self, _timeout: float, fn: Any, *args: Any) -> Any:
        return fn(*args)

    def close(self) -> None:
        pass


def make_scope(path: str) -> dict[str, Any]:
    raw_path, _, query = path.partition("?")
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": raw_path, "raw_path": raw_path.encode(),
        "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8090"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8090),
    }


async def call(app: Any, path: str) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(make_scope(path), receive, send)
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description="cProfile of in-process gateway requests")
    ap.add_argument("--scenario", choices=("a", "b", "c"), default="a")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--log-level", default="info",
                    help="gateway log level (info = one log line per request, as served)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--path", action="append",
                    help="profile this request path instead of a scenario (repeatable), e.g. "
                    "'/STU3/Patient/100001/$everything?_count=500'")
    args = ap.parse_args()

    db, _ = ensure_demo(args.patients, args.data_dir)
    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_AUDIT_LOG=os.devnull)
    import anyio.to_thread

    from gateway.app import build_app
    from gateway.settings import Settings

    async def inline(fn: Any, *a: Any, **_kw: Any) -> Any:
        return fn(*a)

    anyio.to_thread.run_sync = inline  # type: ignore[assignment]
    app = build_app(Settings.from_env(log_level=args.log_level, paging_secret="bench"))
    # adapters with their own worker threads (adapters.threads): run those calls inline too
    for provider in app.state.registry.sources():
        adapter = provider.mapping.adapter
        if hasattr(adapter, "_workers"):
            adapter._workers = InlineWorkers()
    # the request log goes to stdout: send it to /dev/null so the report stays readable
    devnull = open(os.devnull, "wb")  # noqa: SIM115
    sys.stdout.flush()
    saved = os.dup(1)
    paths = args.path or workload(db, 7, 1000)[args.scenario]
    logging.disable(logging.CRITICAL)

    async def run(n: int) -> None:
        for i in range(n):
            status = await call(app, paths[i % len(paths)])
            if status != 200:
                raise SystemExit(f"{paths[i % len(paths)]}: HTTP {status}")

    async def measure() -> tuple[float, cProfile.Profile]:
        async with app.router.lifespan_context(app):
            await run(min(200, args.requests))  # warm caches
            # As `serve` does after start-up (gateway/cli.py): otherwise a full collection
            # walking the loaded models lands on some request and skews the mean.
            gc.collect()
            gc.freeze()
            gc.set_threshold(10_000, 20, 100)
            t = time.perf_counter()
            await run(args.requests)
            per = (time.perf_counter() - t) / args.requests * 1e6
            prof = cProfile.Profile()
            prof.enable()
            await run(args.requests)
            prof.disable()
        return per, prof

    os.dup2(devnull.fileno(), 1)
    try:
        per, prof = asyncio.run(measure())
    finally:
        os.dup2(saved, 1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.data_dir / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    pfile = out_dir / f"inprocess-{args.scenario}-{stamp}.pstats"
    prof.dump_stats(pfile)

    st = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], Any] = st.stats  # type: ignore[attr-defined]
    total = max(ct for (f, _, fn), (_, _, _, ct, _) in raw.items()
                if f.endswith("starlette/applications.py") and fn == "__call__")
    print(f"scenario {args.scenario} ({paths[0]} ...), {args.patients:,} patients, "
          f"log level {args.log_level}")
    print(f"{per:,.0f} µs per request in-process without the profiler "
          f"(no HTTP, no thread hop); under cProfile the shares are:")
    print()
    print(f"| {'component (inclusive)':58} | share | µs/req (profiled) |")
    print(f"|{'-' * 60}|------:|------------------:|")
    for label, suffix, name in COMPONENTS:
        ct = 0.0
        for (f, _, fn), (_, _, _, cum, _) in raw.items():
            if fn == name and (suffix == "~" or f.endswith(suffix)):
                ct += cum
        print(f"| {label:58} | {100 * ct / total:4.1f}% | "
              f"{ct / args.requests * 1e6:17,.1f} |")
    print()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
    body = s.getvalue()
    print(body[body.find("   ncalls"):].rstrip())
    print(f"\npstats: {pfile}  (python -m pstats, snakeviz, ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
