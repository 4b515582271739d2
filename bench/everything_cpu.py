"""CPU time per ``Patient/{id}/$everything`` request: the gateway's ASGI app and the baseline's
(bench/everything_baseline.py) in one process, driven in-process (httpx ASGITransport, no
uvicorn, no sockets), in alternating blocks.

    python bench/everything_cpu.py                      # patient 100001, _count=500, 8 pairs
    python bench/everything_cpu.py --pairs 12 --path '/STU3/Patient/100006/$everything'

On a machine other jobs saturate, req/s over HTTP measures the share of the CPU a server gets
as much as its own work; process CPU time per request does not depend on that share (it
still moves with cache and frequency effects: hence pairs, alternating who goes first, and
the spread). Both apps run their database work on worker threads: process time counts them.
The client side (httpx building the request, collecting the body) is in the figure of both.
Prints the median CPU ms per request of each and the median paired ratio (baseline CPU /
gateway CPU = the throughput the gateway would have relative to the baseline on a CPU of
its own), with every pair's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, apply_gateway_env, ensure_demo, git_rev


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--path", default="/STU3/Patient/100001/$everything?_count=500")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--block", type=int, default=10, help="requests per block")
    ap.add_argument("--memo", action="store_true",
                    help="the stronger baseline: conversions cached (everything_baseline.memoise)")
    args = ap.parse_args()
    db, _ = ensure_demo(args.patients)
    apply_gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_LOG_LEVEL="warning",
                      CCG_AUDIT_LOG=str(DATA_DIR / "everything-cpu-audit.jsonl"))
    import everything_baseline as eb
    import httpx

    from gateway.app import build_app
    from gateway.settings import Settings

    logging.disable(logging.CRITICAL)
    gw, bl = build_app(Settings.from_env()), eb.build(str(db), args.memo)

    async def run() -> tuple[list[float], list[float]]:
        def client(app: object) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
                                     base_url="http://gw")

        async with gw.router.lifespan_context(gw), client(gw) as g, client(bl) as b:
            for c in (g, b):
                for _ in range(5):  # warm: statements compiled, caches filled
                    r = await c.get(args.path)
                    if r.status_code != 200:
                        raise SystemExit(f"{args.path}: HTTP {r.status_code}")
            gc.collect()
            gc.freeze()
            out: dict[str, list[float]] = {"g": [], "b": []}
            for i in range(args.pairs):
                order = [("g", g), ("b", b)] if i % 2 == 0 else [("b", b), ("g", g)]
                for name, c in order:
                    t = time.process_time()
                    for _ in range(args.block):
                        await c.get(args.path)
                    out[name].append((time.process_time() - t) / args.block * 1e3)
            return out["g"], out["b"]

    g_ms, b_ms = asyncio.run(run())
    ratios = sorted(b / g for g, b in zip(g_ms, b_ms, strict=True))
    print(f"# {args.path}, commit {git_rev()}, {args.pairs} pairs of {args.block} requests; "
          f"baseline {'with' if args.memo else 'without'} cached conversions; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"gateway  CPU ms/request: median {statistics.median(g_ms):.1f} "
          f"(range {min(g_ms):.1f}-{max(g_ms):.1f})")
    print(f"baseline CPU ms/request: median {statistics.median(b_ms):.1f} "
          f"(range {min(b_ms):.1f}-{max(b_ms):.1f})")
    print(f"gateway / baseline (CPU-bound throughput): median {statistics.median(ratios):.2f}x "
          f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
