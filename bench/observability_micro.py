"""The gateway's own CPU per request, in-process (no HTTP server, no load generator): what
metrics and traces add to the hot path, beside the same figure for the code before them.

    python bench/observability_micro.py                 # 3 rounds x 4 configurations
    python bench/observability_micro.py --requests 3000 --rounds 5

Each configuration runs in its own interpreter, one after the other, round after round
(base, off, metrics, traces, base, ...), so the machine's other work spreads over all of
them. A run drives the ASGI app directly — ``Patient/{id}`` reads (or family+gender searches)
one at a time through every layer (audit, limits, authentication, routes, SQL on the
10,000-patient demo) — and reports process CPU time (``time.process_time``: all threads,
including the SQL threads and the span exporter's) per request, the median over blocks.

``base`` = the gateway at ``--base-rev`` (``git archive``), ``off`` = this tree with
``CCG_METRICS=false`` (traces off), ``metrics`` = as shipped, ``traces`` = metrics plus
OpenTelemetry traces exported over OTLP/HTTP to a local sink that discards them, ``traces 10%``
the same with the standard sampler settings keeping one trace in ten
(``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.1``).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, REPO, ensure_demo, gateway_env, machine, versions
from http_bench import workload
from scale_bench import Sink

CHILD = r"""
import asyncio, json, os, random, statistics, sys, time
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
            t0 = time.process_time()
            for i in range(n_req):
                await one(paths[(b * n_req + i) % len(paths)])
            out.append((time.process_time() - t0) / n_req * 1e6)
    print("RESULT " + json.dumps(out))

asyncio.run(main())
"""


def run(src: Path, env: dict[str, str], paths: list[str], n: int, blocks: int) -> list[float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths), str(n), str(blocks)],
                          cwd=src, env={**env, "PYTHONPATH": str(src)}, capture_output=True,
                          text=True, timeout=1200)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            values: list[float] = json.loads(line[7:])
            return values
    raise SystemExit(f"no result from {src}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per block")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenario", choices=("a", "b"), default="a")
    ap.add_argument("--base-rev", default="693a6f2")
    args = ap.parse_args()
    db, _ = ensure_demo(10_000)
    paths = workload(db, seed=15, size=5000)[args.scenario]
    tmp = Path(tempfile.mkdtemp(prefix="obs-micro-"))
    base = tmp / "base"
    base.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base_rev],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    env = gateway_env(CCG_DATA_DIR=str(DATA_DIR), CCG_DEMO_PATIENTS="10000",
                      CCG_LOG_LEVEL="warning", CCG_AUDIT_LOG=str(tmp / "audit.jsonl"))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    configs: dict[str, tuple[Path, dict[str, str]]] = {
        "base": (base, env),
        "off": (REPO, {**env, "CCG_METRICS": "false"}),
        "metrics": (REPO, env),
        "traces": (REPO, {**env, "CCG_OTEL_TRACES": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT":
                          f"http://127.0.0.1:{sink.server_address[1]}"}),
        "traces 10%": (REPO, {**env, "CCG_OTEL_TRACES": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT":
                              f"http://127.0.0.1:{sink.server_address[1]}",
                              "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                              "OTEL_TRACES_SAMPLER_ARG": "0.1"}),
    }
    results: dict[str, list[float]] = {k: [] for k in configs}
    for rnd in range(args.rounds):
        for name, (src, cenv) in configs.items():
            values = run(src, cenv, paths, args.requests, args.blocks)
            results[name] += values
            print(f"  round {rnd + 1} {name:8} " + " ".join(f"{v:.0f}" for v in values)
                  + " us/req", flush=True)
    sink.shutdown()
    scen = {"a": "Patient read", "b": "family+gender search"}[args.scenario]
    base_med = statistics.median(results["base"])
    lines = [f"### Gateway CPU per request, in-process ({scen}; "
             f"{time.strftime('%Y-%m-%d %H:%M')} UTC)", "",
             f"{machine()}; {versions()}; {args.rounds} rounds x {args.blocks} blocks x "
             f"{args.requests} requests, configurations interleaved; shared machine "
             f"(load average {os.getloadavg()[0]:.1f} at the end).", "",
             "| configuration | CPU µs/request (median) | vs base | lowest block | vs base | "
             "blocks (µs) |", "|---|---:|---:|---:|---:|---|"]
    base_min = min(results["base"])
    for name, vals in results.items():
        med, low = statistics.median(vals), min(vals)
        lines.append(f"| {name} | {med:.0f} | {med / base_med - 1:+.1%} | {low:.0f} | "
                     f"{low / base_min - 1:+.1%} | " + ", ".join(f"{v:.0f}" for v in vals)
                     + " |")
    text = "\n".join(lines)
    print(text)
    out = DATA_DIR / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"obs-micro-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
