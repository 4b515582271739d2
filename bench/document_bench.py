"""``Encounter/{id}/$document`` (a discharge summary): latency p50/p99, beside a baseline of
the same queries made as plain REST requests, in the same run and the same process.

    python bench/document_bench.py                       # 2,000 patients, 300 documents
    python bench/document_bench.py --patients 10000 --requests 500

Both sides run in-process over ASGI (no sockets: the figures are the gateway's own time),
sequentially, on the same app and SQLite file, alternating so drift affects both alike:

* document: ``GET Encounter/{spell}/$document`` for a spell with diagnoses, procedures and
  discharge medication (the richest such spell);
* baseline: the requests a client would make for the same content — the Encounter, the
  Patient, ``Condition?context=``, ``Procedure?context=&status=completed``,
  ``MedicationRequest?context=&category=discharge``, ``AllergyIntolerance?patient=&
  clinical-status=active`` and one ``_id=`` search per referenced type — timed as one unit.

The document does the same statements and also builds the Composition, its narratives
(lxml) and the deterministic ids (a SHA-256 of the content).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, apply_gateway_env, ensure_demo, machine, versions


def spell_of(db: Path) -> tuple[str, str]:
    c = sqlite3.connect(db)
    try:
        row = c.execute("""
            SELECT s.PRVSP_REFNO, s.PATNT_REFNO,
              (SELECT COUNT(*) FROM PROBLEMS c WHERE c.PRVSP_REFNO = s.PRVSP_REFNO)
              + (SELECT COUNT(*) FROM PROCEDURES x WHERE x.PRVSP_REFNO = s.PRVSP_REFNO) n
            FROM PROVIDER_SPELLS s ORDER BY n DESC, s.PRVSP_REFNO LIMIT 1""").fetchone()
    finally:
        c.close()
    return str(row[0]), str(row[1])


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000


async def run(db: Path, n: int) -> None:
    import httpx

    from gateway.app import build_app
    from gateway.settings import Settings

    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_LOG_LEVEL="warning",
                      CCG_AUDIT_LOG=str(DATA_DIR / "document-audit.jsonl"),
                      CCG_DATA_DIR=str(DATA_DIR))
    app = build_app(Settings.from_env(rate_limit_per_minute=0, source_rate_limit_per_minute=0))
    spell, pid = spell_of(db)
    doc_path = f"/STU3/Encounter/{spell}/$document"
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        doc = (await c.get(doc_path)).json()
        refs: dict[str, set[str]] = {}
        for e in doc["entry"]:
            r = e["resource"]
            if r["resourceType"] in ("Practitioner", "Organization", "Location", "Medication"):
                refs.setdefault(r["resourceType"], set()).add(r["id"])
        base_paths = [f"/STU3/Encounter/{spell}", f"/STU3/Patient/{pid}",
                      f"/STU3/Condition?context=Encounter/{spell}&patient={pid}&_count=100",
                      f"/STU3/Procedure?context=Encounter/{spell}&patient={pid}"
                      "&status=completed&_count=100",
                      f"/STU3/MedicationRequest?context=Encounter/{spell}&patient={pid}"
                      "&category=discharge&_count=100",
                      f"/STU3/AllergyIntolerance?patient={pid}&clinical-status=active"
                      "&_count=100"]
        base_paths += [f"/STU3/{t}?_id={','.join(sorted(ids))}" for t, ids in sorted(refs.items())]
        for p in base_paths:  # each must answer, or the baseline is not the same work
            r = await c.get(p)
            assert r.status_code == 200, (p, r.status_code, r.text[:300])
        sections = doc["entry"][0]["resource"]["section"]
        print(f"# spell {spell}: {len(doc['entry'])} entries, sections "
              + ", ".join(f"{s['title']} {len(s.get('entry', []))}" for s in sections))
        print(f"# baseline: {len(base_paths)} REST requests per document")
        for _ in range(20):  # warm both
            await c.get(doc_path)
            for p in base_paths:
                await c.get(p)
        d_times: list[float] = []
        b_times: list[float] = []
        for _ in range(n):
            t = time.perf_counter()
            r = await c.get(doc_path)
            d_times.append(time.perf_counter() - t)
            assert r.status_code == 200
            t = time.perf_counter()
            for p in base_paths:
                await c.get(p)
            b_times.append(time.perf_counter() - t)
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, xs in (("$document", d_times), ("baseline (same queries)", b_times)):
        print(f"{name:28} {pct(xs, 50):8.2f} {pct(xs, 99):8.2f} "
              f"{statistics.fmean(xs) * 1000:8.2f}")
    print(f"ratio $document / baseline (p50): {pct(d_times, 50) / pct(b_times, 50):.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    db, _ = ensure_demo(args.patients)
    print(f"# $document bench — {machine()}; {versions()}")
    print(f"# demo PAS {args.patients} patients, {args.requests} documents, in-process ASGI")
    asyncio.run(run(db, args.requests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
