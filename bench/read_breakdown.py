"""Where a Patient read's time goes, gateway vs baseline, measured piece by piece (no profiler).

    python bench/read_breakdown.py                 # 10,000-patient demo PAS, CPU 0

Each line times one step of ``GET /STU3/Patient/{id}`` in isolation, in-process, over the
same rotating ids (median of ``--batches`` batches of ``--n`` calls, µs per call). The steps
nest (the whole-request lines include the others), so they do not add up. Gateway steps call
the gateway's own objects (SQL adapter internals included) read-only; baseline steps call
bench/baseline_app.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from _common import (
    DATA_DIR,
    Interference,
    apply_gateway_env,
    ensure_demo,
    machine,
    pin_self,
    versions,
    wait_quiet,
)


def timed(fn: Callable[[int], Any], n: int, batches: int) -> float:
    for i in range(min(n, 200)):
        fn(i)
    per = []
    for b in range(batches):
        t = time.perf_counter_ns()
        for i in range(n):
            fn(b * n + i)
        per.append((time.perf_counter_ns() - t) / n / 1000)
    return statistics.median(per)


async def atimed(fn: Callable[[int], Awaitable[Any]], n: int, batches: int) -> float:
    for i in range(min(n, 200)):
        await fn(i)
    per = []
    for b in range(batches):
        t = time.perf_counter_ns()
        for i in range(n):
            await fn(b * n + i)
        per.append((time.perf_counter_ns() - t) / n / 1000)
    return statistics.median(per)


def main() -> int:
    ap = argparse.ArgumentParser(description="per-step cost of a Patient read")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=500, help="calls per batch")
    ap.add_argument("--batches", type=int, default=7)
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = ap.parse_args()
    pinned = args.cpu >= 0 and pin_self(args.cpu)

    db, _ = ensure_demo(args.patients, args.data_dir)
    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_AUDIT_LOG=os.devnull)
    import anyio.to_thread
    import baseline_app
    import structlog
    from profile_inprocess import call
    from starlette.concurrency import run_in_threadpool

    from adapters.sql import _page_statement
    from gateway.app import build_app
    from gateway.settings import Settings

    app = build_app(Settings.from_env(log_level="info", paging_secret="bench"))
    provider = app.state.registry.get("Patient")
    adapter = provider.mapping.adapter
    prepared = provider.mapping.prepared
    engine = adapter.engine
    bapp = baseline_app.build(str(db.resolve()), "thread")
    bapp_inline = baseline_app.build(str(db.resolve()), "inline")
    bdb = baseline_app.Db(str(db.resolve()))
    lo = 100001
    count = args.patients

    def rid(i: int) -> int:
        return lo + (i * 7919) % count

    def query(i: int) -> Any:
        from adapters.base import Query

        return Query(provider._ids([str(rid(i))]), provider.key_sort, count=1)

    records = [adapter._fetch_sync(prepared, query(i)).records[0] for i in range(count)]
    rows = {}
    for i in range(count):
        r, _, ch = bdb.patients('p."PATNT_REFNO" IN (?)', [rid(i)], 1)
        rows[i] = (r[0], *ch[r[0][baseline_app.IDX["PATNT_REFNO"]]])
    resources = [provider.resource(r) for r in records]
    n, nb = args.n, args.batches
    lines: list[tuple[str, float, str]] = []
    wait_quiet()
    noise = Interference([])
    noise.__enter__()

    def add(label: str, us: float, side: str) -> None:
        lines.append((label, us, side))
        print(f"  {side:8} {label:62} {us:8.1f} µs", flush=True)

    # --- database layer
    def connect_only(_i: int) -> None:
        with engine.connect():
            pass

    add("engine.connect() + close (pool checkout; pre-ping if enabled)",
        timed(connect_only, n, nb), "gateway")

    def page_stmt(i: int) -> None:
        _page_statement(prepared, query(i), adapter.dialect)

    add("build main statement (_page_statement, incl. criteria)", timed(page_stmt, n, nb),
        "gateway")

    conn = engine.connect()

    def main_exec(i: int) -> None:
        stmt, params = _page_statement(prepared, query(i), adapter.dialect)
        result = conn.execute(stmt, params)
        keys = list(result.keys())
        [dict(zip(keys, row, strict=True)) for row in result.fetchall()]

    add("main statement: build + execute + rows as dicts", timed(main_exec, n, nb), "gateway")

    def children(i: int) -> None:
        adapter._attach_children(conn, prepared, [dict(records[i % count])])

    add("children: _attach_children (3 statements built + executed)", timed(children, n, nb),
        "gateway")
    conn.close()
    add("SqlAdapter._fetch_sync (all of the above)",
        timed(lambda i: adapter._fetch_sync(prepared, query(i)), n, nb), "gateway")

    raw = bdb.conn()
    add("sqlite3 SELECT 1 (what pool_pre_ping costs the database)",
        timed(lambda _i: raw.execute("SELECT 1").fetchall(), n, nb), "baseline")
    add("Db.patients: the same 4 statements, plain sqlite3",
        timed(lambda i: bdb.patients('p."PATNT_REFNO" IN (?)', [rid(i)], 1), n, nb), "baseline")

    # --- mapping and rendering
    add("Provider.resource (mapping)", timed(lambda i: provider.resource(records[i % count]),
                                             n, nb), "gateway")
    add("hand-written patient() (mapping)", timed(lambda i: baseline_app.patient(*rows[i % count]),
                                                  n, nb), "baseline")
    add("orjson.dumps of the resource", timed(lambda i: orjson.dumps(resources[i % count]),
                                              n, nb), "both")

    # --- logging
    devnull = open(os.devnull, "wb")  # noqa: SIM115
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(devnull.fileno(), 1)
    try:
        log = structlog.get_logger("gateway.request")
        log_us = timed(lambda i: log.info("request", method="GET", route="/STU3/{type}/{id}",
                                          status=200, duration_ms=1.23, adapter_ms=0.45), n, nb)

        # --- async: thread hop and whole requests
        async def asynchronous() -> dict[str, float]:
            out: dict[str, float] = {}
            async with app.router.lifespan_context(app):
                limiter = getattr(adapter, "_limiter", None)  # older adapters: anyio + limiter
                out["hop_anyio"] = await atimed(
                    lambda _i: anyio.to_thread.run_sync(int, limiter=limiter), n, nb)
                out["hop_adapter"] = await atimed(lambda _i: adapter._run(int), n, nb)
                out["hop_starlette"] = await atimed(lambda _i: run_in_threadpool(int), n, nb)
                out["fetch"] = await atimed(lambda i: adapter.fetch(prepared, query(i)), n, nb)
                out["read"] = await atimed(lambda i: provider.read(str(rid(i))), n, nb)
                out["asgi_gw"] = await atimed(lambda i: call(app, f"/STU3/Patient/{rid(i)}"),
                                              n, nb)
                logging.disable(logging.CRITICAL)
                out["asgi_bl"] = await atimed(lambda i: call(bapp, f"/STU3/Patient/{rid(i)}"),
                                              n, nb)
                out["asgi_bl_inline"] = await atimed(
                    lambda i: call(bapp_inline, f"/STU3/Patient/{rid(i)}"), n, nb)
            return out

        a = asyncio.run(asynchronous())
    finally:
        os.dup2(saved, 1)
    add("structlog request line (info, to /dev/null)", log_us, "gateway")
    add("thread hop: anyio.to_thread.run_sync(no-op)", a["hop_anyio"], "gateway")
    add("thread hop: SqlAdapter._run(no-op) (the adapter's own hop)", a["hop_adapter"],
        "gateway")
    add("thread hop: starlette run_in_threadpool(no-op)", a["hop_starlette"], "baseline")
    add("await SqlAdapter.fetch (hop + _fetch_sync)", a["fetch"], "gateway")
    add("await Provider.read (fetch + mapping)", a["read"], "gateway")
    add("whole request, ASGI in-process (no HTTP), log info", a["asgi_gw"], "gateway")
    add("whole request, ASGI in-process (no HTTP), thread mode", a["asgi_bl"], "baseline")
    add("whole request, ASGI in-process (no HTTP), inline mode", a["asgi_bl_inline"],
        "baseline")

    noise.__exit__(None, None, None)
    print()
    print(f"read_breakdown — {time.strftime('%Y-%m-%d %H:%M')} — {machine()}"
          f"{', pinned to CPU ' + str(args.cpu) if pinned else ''}; median of {nb} batches of "
          f"{n} calls; other processes used {noise.percent:.0f}% of the CPUs meanwhile")
    print(versions())
    print()
    print("| side | step of GET Patient/{id} | µs/call |")
    print("|---|---|---:|")
    for label, us, side in lines:
        print(f"| {side} | {label} | {us:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
