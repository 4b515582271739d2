"""Deep paging on a 1,000,000-patient demo PAS: is page 500 as cheap as page 1?

    python bench/paging_bench.py                       # builds the 1M demo once (~2 min here)
    python bench/paging_bench.py --patients 100000 --pages 100

Builds (or reuses) the demo PAS, then drives the gateway's ASGI app in-process (httpx
``ASGITransport``: no sockets; the SQL adapter still runs its queries in worker threads) with
two broad searches, 20 per page:

* ``Patient?gender=female&birthdate=ge1900&_count=20``              (default order: the id)
* ``Patient?gender=female&birthdate=ge1900&_sort=family&_count=20``

For each: the ``next`` links are followed from page 1 to page ``--pages`` (every fetch timed;
the walk stops at ``--walk-budget`` seconds); then page 1 and that last page are fetched
alternately ``--repeats`` times each (so both see the same machine conditions).
Target: median(page 500) <= 2 x median(page 1).
The SQLite query plan (EXPLAIN QUERY PLAN) of the page-1 and page-500 statements is printed
as the evidence for whatever the timings show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    DATA_DIR,
    Interference,
    apply_gateway_env,
    ensure_demo,
    machine,
    versions,
    wait_quiet,
)

QUERIES = {
    "default order (id)": "/STU3/Patient?gender=female&birthdate=ge1900&_count=20",
    "_sort=family": "/STU3/Patient?gender=female&birthdate=ge1900&_sort=family&_count=20",
}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


async def run(args: argparse.Namespace, db: Path) -> list[dict[str, Any]]:
    import httpx

    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_AUDIT_LOG=os.devnull)
    from gateway.app import build_app
    from gateway.settings import Settings

    app = build_app(Settings.from_env(log_level="warning", paging_secret="bench"))
    adapter = app.state.registry.get("Patient").mapping.adapter
    engine = adapter.engine
    captured: list[tuple[str, Any]] = []
    # Reused statements run on the DBAPI cursor (no SQLAlchemy execute event): note the SQL
    # and values the adapter hands the driver, for EXPLAIN QUERY PLAN below.
    from adapters.sql import _Direct
    rows_of = adapter._rows

    def capture(conn: Any, stmt: Any, params: Any, reused: bool = True) -> Any:
        direct = _Direct.compile(stmt, engine.dialect)
        if direct is not None and 'FROM "PATIENTS"' in direct.sql:
            captured.append((direct.sql, tuple(direct.arguments(params))))
        return rows_of(conn, stmt, params, reused)

    adapter._rows = capture

    def plan_of(stmt: str, params: Any) -> list[str]:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + stmt, params).fetchall()
        return [r[-1] for r in rows]

    out = []
    transport = httpx.ASGITransport(app=app)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=transport, base_url="http://bench",
                                  timeout=600) as client):

        async def get(url: str) -> tuple[float, dict[str, Any]]:
            captured.clear()
            t = time.perf_counter()
            r = await client.get(url)
            elapsed = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"{url}: HTTP {r.status_code} {r.text[:300]}")
            return elapsed, r.json()

        def next_url(body: dict[str, Any]) -> str | None:
            for link in body.get("link", []):
                if link["relation"] == "next":
                    return str(link["url"]).removeprefix("http://bench")
            return None

        for name, url in QUERIES.items():
            print(f"\n{name}: {url}", flush=True)
            await get(url)  # warm-up (page cache, statement cache)
            t, body = await get(url)
            sql1 = captured[0]
            walk: list[float] = []
            page, nxt, started = 1, next_url(body), time.perf_counter()
            last_url = url
            ids_seen = {e["resource"]["id"] for e in body.get("entry", [])}
            dupes = 0
            with Interference([]) as walk_noise:
                while nxt and page < args.pages:
                    if time.perf_counter() - started > args.walk_budget:
                        print(f"  walk budget of {args.walk_budget:.0f} s used up at page {page}")
                        break
                    t, body = await get(nxt)
                    walk.append(t)
                    page += 1
                    last_url = nxt
                    for e in body.get("entry", []):
                        dupes += e["resource"]["id"] in ids_seen
                        ids_seen.add(e["resource"]["id"])
                    nxt = next_url(body)
                    if page % 50 == 0:
                        print(f"  page {page}: {ms(t)} ms (walk median so far "
                              f"{ms(statistics.median(walk))} ms)", flush=True)
            # page 1 and page N alternately, so both see the same machine conditions
            wait_quiet(args.quiet_threshold, args.quiet_wait)
            first: list[float] = []
            last: list[float] = []
            with Interference([]) as noise:
                for _ in range(args.repeats):
                    first.append((await get(url))[0])
                    last.append((await get(last_url))[0])
            sql_last = captured[0]
            print(f"  page 1 x{args.repeats}:   " + ", ".join(ms(t) for t in first) + " ms")
            print(f"  page {page} x{args.repeats}: " + ", ".join(ms(t) for t in last) + " ms"
                  f"   (others' CPU {noise.percent:.0f}%; during the walk "
                  f"{walk_noise.percent:.0f}%)")
            p1, pl = statistics.median(first), statistics.median(last)
            res = {
                "search": name, "url": url, "page1_ms": p1 * 1000, "page1_all_ms": first,
                "last_page": page, "last_ms": pl * 1000, "last_all_ms": last,
                "walk_median_ms": statistics.median(walk) * 1000 if walk else None,
                "walk_max_ms": max(walk) * 1000 if walk else None,
                "walk_seconds": sum(walk), "ratio": pl / p1, "duplicates": dupes,
                "distinct_ids": len(ids_seen), "others_cpu_pct": round(noise.percent, 1),
                "others_cpu_pct_walk": round(walk_noise.percent, 1),
                "plan_page1": plan_of(*sql1), "plan_last": plan_of(*sql_last),
                "sql_last_where": sql_last[0][sql_last[0].find("WHERE"):].replace("\n", " "),
            }
            out.append(res)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="page 1 vs page 500 on a large demo PAS")
    ap.add_argument("--patients", type=int, default=1_000_000)
    ap.add_argument("--pages", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--walk-budget", type=float, default=900.0,
                    help="seconds allowed for following next links, per search")
    ap.add_argument("--quiet-threshold", type=float, default=10.0,
                    help="wait until under this %% of all CPUs is busy before measuring")
    ap.add_argument("--quiet-wait", type=float, default=300.0)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = ap.parse_args()

    t0 = time.perf_counter()
    db, info = ensure_demo(args.patients, args.data_dir)
    if info["reused"]:
        built = (f"reused; it was built in {info['build_seconds']} s"
                 if info.get("build_seconds") else "reused (build time not recorded)")
    else:
        built = f"built now in {time.perf_counter() - t0:.1f} s"
    size = db.stat().st_size / 1e6
    print(f"paging_bench — {time.strftime('%Y-%m-%d %H:%M')} — {machine()}")
    print(versions())
    print(f"demo PAS: {db} ({args.patients:,} patients, {size:,.0f} MB) — {built}")

    results = asyncio.run(run(args, db))

    print()
    print("| search | page 1 median ms | page N | page N median ms | N/1 | walk median ms "
          "| walk max ms | target N/1 <= 2 | others' CPU % |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        print(f"| {r['search']} | {r['page1_ms']:,.1f} | {r['last_page']} | "
              f"{r['last_ms']:,.1f} | {r['ratio']:.2f} | "
              f"{(r['walk_median_ms'] or 0):,.1f} | {(r['walk_max_ms'] or 0):,.1f} | "
              f"{'MET' if r['ratio'] <= 2 and r['last_page'] >= args.pages else 'NOT MET'} | "
              f"{r['others_cpu_pct']:.0f} |")
    print()
    for r in results:
        print(f"{r['search']}: walked {r['last_page'] - 1} next links in "
              f"{r['walk_seconds']:.1f} s, {r['distinct_ids']:,} distinct patients, "
              f"{r['duplicates']} repeated")
        print(f"  page {r['last_page']} SQL: ... {r['sql_last_where'][:220]}")
        print(f"  plan page 1:  {' | '.join(r['plan_page1'])}")
        print(f"  plan page {r['last_page']}: {' | '.join(r['plan_last'])}")
    res_dir = args.data_dir / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"paging-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"patients": args.patients, "build": info, "results": results},
                               indent=2, default=str))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
