"""In-process micro-benchmark: record → Patient resource → JSON bytes, per resource.

    python bench/mapping_bench.py                  # 100 records, 10,000-patient demo PAS
    python bench/mapping_bench.py --profile        # and a cProfile of the gateway's mapping

Fetches 100 real PATIENTS records (with their PATIENT_IDS, ADDRESSES and current
GP_REGISTRATIONS children) once, through the gateway's own SQL adapter, then times per resource:

* gateway: ``Provider.resource(record)`` + ``orjson.dumps``          (target ≤ 20 µs)
* gateway: the same over ``--distinct`` other records, each mapped once (a value cache in
  the mapping sees mostly new values, as a server does across a large PAS)
* gateway: ``Provider.resource(record)`` alone
* baseline: plain ``orjson.dumps`` of the finished resource dicts
* baseline: the hand-written mapping of bench/baseline_app.py + ``orjson.dumps``
* baseline: fhir.resources STU3 ``Patient.model_validate(d)`` + ``.model_dump_json()``
  (and each half), i.e. what a pydantic-model gateway would pay

Each figure: ``--repeats`` timed passes over all records (``time.perf_counter_ns``), after a
warm-up pass; reported as the median (and min) of the per-pass mean µs per resource.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
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

SEARCH = [("gender", "female"), ("birthdate", "ge1900")]
DISTINCT_SEARCH = [("gender", "male"), ("birthdate", "ge1900")]


def fetch_records(db: Path, n: int, search: list[tuple[str, str]] | None = None
                  ) -> tuple[Any, list[Any]]:
    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_AUDIT_LOG=os.devnull)
    from gateway.app import build_app
    from gateway.settings import Settings

    app = build_app(Settings.from_env(log_level="warning", paging_secret="bench"))
    registry = app.state.registry
    provider = registry.get("Patient")

    async def go() -> list[Any]:
        plan = registry.plan(provider, [*(search or SEARCH), ("_count", str(n))],
                             default_count=20,
                             max_count=max(500, n), strict=True)
        page = await provider.search(plan)
        await registry.aclose()
        return page.records

    return provider, asyncio.run(go())


def as_baseline_rows(provider: Any, records: list[Any]) -> list[tuple[Any, ...]]:
    """The same records in the shape bench/baseline_app.py gets from sqlite3 (tuples)."""
    from baseline_app import PATIENT_COLS

    out = []
    for rec in (provider.layout.as_dict(r) for r in records):
        row = tuple(rec[f"p.{c}"] for c in PATIENT_COLS)
        key = rec["p.PATNT_REFNO"]
        # the parent key last, as both servers select it
        ids = [(r["i.END_DTTM"], r["i.IDENTIFIER"], r["i.PITYP_CODE"], r["i.START_DTTM"], key)
               for r in rec["@other_ids"]]
        addrs = [(r["a.ADTYP_CODE"], r["a.END_DTTM"], r["a.LINE1"], r["a.LINE2"],
                  r["a.LINE3"], r["a.LINE4"], r["a.PCODE"], r["a.START_DTTM"], key)
                 for r in rec["@addresses"]]
        gps = [(r["r.ORGAN_REFNO"], r["r.PROCA_REFNO"], key) for r in rec["@gp"]]
        out.append((row, ids, addrs, gps))
    return out


def bench(fn: Callable[[Any], Any], items: list[Any], repeats: int) -> dict[str, float]:
    for it in items:  # warm-up pass
        fn(it)
    per_pass = []
    clock = time.perf_counter_ns
    for _ in range(repeats):
        t = clock()
        for it in items:
            fn(it)
        per_pass.append((clock() - t) / len(items) / 1000)
    return {"median": statistics.median(per_pass), "min": min(per_pass),
            "p90": sorted(per_pass)[int(0.9 * (len(per_pass) - 1))]}


def main() -> int:
    ap = argparse.ArgumentParser(description="mapping + serialisation per resource")
    ap.add_argument("--patients", type=int, default=10_000, help="demo PAS scale")
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=200, help="timed passes (fast figures)")
    ap.add_argument("--distinct", type=int, default=4000,
                    help="other records (male patients) each mapped once (0: skip)")
    ap.add_argument("--slow-repeats", type=int, default=20,
                    help="timed passes for fhir.resources")
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    ap.add_argument("--profile", action="store_true",
                    help="also print a cProfile of Provider.resource over the records")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = ap.parse_args()

    pinned = args.cpu >= 0 and pin_self(args.cpu)
    db, _ = ensure_demo(args.patients, args.data_dir)
    provider, records = fetch_records(db, args.records)
    if len(records) < args.records:
        raise SystemExit(f"only {len(records)} records found")
    resources = [provider.resource(r) for r in records]
    nbytes = statistics.mean(len(orjson.dumps(r)) for r in resources)

    import baseline_app
    from fhir.resources.STU3.patient import Patient

    rows = as_baseline_rows(provider, records)
    for r, res in zip(rows, resources, strict=True):
        if baseline_app.patient(*r) != res:
            raise SystemExit(f"baseline mapping differs from the gateway for Patient/{res['id']}")
    models = [Patient.model_validate(d) for d in resources]
    for m, d in zip(models, resources, strict=True):
        if m.id != d["id"]:
            raise SystemExit("fhir.resources round trip lost the id")

    resource, dumps, patient = provider.resource, orjson.dumps, baseline_app.patient
    rows_fast = [
        ("gateway: Provider.resource + orjson.dumps  (target <= 20 µs)",
         lambda rec: dumps(resource(rec)), records, args.repeats),
        ("gateway: Provider.resource alone", resource, records, args.repeats),
        ("baseline: orjson.dumps of the finished dict", dumps, resources, args.repeats),
        ("baseline: hand-written mapping + orjson.dumps",
         lambda r: dumps(patient(*r)), rows, args.repeats),
        ("baseline: fhir.resources model_validate + model_dump_json",
         lambda d: Patient.model_validate(d).model_dump_json(), resources, args.slow_repeats),
        ("  fhir.resources Patient.model_validate", Patient.model_validate, resources,
         args.slow_repeats),
        ("  fhir.resources model_dump_json", lambda m: m.model_dump_json(), models,
         args.slow_repeats),
    ]
    # Other records, each mapped once: value caches in the mapping (if any) see mostly new
    # values, as a server does across a large PAS; the repeated passes above cannot show that.
    _, distinct = fetch_records(db, args.distinct, DISTINCT_SEARCH) if args.distinct else (0, [])
    distinct_rows = as_baseline_rows(provider, distinct)
    results = []
    wait_quiet()
    gc.collect()
    with Interference([]) as noise:
        for label, fn, items, reps in rows_fast:
            results.append((label, bench(fn, items, reps), reps))
        if distinct:
            # chunks of records never mapped before, gateway and hand-written alternating
            # (each on its own records); median over chunks of the per-record mean
            size = 100
            g_chunks: list[float] = []
            b_chunks: list[float] = []
            for i in range(0, len(distinct) - 2 * size + 1, 2 * size):
                t = time.perf_counter_ns()
                for rec in distinct[i:i + size]:
                    dumps(resource(rec))
                g_chunks.append((time.perf_counter_ns() - t) / size / 1000)
                t = time.perf_counter_ns()
                for r in distinct_rows[i + size:i + 2 * size]:
                    dumps(patient(*r))
                b_chunks.append((time.perf_counter_ns() - t) / size / 1000)
            seen = size * len(g_chunks)
            results.insert(1, (f"gateway, {seen:,} other records, each mapped once",
                               {"median": statistics.median(g_chunks), "min": min(g_chunks)},
                               len(g_chunks)))
            results.insert(5, (f"baseline: hand-written, {seen:,} other records once",
                               {"median": statistics.median(b_chunks), "min": min(b_chunks)},
                               len(b_chunks)))

    gw = results[0][1]["median"]
    print(f"mapping_bench — {time.strftime('%Y-%m-%d %H:%M')} — {machine()}"
          f"{', pinned to CPU ' + str(args.cpu) if pinned else ''}")
    print(f"{versions()}; other processes used {noise.percent:.0f}% of the CPUs meanwhile")
    print(f"{len(records)} Patient records from {db.name} (search {SEARCH}), "
          f"mean JSON size {nbytes:,.0f} bytes; median of timed passes over all records")
    print()
    w = max(len(r[0]) for r in results)
    print(f"| {'per resource':{w}} | median µs | min µs | passes | vs gateway |")
    print(f"|{'-' * (w + 2)}|----------:|-------:|-------:|-----------:|")
    for label, r, reps in results:
        print(f"| {label:{w}} | {r['median']:9.2f} | {r['min']:6.2f} | {reps:6d} | "
              f"{r['median'] / gw:9.2f}x |")
    print()
    print(f"target <= 20 µs per resource (mapping + serialisation): "
          f"{'MET' if gw <= 20 else 'NOT MET'} ({gw:.1f} µs)")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            for rec in records:
                dumps(resource(rec))
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        body = s.getvalue()
        print("\ncProfile of 20 passes of Provider.resource + orjson.dumps "
              f"({20 * len(records)} resources), by own time:")
        print(body[body.find("   ncalls"):].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
