"""Instructions and cache misses per request, gateway vs baseline, under valgrind (callgrind).

    python bench/instructions_bench.py                  # scenario b, 200 requests, ~4 min
    python bench/instructions_bench.py --scenario a --requests 500

Req/s on a shared virtual machine drift by several per cent between runs; instruction counts
do not. Each server runs in-process (no HTTP, queries inline: ``InlineWorkers`` and the
baseline's ``inline`` mode) under ``valgrind --tool=callgrind --cache-sim=yes`` twice: once
serving only the warm-up, once serving ``--requests`` more; the difference divided by
``--requests`` is the cost of one request, start-up excluded. GC is frozen after the warm-up,
as ``serve`` does. Cache figures are valgrind's simulated L1 (not this CPU's real caches):
good for comparing two runs, not for predicting time. Needs ``valgrind`` (apt-get install
valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, apply_gateway_env, ensure_demo, versions

EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "Bcm", "Bim")
LABELS = {"Ir": "instructions", "I1mr": "L1 instruction misses", "D1mr": "L1 data read misses",
          "D1mw": "L1 data write misses", "Bcm": "mispredicted branches",
          "Bim": "mispredicted indirect jumps"}


def serve(which: str, scenario: str, warmup: int, requests: int, data_dir: Path) -> None:
    """The child: build one app in-process and serve warm-up + ``requests`` requests."""
    from http_bench import workload
    from profile_inprocess import InlineWorkers, call

    db, _ = ensure_demo(10_000, data_dir)
    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}",
                      CCG_AUDIT_LOG=str(data_dir / "instructions-audit.jsonl"))
    paths = workload(db, 7, 1000)[scenario]
    if which == "gateway":
        from gateway.app import build_app
        from gateway.settings import Settings

        app = build_app(Settings.from_env(log_level="info", paging_secret="bench"))
        for p in app.state.registry.sources():
            p.mapping.adapter._workers = InlineWorkers()
    else:
        import baseline_app

        app = baseline_app.build(str(db.resolve()), "inline")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the request log lines
    logging.disable(logging.CRITICAL)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            for p in paths[:warmup]:
                await call(app, p)
            gc.collect()
            gc.freeze()
            gc.set_threshold(10_000, 20, 100)
            for i in range(requests):
                await call(app, paths[(warmup + i) % len(paths)])

    asyncio.run(run())


def totals(out_file: Path) -> dict[str, int]:
    text = subprocess.run(["callgrind_annotate", "--show=" + ",".join(EVENTS),
                           str(out_file)], capture_output=True, text=True, check=True).stdout
    for line in text.splitlines():
        if "PROGRAM TOTALS" in line:
            nums = re.findall(r"([\d,]+)\s+\(", line)
            return {e: int(n.replace(",", "")) for e, n in zip(EVENTS, nums, strict=True)}
    raise SystemExit("callgrind_annotate printed no totals")


def measure(which: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    counts = []
    for n in (0, args.requests):
        out = tmp / f"{which}-{n}.callgrind"
        cmd = ["valgrind", "--tool=callgrind", "--cache-sim=yes", "--branch-sim=yes",
               f"--callgrind-out-file={out}", sys.executable, __file__, "--child", which,
               "--scenario", args.scenario, "--warmup", str(args.warmup), "--requests", str(n),
               "--data-dir", str(args.data_dir)]
        subprocess.run(cmd, check=True, capture_output=True)
        counts.append(totals(out))
    return {e: (counts[1][e] - counts[0][e]) / args.requests for e in EVENTS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", choices=("a", "b", "c"), default="b")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--gateway-only", action="store_true",
                    help="measure the gateway alone (to compare two versions of it)")
    ap.add_argument("--child", choices=("gateway", "baseline"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        serve(args.child, args.scenario, args.warmup, args.requests, args.data_dir)
        return 0
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind not found: apt-get install -y valgrind")
    ensure_demo(10_000, args.data_dir)  # built once, outside valgrind
    print(versions())
    with tempfile.TemporaryDirectory(prefix="ccg-instr-") as tmpdir:
        servers = ("gateway",) if args.gateway_only else ("gateway", "baseline")
        got = {w: measure(w, args, Path(tmpdir)) for w in servers}
    print(f"\nscenario {args.scenario}, {args.requests} requests after {args.warmup} warm-up, "
          "per request (valgrind callgrind, simulated caches):\n")
    if args.gateway_only:
        print("| per request | gateway |\n|---|---:|")
        for e in EVENTS:
            print(f"| {LABELS[e]} | {got['gateway'][e]:,.0f} |")
        return 0
    print("| per request | gateway | baseline | gateway/baseline |")
    print("|---|---:|---:|---:|")
    for e in EVENTS:
        g, b = got["gateway"][e], got["baseline"][e]
        print(f"| {LABELS[e]} | {g:,.0f} | {b:,.0f} | {g / b:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
