"""CPU time per search (or read) request: the gateway's ASGI app and the baseline's
(bench/baseline_app.py) in one process, driven in-process in alternating blocks, and the
same for the gateway at an earlier commit, in interleaved interpreters.

    python bench/search_cpu.py                          # (b) family+gender, 5 rounds
    python bench/search_cpu.py --scenario c --rounds 3
    python bench/search_cpu.py --base-rev 12bcfbe       # also the gateway as it was then

On this 2-CPU machine, shared with other engineers' jobs, req/s over HTTP measures the share
of the CPU a server gets as much as its own work; process CPU time per request
(``time.process_time``: every thread, so the SQL worker threads too) is much steadier.

Each round runs one interpreter per gateway tree (this one; ``--base-rev`` if given, from
``git archive``), one after the other. An interpreter builds both apps — the gateway as
``serve`` builds it (log level info: one JSON request line per request, to /dev/null at the
file-descriptor level; the audit trail to a real file; every per-client limit off, as
http_bench.py's speed rounds; ``gc.freeze()`` and the young-generation threshold ``serve``
sets, which the baseline then enjoys too) and the baseline (this tree's
``bench/baseline_app.py`` in its default thread mode: always the same baseline) — checks
that they give the same answers (Bundles compared as http_bench.py compares them), warms
both, then times alternating blocks of ``--block`` requests, who goes first taking turns,
``--concurrency`` requests in flight (asyncio tasks; the default 16 is http_bench.py's
``wrk -c16``: the baseline then spreads over 16 threadpool threads, the gateway over its SQL
workers, as over HTTP; at 4 the ratio came out ~0.05 lower in this session). Requests are
bare ASGI calls (no HTTP parsing, no sockets: the same for both sides, so left out of both).

Prints per tree and round the median CPU µs per request of gateway and baseline and the
median of the blocks' paired ratios (baseline µs ÷ gateway µs: the throughput the gateway
would have relative to the baseline on a CPU of its own); then, over all rounds, the median
paired ratio with a 95 % bootstrap interval. The result goes to bench/.data/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, REPO, ensure_demo, gateway_env, git_rev, machine, versions
from http_bench import SCENARIOS, bootstrap_median_ci, workload

CHILD = r"""
import asyncio, gc, json, logging, os, sys, time
from gateway.app import build_app  # first: http_bench puts its own tree on sys.path
from gateway.settings import Settings
sys.path.insert(0, os.environ["CCG_BENCH_DIR"])  # this tree's bench helpers and baseline
import baseline_app
from http_bench import first_difference, normalise

args = json.loads(sys.argv[1])
paths, block, pairs, conc = args["paths"], args["block"], args["pairs"], args["concurrency"]
logging.disable(logging.CRITICAL)
gw = build_app(Settings.from_env())
bl = baseline_app.build(args["db"], "thread")
BASE = "http://127.0.0.1:8090"


