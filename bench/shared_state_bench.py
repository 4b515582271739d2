"""What sharing the limits in Redis costs a request, in-process (no HTTP server), beside the
same request with the limits in process memory and beside the code before the change.

    python bench/shared_state_bench.py                       # 3 rounds x 4 configurations
    python bench/shared_state_bench.py --requests 2000 --rounds 5 --base-rev 39ab758

Configurations (each in its own interpreter, interleaved round after round):

* ``base local`` — the gateway at ``--base-rev`` (``git archive``), no Redis;
* ``local`` — this tree, no Redis: the request path every single-process install runs
  (it must not have changed);
* ``base redis`` — ``--base-rev`` with ``CCG_REDIS_URL``: the per-client rate limit in Redis
  (one script call per request);
* ``redis`` — this tree with ``CCG_REDIS_URL``: the rate limit, the in-flight lease
  (acquire + release), the per-address request bucket and the failed-auth peek in Redis
  (five calls per request).

Every limit is on, as shipped, with rates high enough that nothing is refused. A real
``redis-server`` (tests/redis_server.py) on loopback; requests are ``Patient/{id}`` reads
one at a time through every layer (SQL on the 10,000-patient demo). Reported: wall µs per
request (what a client waits: includes the Redis round trips) and the gateway process's
CPU µs per request (``time.process_time``; Redis's own CPU is not in it), medians over blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, REPO, ensure_demo, gateway_env, machine, versions
from http_bench import workload

from tests.redis_server import TempRedis

CHILD = r"""
import asyncio, json, sys, time
from gateway.app import build_app
from gateway.settings import Settings

paths = json.loads(sys.argv[1]); n_req = int(sys.argv[2]); blocks = int(sys.argv[3])
app = build_app(Settings.from_env(progress=False))

async def one(path):
    p, _, q = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": p, "raw_path": p.encode(),
             "query_string": q.encode(), "root_path": "", "headers": [(b"host", b"gw")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    sent = False
    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}
    status = []
    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
    await app(scope, receive, send)
    assert status == [200], (path, status)

async def main():
    async with app.router.lifespan_context(app):
        for p in paths[:200]:  # warm-up
            await one(p)
        out = []
        for b in range(blocks):
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(n_req):
                await one(paths[(b * n_req + i) % len(paths)])
            out.append(((time.perf_counter() - w0) / n_req * 1e6,
                        (time.process_time() - c0) / n_req * 1e6))
    print("RESULT " + json.dumps(out))

asyncio.run(main())
"""


def run(src: Path, env: dict[str, str], paths: list[str], n: int,
        blocks: int) -> list[list[float]]:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths), str(n), str(blocks)],
                          cwd=src, env={**env, "PYTHONPATH": str(src)}, capture_output=True,
                          text=True, timeout=1200)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            values: list[list[float]] = json.loads(line[7:])
            return values
    raise SystemExit(f"no result from {src}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="requests per block")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base-rev", default="39ab758")
    args = ap.parse_args()
    db, _ = ensure_demo(10_000)
    paths = workload(db, seed=15, size=5000)["a"]
    tmp = Path(tempfile.mkdtemp(prefix="shared-state-bench-"))
    base = tmp / "base"
    base.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base_rev],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    env = gateway_env(CCG_DATA_DIR=str(DATA_DIR), CCG_DEMO_PATIENTS="10000",
                      CCG_LOG_LEVEL="warning", CCG_AUDIT_LOG=str(tmp / "audit.jsonl"),
                      CCG_RATE_LIMIT_PER_MINUTE="100000000", CCG_RATE_LIMIT_BURST="1000000",
                      CCG_SOURCE_RATE_LIMIT_PER_MINUTE="100000000",
                      CCG_SOURCE_RATE_LIMIT_BURST="1000000")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    results: dict[str, list[list[float]]] = {}
    with TempRedis() as redis:
        shared = {**env, "CCG_REDIS_URL": redis.url}
        configs: dict[str, tuple[Path, dict[str, str]]] = {
            "base local": (base, env), "local": (REPO, env),
            "base redis": (base, shared), "redis": (REPO, shared)}
        results = {k: [] for k in configs}
        for rnd in range(args.rounds):
            for name, (src, cenv) in configs.items():
                values = run(src, cenv, paths, args.requests, args.blocks)
                results[name] += values
                print(f"  round {rnd + 1} {name:10} " + " ".join(
                    f"{w:.0f}/{c:.0f}" for w, c in values) + " us/req wall/cpu", flush=True)
    lines = [f"### Shared limits in Redis: cost per Patient read, in-process "
             f"({time.strftime('%Y-%m-%d %H:%M')} UTC)", "",
             f"{machine()}; {versions()}; base = {args.base_rev}; {args.rounds} rounds x "
             f"{args.blocks} blocks x {args.requests} requests, configurations interleaved; "
             f"shared machine (load average {os.getloadavg()[0]:.1f} at the end).", "",
             "| configuration | wall µs/req (median) | vs base local | CPU µs/req (median) | "
             "vs base local | blocks wall/CPU (µs) |", "|---|---:|---:|---:|---:|---|"]
    bw = statistics.median(v[0] for v in results["base local"])
    bc = statistics.median(v[1] for v in results["base local"])
    for name, vals in results.items():
        w = statistics.median(v[0] for v in vals)
        c = statistics.median(v[1] for v in vals)
        lines.append(f"| {name} | {w:.0f} | {w / bw - 1:+.1%} | {c:.0f} | {c / bc - 1:+.1%} | "
                     + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in vals) + " |")
    text = "\n".join(lines)
    print(text)
    out = DATA_DIR / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"shared-state-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
