"""``Patient/{id}/$everything`` for the richest demo patient: the gateway beside a hand-written
baseline (bench/everything_baseline.py) that runs the same statements and builds the same JSON,
in one run.

    python bench/everything_bench.py                      # 10,000 patients, 10 s per server
    python bench/everything_bench.py --duration 20 --connections 8

1. builds (or reuses) the demo PAS; picks the patient with the most Encounters (all sources);
2. starts ``careconnect-gateway serve`` and the baseline on the same SQLite file, each one
   uvicorn worker pinned to ``--server-cpu``;
3. checks both answer the same Bundle for ``_type=Patient,Encounter&_count=500`` (entries
   equal, parsed; Bundle id, lastUpdated, links ignored) — otherwise it stops;
4. counts the SQL statements per request on each side, in-process, with SQLite's trace
   callback (the adapter's direct cursor path is below SQLAlchemy's events): for the rich
   patient and for a patient with few resources (it must not grow with the record);
5. loads each server in turn with a bounded httpx client pinned to ``--client-cpu`` for
   ``--duration`` seconds and prints req/s, p50 and p99; plus the gateway's full
   ``$everything`` (with referenced Practitioner/Organization/Location), which the baseline
   does not build (gateway only, for its statements and latency).

The clinical types of issue 11 (conditions, medication, observations ...) are not in this
branch, so the richest patient has dozens of resources, not hundreds: said in the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, ensure_demo, gateway_env, machine, taskset, versions
from http_bench import Server, port_free, run_httpx


def patients(db: Path) -> tuple[str, int, str, int]:
    """(richest patient, its Encounters; a poor one with one of each source, its count)."""
    c = sqlite3.connect(db)
    try:
        rows = c.execute("""
            SELECT p, COUNT(*), COUNT(DISTINCT s) FROM (
              SELECT PATNT_REFNO p, 'ae' s FROM AE_ATTENDANCES WHERE DEL_FLAG = 'N'
              UNION ALL SELECT PATNT_REFNO, 'op' FROM OUTPATIENT_ATTENDANCES
              UNION ALL SELECT PATNT_REFNO, 'ip' FROM PROVIDER_SPELLS)
            GROUP BY p""").fetchall()
    finally:
        c.close()
    rich = max(rows, key=lambda r: (r[1], r[0]))
    poor = min((r for r in rows if r[2] == 3), key=lambda r: (r[1], r[0]))
    return str(rich[0]), rich[1], str(poor[0]), poor[1]


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


def baseline_statements(db: Path, pid: str) -> tuple[int, int]:
    import everything_baseline as eb

    seen: list[str] = []
    d = eb.Db(str(db))
    d.conn().set_trace_callback(seen.append)
    # the same work the route does, on this thread's (traced) connection
    d.patients('p."PATNT_REFNO" IN (?)', [int(pid)], 1)
    n = 1
    conn = d.conn()
    for sql, params in ((eb.SQL_AE, ["N", int(pid)]), (eb.SQL_OP, [int(pid)]),
                        (eb.SQL_IP, [int(pid)])):
        n += len(conn.execute(sql, [*params, 501]).fetchall())
    return len(seen), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--server-cpu", type=int, default=1)
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--gateway-port", type=int, default=8097)
    ap.add_argument("--baseline-port", type=int, default=8098)
    args = ap.parse_args()
    for port in (args.gateway_port, args.baseline_port):
        if not port_free(port):
            raise SystemExit(f"port {port} is in use")
    db, _info = ensure_demo(args.patients)
    rich, n_rich, poor, n_poor = patients(db)
    same = f"/STU3/Patient/{rich}/$everything?_type=Patient,Encounter&_count=500"
    full = f"/STU3/Patient/{rich}/$everything?_count=500"
    print(f"# $everything bench — {machine()}; {versions()}")
    print(f"# demo PAS {args.patients} patients; richest patient {rich}: {n_rich} Encounters "
          f"(3 sources); a poor one {poor}: {n_poor}. Clinical types not in this branch: the "
          "record is Patient + Encounters (+ referenced resources on the full row).")

    counts = asyncio.run(gateway_statements(db, [
        same, f"/STU3/Patient/{poor}/$everything?_type=Patient,Encounter&_count=500", full,
        f"/STU3/Patient/{poor}/$everything?_count=500"]))
    base_rich, base_poor = baseline_statements(db, rich), baseline_statements(db, poor)
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
                             "--db", str(db), "--port", str(args.baseline_port)], env,
                args.baseline_port, logs / "everything-baseline.log")
    import httpx

    results: dict[str, dict[str, Any]] = {}
    try:
        gw.start()
        bl.start()
        a = httpx.get(gw.base + same, timeout=30).json()
        b = httpx.get(bl.base + same, timeout=30).json()
        if normalise(a) != normalise(b):
            for x, y in zip(normalise(a), normalise(b), strict=False):
                if x != y:
                    print("first difference:", json.dumps(x)[:600], "\n", json.dumps(y)[:600])
                    break
            raise SystemExit("the gateway and the baseline disagree: not benchmarking")
        print(f"# same Bundle entries on both ({len(a['entry'])} entries)")
        for name, server, path in (("gateway", gw, same), ("baseline", bl, same),
                                   ("gateway (full)", gw, full)):
            with contextlib.suppress(Exception):
                run_httpx(server.base, [path], 2, args.connections, args.client_cpu)  # warm
            results[name] = run_httpx(server.base, [path], args.duration, args.connections,
                                      args.client_cpu)
    finally:
        gw.stop()
        bl.stop()
    rows = [
        ("gateway", results["gateway"], counts[0], counts[1]),
        ("baseline (hand-written)", results["baseline"], base_rich, base_poor),
        ("gateway, full $everything", results["gateway (full)"], counts[2], counts[3]),
    ]
    print(f"{'server':28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'stmts rich':>10} {'stmts poor':>10} {'entries':>8}")
    for name, r, (s_rich, e_rich), (s_poor, _e) in rows:
        print(f"{name:28} {r['rps']:8.1f} {r['p50_us'] / 1000:8.2f} {r['p99_us'] / 1000:8.2f} "
              f"{r['errors']:6d} {s_rich:10d} {s_poor:10d} {e_rich:8d}")
    ratio = results["gateway"]["rps"] / results["baseline"]["rps"]
    print(f"# gateway / baseline throughput: {ratio:.2f}x")
    out = logs / "everything-bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "statements": {
        "gateway": counts, "baseline": [base_rich, base_poor]}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