async def call(app, path, want_body=False):
    p, _, q = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "GET", "scheme": "http", "path": p,
             "raw_path": p.encode(), "query_string": q.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8090"), (b"accept", b"*/*")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8090)}
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    status, body = [], []

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif want_body:
            body.append(message.get("body", b""))

    await app(scope, receive, send)
    if status != [200]:
        raise SystemExit(f"{path}: HTTP {status}")
    return b"".join(body)


async def block_of(app, start):
    todo = iter(range(start, start + block))

    async def worker():
        for i in todo:
            await call(app, paths[i % len(paths)])

    await asyncio.gather(*(worker() for _ in range(conc)))


async def main():
    async with gw.router.lifespan_context(gw):
        checked = entries = 0
        for path in paths[: args["verify"]]:
            jg = normalise(json.loads(await call(gw, path, True)), BASE)
            jb = normalise(json.loads(await call(bl, path, True)), BASE)
            diff = first_difference(jg, jb)
            if diff:
                raise SystemExit(f"NOT EQUIVALENT {path}: {diff}")
            checked += 1
            entries += len(jg.get("entry", [])) if isinstance(jg, dict) else 0
        for app in (gw, bl):  # warm: statements compiled, caches filled
            await block_of(app, 0)
            await block_of(app, block)
        gc.collect()
        gc.freeze()  # as `serve` does after start-up (gateway/workers.py)
        gc.set_threshold(10_000, 20, 100)
        out = {"gateway": [], "baseline": []}
        for k in range(pairs):
            order = [("gateway", gw), ("baseline", bl)]
            if k % 2:
                order.reverse()
            for name, app in order:
                t = time.process_time()
                await block_of(app, (2 + k) * block)
                out[name].append((time.process_time() - t) / block * 1e6)
    import gateway
    tree = os.path.dirname(os.path.dirname(gateway.__file__))
    sys.stderr.write("RESULT " + json.dumps({**out, "checked": checked, "entries": entries,
                                             "gateway_tree": tree}) + "\n")


saved = os.dup(1)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)  # the gateway's request lines (stdout), as a deployed log would take them
try:
    asyncio.run(main())
finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
"""


def run_child(src: Path, env: dict[str, str], payload: dict[str, object]) -> dict[str, object]:
    bench_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], cwd=src,
                          env={**env, "PYTHONPATH": str(src), "CCG_BENCH_DIR": bench_dir},
                          capture_output=True, text=True, timeout=1800)
    # the result line goes to stderr: stdout (the request lines) goes to /dev/null
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("RESULT "):
            result: dict[str, object] = json.loads(line[7:])
            return result
    raise SystemExit(f"no result from {src} (exit {proc.returncode}):\n"
                     f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", choices=tuple(SCENARIOS), default="b")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=6, help="paired blocks per round")
    ap.add_argument("--block", type=int, default=100, help="requests per block")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="requests in flight (16: http_bench.py's wrk -c16)")
    ap.add_argument("--verify", type=int, default=30, help="paths compared before timing")
    ap.add_argument("--base-rev", default="",
                    help="also time the gateway at this commit (git archive), interleaved")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    db, _ = ensure_demo(args.patients)
    paths = workload(db, args.seed, 1000)[args.scenario]
    tmp = Path(tempfile.mkdtemp(prefix="search-cpu-"))  # the old tree, data dir, audit trail
    try:
        return _run(args, paths, db, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, paths: list[str], db: Path, tmp: Path) -> int:
    trees: dict[str, Path] = {f"HEAD {git_rev()}": REPO}
    if args.base_rev:
        base = tmp / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base_rev],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        trees = {f"base {args.base_rev}": base, **trees}
    env = gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}", CCG_DATA_DIR=str(tmp / "data"),
                      CCG_LOG_LEVEL="info", CCG_AUDIT_LOG=str(tmp / "audit.jsonl"))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    payload = {"paths": paths, "block": args.block, "pairs": args.pairs,
               "concurrency": args.concurrency, "verify": args.verify, "db": str(db.resolve())}
    print(f"# {SCENARIOS[args.scenario]}: {args.rounds} rounds x {args.pairs} pairs of "
          f"{args.block} requests, {args.concurrency} in flight; {machine()}; {versions()}",
          flush=True)
    results: dict[str, dict[str, list[float]]] = {
        t: {"gateway": [], "baseline": [], "ratios": [], "round_ratios": []} for t in trees}
    checked = ""
    for rnd in range(args.rounds):
        names = list(trees) if rnd % 2 == 0 else list(reversed(trees))
        for name in names:
            load0 = os.getloadavg()[0]
            r = run_child(trees[name], env, payload)
            if Path(str(r.pop("gateway_tree"))).resolve() != trees[name].resolve():
                raise SystemExit(f"{name}: the interpreter imported another gateway")
            g, b = r["gateway"], r["baseline"]
            assert isinstance(g, list) and isinstance(b, list)
            ratios = [bb / gg for gg, bb in zip(g, b, strict=True)]
            res = results[name]
            res["gateway"] += g
            res["baseline"] += b
            res["ratios"] += ratios
            res["round_ratios"].append(statistics.median(ratios))
            checked = f"{r['checked']} paths ({r['entries']} entries) equal"
            print(f"  round {rnd + 1} {name:16} gateway {statistics.median(g):7.0f} µs  "
                  f"baseline {statistics.median(b):7.0f} µs  ratio "
                  f"{statistics.median(ratios):.2f}x  (blocks "
                  + ", ".join(f"{x:.2f}" for x in ratios) + f"; load {load0:.1f})", flush=True)
    lines = [f"### CPU µs per request in-process, {SCENARIOS[args.scenario]} "
             f"({time.strftime('%Y-%m-%d %H:%M')} UTC)", "",
             f"`python bench/search_cpu.py {' '.join(sys.argv[1:])}`; {machine()}; "
             f"{versions()}; equivalence: {checked} before timing in every interpreter; "
             f"load average {os.getloadavg()[0]:.1f} at the end.", "",
             "| gateway tree | gateway µs/req (median; range) | baseline µs/req (median; range)"
             " | baseline ÷ gateway: median of all blocks (95 % CI) | rounds' medians |",
             "|---|---:|---:|---:|---|"]
    for name, res in results.items():
        g, b, ratios = res["gateway"], res["baseline"], res["ratios"]
        lo, hi = bootstrap_median_ci(ratios)
        lines.append(
            f"| {name} | {statistics.median(g):,.0f} ({min(g):,.0f}-{max(g):,.0f}) | "
            f"{statistics.median(b):,.0f} ({min(b):,.0f}-{max(b):,.0f}) | "
            f"**{statistics.median(ratios):.2f}x** ({lo:.2f}-{hi:.2f}) | "
            + ", ".join(f"{x:.2f}" for x in res["round_ratios"]) + " |")
    text = "\n".join(lines)
    print(text)
    out = DATA_DIR / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"search-cpu-{args.scenario}-{stamp}.md").write_text(text + "\n")
    (out / f"search-cpu-{args.scenario}-{stamp}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
