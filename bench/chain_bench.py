"""Chained search cost, in-process (ASGI, no sockets), against what a client does without it.

Scenarios, interleaved round by round on the same app and database:

* ``chain``    ``Encounter?patient.identifier=<nhs>|N`` — one request, one statement
* ``two-step`` ``Patient?identifier=<nhs>|N`` then ``Encounter?patient=Patient/<id>`` — the
  baseline: the two requests a client needs without chaining
* ``direct``   ``Encounter?patient=Patient/<id>`` alone — the floor (the id already known)

For each: p50 / p99 per request and SQL statements per request (counted below SQLAlchemy,
with SQLite's trace callback). NHS numbers are those of patients with spells, cycled.

    python bench/chain_bench.py [--patients 10000] [--requests 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import sqlalchemy as sa

from bench._common import DATA_DIR, ensure_demo

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def _people(url: str, n: int) -> list[tuple[str, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [(str(a), str(b)) for a, b in conn.execute(sa.text(
                'SELECT DISTINCT p."NHS_NUMBER", p."PATNT_REFNO" FROM "PATIENTS" p JOIN '
                '"PROVIDER_SPELLS" s ON s."PATNT_REFNO" = p."PATNT_REFNO" WHERE '
                f'p."NHS_NUMBER" IS NOT NULL ORDER BY p."PATNT_REFNO" LIMIT {int(n)}'))]
    finally:
        engine.dispose()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path, _ = ensure_demo(args.patients)
    url = f"sqlite:///{path}"
    os.environ.setdefault("CCG_DATA_DIR", str(DATA_DIR))

    from gateway.app import build_app
    from gateway.settings import Settings

    app = build_app(Settings(data_dir=DATA_DIR, connection_urls={"pas": url},
                             paging_secret="bench", log_level="error", progress=False,
                             auth_mode="insecure-demo",
                             audit_log=str(DATA_DIR / "chain-bench-audit.log"),
                             rate_limit_per_minute=1_000_000, rate_limit_burst=1_000_000))
    engine = app.state.registry.get("Encounter").mapping.adapter.engine
    sent: list[str] = []
    sa.event.listen(engine, "connect", lambda c, _r: c.set_trace_callback(sent.append))
    people = _people(url, 200)

    async def chain(c: httpx.AsyncClient, nhs: str, pid: str) -> int:
        r = await c.get("/STU3/Encounter", params={"patient.identifier": f"{NHS}|{nhs}"})
        return len(r.json()["entry"])

    async def two_step(c: httpx.AsyncClient, nhs: str, pid: str) -> int:
        r = await c.get("/STU3/Patient", params={"identifier": f"{NHS}|{nhs}"})
        found = r.json()["entry"][0]["resource"]["id"]
        r = await c.get("/STU3/Encounter", params={"patient": f"Patient/{found}"})
        return len(r.json()["entry"])

    async def direct(c: httpx.AsyncClient, nhs: str, pid: str) -> int:
        r = await c.get("/STU3/Encounter", params={"patient": f"Patient/{pid}"})
        return len(r.json()["entry"])

    scenarios: dict[str, Any] = {"chain": chain, "two-step": two_step, "direct": direct}
    times: dict[str, list[float]] = {k: [] for k in scenarios}
    statements: dict[str, list[int]] = {k: [] for k in scenarios}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as c:
            for nhs, pid in people[:20]:  # warm-up, and the three agree on every answer
                counts = {await fn(c, nhs, pid) for fn in scenarios.values()}
                assert len(counts) == 1, (nhs, counts)
            for _ in range(args.rounds):
                for i in range(args.requests):  # interleaved: noise falls on all three
                    nhs, pid = people[i % len(people)]
                    for name, fn in scenarios.items():
                        sent.clear()
                        t0 = time.perf_counter()
                        await fn(c, nhs, pid)
                        times[name].append(time.perf_counter() - t0)
                        statements[name].append(sum(
                            1 for s in sent if s.lstrip().upper().startswith("SELECT")))
    print(f"{args.patients} patients, {args.rounds} rounds x {args.requests} requests, "
          "in-process ASGI, SQLite")
    print(f"{'scenario':<10} {'p50 ms':>8} {'p99 ms':>8} {'statements/request':>20}")
    for name in scenarios:
        t = sorted(times[name])
        p50, p99 = statistics.median(t), t[int(len(t) * 0.99) - 1]
        st = sorted(set(statements[name]))
        print(f"{name:<10} {p50 * 1000:8.2f} {p99 * 1000:8.2f} {st!s:>20}")


if __name__ == "__main__":
    asyncio.run(main())
