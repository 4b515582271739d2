"""``Patient/{id}/$everything`` for the demo patient with the largest record: the gateway beside
a baseline (bench/everything_baseline.py) that runs the same statements and builds the same
JSON, in one run, in paired interleaved rounds.

    python bench/everything_bench.py                      # 10,000 patients, 5 rounds of 10 s
    python bench/everything_bench.py --rounds 7 --duration 8 --connections 8

1. builds (or reuses) the demo PAS; picks, among the first 40 patients, the one with the most
   resources in its compartment (counted by walking the gateway's own $everything; 100001,
   the documented rich record, ~1,000 resources); stops if it has fewer than 200;
2. starts ``careconnect-gateway serve`` and the baseline on the same SQLite file, each one
   uvicorn worker pinned to ``--server-cpu``;
3. checks both answer the same Bundle entries for the full ``$everything?_count=500`` of the
   rich patient and of a poor one (parsed; Bundle id, lastUpdated, links ignored) — otherwise
   it stops;
4. counts the SQL statements per request on each side, in-process, with SQLite's trace
   callback (the adapter's direct cursor path is below SQLAlchemy's events): rich and poor
   patient (it must not grow with the record);
5. per round, loads gateway and baseline back to back (taking turns to go first) with a
   bounded httpx client pinned to ``--client-cpu``; prints each round's req/s, p50, the
   paired ratio, the load average and the CPU other processes used; then the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    DATA_DIR,
    Interference,
    ensure_demo,
    gateway_env,
    machine,
    taskset,
    versions,
)
from http_bench import Server, port_free, run_httpx


def patients(db: Path) -> tuple[str, int, str, int]:
    """(the patient with the largest record, its resource count; a poor one, its count):
    counted by the gateway itself, in-process (every compartment type, every source)."""
    return asyncio.run(_record_sizes(db))


async def _record_sizes(db: Path) -> tuple[str, int, str, int]:
    import httpx
    from _common import apply_gateway_env

    from gateway.app import build_app
    from gateway.settings import Settings

    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_LOG_LEVEL="warning",
                      CCG_AUDIT_LOG=str(DATA_DIR / "everything-audit.jsonl"))
    app = build_app(Settings.from_env())
    c = sqlite3.connect(db)
    try:  # candidates: the first patients (the documented rich one, 100001, among them)
        ids = [r[0] for r in c.execute(
            'SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE "ARCHV_FLAG" = \'N\' '
            'ORDER BY "PATNT_REFNO" LIMIT 40')]
    finally:
        c.close()
    sizes = []
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as cl:
        for pid in ids:
            n, path = 0, f"/STU3/Patient/{pid}/$everything?_count=500&_type={SECTIONS}"
            while path and n < 5000:
                b = (await cl.get(path)).json()
                n += sum(1 for e in b.get("entry", []) if e["search"]["mode"] == "match")
                path = next((lk["url"].split("gw", 1)[-1] for lk in b.get("link", [])
                             if lk["relation"] == "next"), "")
            sizes.append((n, pid))
    rich = max(sizes)
    poor = min(s for s in sizes if s[0] >= 2)
    return str(rich[1]), rich[0], str(poor[1]), poor[0]


SECTIONS = ("Patient,AllergyIntolerance,Condition,Encounter,Flag,Immunization,MedicationRequest,"
            "MedicationStatement,Observation,Procedure")


def normalise(body: dict[str, Any]) -> list[Any]:
    return [(e["fullUrl"].split("/STU3/", 1)[1], e["resource"], e["search"])
            for e in body.get("entry", [])]


async def gateway_statements(db: Path, paths: list[str]) -> list[tuple[int, int]]:
    """(statements, entries) per path, the gateway in-process on the same database."""
    import httpx
    from _common import apply_gateway_env
    from sqlalchemy import event

    from gateway.app import build_app
    from gateway.settings import Settings

    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_LOG_LEVEL="warning",
                      CCG_AUDIT_LOG=str(DATA_DIR / "everything-audit.jsonl"))
    app = build_app(Settings.from_env())
    seen: list[str] = []
    engines = {id(e): e for p in app.state.registry.sources()
               if (e := getattr(p.mapping.adapter, "engine", None)) is not None}
    out = []
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        for path in paths:
            await c.get(path)  # warm: compiled statements cached
            for e in engines.values():  # fresh connections, each traced
                event.listen(e, "connect", lambda conn, _r: conn.set_trace_callback(seen.append))
                e.dispose()
            seen.clear()
            r = await c.get(path)
            out.append((len(seen), len(r.json().get("entry", []))))
    return out


def baseline_statements(db: Path, pid: str, count: int) -> tuple[int, int]:
    """(statements, entries) of the baseline's page: its own work on a traced connection."""
    import everything_baseline as eb

    seen: list[str] = []
    d = eb.Db(str(db))
    d.conn().set_trace_callback(seen.append)
    found = eb.record(d, int(pid), count)
    assert found is not None
    return len(seen), len(found[0]) + len(found[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=5,
                    help="paired rounds: gateway and baseline back to back, taking turns first")
    ap.add_argument("--count", type=int, default=500, help="_count of the page")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--server-cpu", type=int, default=1)
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--gateway-port", type=int, default=8097)
    ap.add_argument("--baseline-port", type=int, default=8098)
    ap.add_argument("--memo", action="store_true",
                    help="the stronger baseline: conversions cached (everything_baseline.memoise)")
    args = ap.parse_args()
    for port in (args.gateway_port, args.baseline_port):
        if not port_free(port):
            raise SystemExit(f"port {port} is in use")
    db, _info = ensure_demo(args.patients)
    rich, n_rich, poor, n_poor = patients(db)
    if n_rich < 200:
        raise SystemExit(f"the richest patient has {n_rich} resources (< 200): not benchmarking")
    full = f"/STU3/Patient/{rich}/$everything?_count={args.count}"
    full_poor = f"/STU3/Patient/{poor}/$everything?_count={args.count}"
    print(f"# $everything bench — {machine()}; {versions()}")
    memo = "cached (--memo)" if args.memo else "not cached"
    print(f"# baseline: hand-written, value conversions {memo}")
    print(f"# demo PAS {args.patients:,} patients; richest record: patient {rich}, {n_rich} "
          f"resources in its compartment (all types, all sources); a poor one: {poor}, "
          f"{n_poor}. Page: _count={args.count} (max), plus the referenced resources.")

    counts = asyncio.run(gateway_statements(db, [full, full_poor]))
    base_rich = baseline_statements(db, rich, args.count)
    base_poor = baseline_statements(db, poor, args.count)
    env = gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_LOG_LEVEL="warning",
                      CCG_DATA_DIR=str(DATA_DIR),
                      CCG_AUDIT_LOG=str(DATA_DIR / "everything-audit.jsonl"))
    env.pop("CCG_PORT", None)
    logs = DATA_DIR / "results"
    gw = Server("gateway", [*taskset(args.server_cpu), sys.executable, "-m", "gateway.cli",
                            "serve", "--port", str(args.gateway_port)], env,
                args.gateway_port, logs / "everything-gateway.log")
    bl = Server("baseline", [*taskset(args.server_cpu), sys.executable,
                             str(Path(__file__).resolve().parent / "everything_baseline.py"),
                             "--db", str(db), "--port", str(args.baseline_port),
                             *(["--memo"] if args.memo else [])], env,
                args.baseline_port, logs / "everything-baseline.log")
    import httpx

    rounds: list[dict[str, Any]] = []
    try:
        gw.start()
        bl.start()
        for path in (full, full_poor):
            a = httpx.get(gw.base + path, timeout=60).json()
            b = httpx.get(bl.base + path, timeout=60).json()
            if normalise(a) != normalise(b):
                for x, y in zip(normalise(a), normalise(b), strict=False):
                    if x != y:
                        print("first difference:", json.dumps(x)[:600], "\n",
                              json.dumps(y)[:600])
                        break
                raise SystemExit("the gateway and the baseline disagree: not benchmarking")
            print(f"# {path}: same Bundle entries on both ({len(a['entry'])} entries)")
        for _name, server in (("gateway", gw), ("baseline", bl)):
            with contextlib.suppress(Exception):
                run_httpx(server.base, [full], 2, args.connections, args.client_cpu)  # warm
        for i in range(args.rounds):
            order = [("gateway", gw), ("baseline", bl)]
            if i % 2:
                order.reverse()
            one: dict[str, Any] = {"load_before": os.getloadavg()[0]}
            for name, server in order:
                with Interference([s.proc.pid for s in (gw, bl) if s.proc]) as other:
                    one[name] = run_httpx(server.base, [full], args.duration, args.connections,
                                          args.client_cpu)
                one[name]["others_cpu_percent"] = other.percent
            one["ratio"] = one["gateway"]["rps"] / one["baseline"]["rps"]
            rounds.append(one)
            print(f"  round {i + 1} ({order[0][0]} first, load {one['load_before']:.1f}): "
                  f"gateway {one['gateway']['rps']:.1f} req/s p50 "
                  f"{one['gateway']['p50_us'] / 1000:.1f} ms; baseline "
                  f"{one['baseline']['rps']:.1f} req/s p50 {one['baseline']['p50_us'] / 1000:.1f}"
                  f" ms; ratio {one['ratio']:.2f}x; others' CPU "
                  f"{one['gateway']['others_cpu_percent']:.0f}% / "
                  f"{one['baseline']['others_cpu_percent']:.0f}%", flush=True)
    finally:
        gw.stop()
        bl.stop()

    def med(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    print(f"{'server':26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'stmts rich':>10} {'stmts poor':>10} {'entries':>8}")
    for name, (s_rich, e_rich), (s_poor, _e) in (("gateway", counts[0], counts[1]),
                                                 ("baseline", base_rich, base_poor)):
        print(f"{name:26} {med(name, 'rps'):8.1f} {med(name, 'p50_us') / 1000:8.2f} "
              f"{med(name, 'p99_us') / 1000:8.2f} {sum(r[name]['errors'] for r in rounds):6d} "
              f"{s_rich:10d} {s_poor:10d} {e_rich:8d}")
    ratios = sorted(r["ratio"] for r in rounds)
    print(f"# gateway / baseline throughput, paired rounds: median {statistics.median(ratios):.2f}x"
          f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)}); medians of the columns above "
          "are per column")
    out = logs / "everything-bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"patient": rich, "resources": n_rich, "rounds": rounds,
                               "statements": {"gateway": counts,
                                              "baseline": [base_rich, base_poor]}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
