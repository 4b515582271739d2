"""Scale-out and observability figures (issue 15), each beside a baseline from the same run.

    python bench/scale_bench.py                       # ~6 minutes on the 10,000-patient demo
    python bench/scale_bench.py --duration 4 --rounds 2 --memory-seconds 60

Three parts, all over real HTTP (``careconnect-gateway serve``, uvicorn) on loopback, load
from ``wrk`` (or a bounded httpx client) on the SAME machine — the load generator shares the
cores with the gateway, so "2 workers" means 2 gateway processes plus the generator on 2 CPUs:

1. **observability cost** — one worker, (a) Patient read and (b) family+gender search, for:
   ``base`` = the gateway at ``--base-rev`` (before this work, extracted with ``git archive``),
   ``off`` = this tree with metrics and traces off (``CCG_METRICS=false``),
   ``metrics`` = this tree as shipped (metrics on, traces off),
   ``traces`` = metrics and OpenTelemetry traces on, exported over OTLP/HTTP in batches to a
   local sink that accepts and discards them (the export's CPU is on the same machine);
   ``traces10`` = the same, sampling one trace in ten (OTEL_TRACES_SAMPLER=
   parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1).
   The servers run side by side; rounds interleave them (ABCD ABCD ...) so drift in what
   else the machine does spreads over all; the figure is the median over rounds.
2. **workers** — ``--workers 1`` against ``--workers 2`` (metrics on), same scenarios.
3. **memory** — RSS of one worker (``--workers 1``: the serving process itself) after
   ``--memory-seconds`` of mixed load (reads, searches, 100-entry Bundles), beside its RSS
   just after start-up.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    DATA_DIR,
    HZ,
    REPO,
    ensure_demo,
    gateway_env,
    machine,
    proc_jiffies,
    versions,
)
from http_bench import run_httpx, run_wrk, workload

SCEN = {"a": "(a) Patient read", "b": "(b) family+gender search"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that accepts every export and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def family(pid: int) -> list[int]:
    """The process and its descendants (the workers of ``--workers N``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


class Gateway:
    def __init__(self, name: str, src: Path, env: dict[str, str], workers: int,
                 logdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**env, "PYTHONPATH": str(src)}
        args = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port)]
        if workers > 1:
            args += ["--workers", str(workers)]
        self.log = (logdir / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(args, cwd=src, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited; see its log")
            try:
                if httpx.get(f"{self.base}/_ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


def load(args: argparse.Namespace, gw: Gateway, paths: list[str], seconds: float,
         offset: int, tmp: Path) -> dict[str, Any]:
    """Load for ``seconds``; also the gateway's own CPU time per request (all its processes):
    unlike throughput, hardly moved by what else runs on a shared machine."""
    pids = family(gw.proc.pid)
    before = sum(proc_jiffies(p) for p in pids)
    if args.client == "wrk":
        r = run_wrk(gw.base, paths, seconds, args.connections, 1, 0, tmp, offset)
    else:
        r = run_httpx(gw.base, paths, seconds, args.connections, 0, offset)
    used = sum(proc_jiffies(p) for p in pids) - before
    r["cpu_us"] = used / HZ * 1e6 / max(1, r["requests"])
    return r


def compare(args: argparse.Namespace, gateways: list[Gateway], paths: dict[str, list[str]],
            tmp: Path, title: str, baseline: str) -> list[str]:
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for scen in SCEN:
        for gw in gateways:  # warm-up: caches, code paths, connection pools
            load(args, gw, paths[scen], 2, 0, tmp)
        for rnd in range(args.rounds):
            order = gateways if rnd % 2 == 0 else gateways[::-1]
            for gw in order:
                r = load(args, gw, paths[scen], args.duration, 1000 * (rnd + 1), tmp)
                if r.get("errors"):
                    raise SystemExit(f"{gw.name} {scen}: {r['errors']} errors")
                results.setdefault((scen, gw.name), []).append(r)
                print(f"  {scen} {gw.name:8} round {rnd + 1}: {r['rps']:8,.0f} req/s "
                      f"p50 {r['p50_us'] / 1000:.2f} ms p99 {r['p99_us'] / 1000:.2f} ms "
                      f"CPU {r['cpu_us']:.0f} us/req",
                      flush=True)
    lines = [f"### {title}", "",
             "| scenario | server | req/s (median) | vs " + baseline + " | gateway CPU µs/req | "
             "vs " + baseline + " | p50 ms | p99 ms | rounds req/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for scen, label in SCEN.items():
        base_rps = statistics.median(r["rps"] for r in results[(scen, baseline)])
        base_cpu = statistics.median(r["cpu_us"] for r in results[(scen, baseline)])
        for gw in gateways:
            rs = results[(scen, gw.name)]
            rps = statistics.median(r["rps"] for r in rs)
            cpu = statistics.median(r["cpu_us"] for r in rs)
            lines.append(
                f"| {label} | {gw.name} | {rps:,.0f} | {rps / base_rps - 1:+.1%} | "
                f"{cpu:,.0f} | {cpu / base_cpu - 1:+.1%} | "
                f"{statistics.median(r['p50_us'] for r in rs) / 1000:.2f} | "
                f"{statistics.median(r['p99_us'] for r in rs) / 1000:.2f} | "
                + ", ".join(f"{r['rps']:,.0f}" for r in rs) + " |")
    return lines


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--memory-seconds", type=float, default=60.0)
    ap.add_argument("--base-rev", default="693a6f2",
                    help="the gateway before this work (git archive of this revision)")
    ap.add_argument("--client", choices=("wrk", "httpx"),
                    default="wrk" if subprocess.run(["which", "wrk"], capture_output=True)
                    .returncode == 0 else "httpx")
    ap.add_argument("--parts", default="observability,workers,memory")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    db, _ = ensure_demo(args.patients)
    paths = workload(db, seed=15, size=2000)
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    env = gateway_env(CCG_DATA_DIR=str(DATA_DIR), CCG_DEMO_PATIENTS=str(args.patients),
                      CCG_LOG_LEVEL="warning", CCG_AUDIT_LOG=str(tmp / "audit.jsonl"),
                      CCG_PROGRESS="false")
    env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out: list[str] = [f"## Scale-out and observability ({time.strftime('%Y-%m-%d %H:%M')} UTC)",
                      "", f"{machine()}; {versions()}; client {args.client}, "
                      f"{args.connections} connections, {args.duration:g} s x {args.rounds} "
                      "rounds, interleaved; the load generator runs on the same 2 CPUs as the "
                      "gateway (and other engineers' work shares them too).", ""]
    gateways: list[Gateway] = []
    sink = None
    try:
        if "observability" in parts:
            base_src = tmp / "base"
            base_src.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base_rev],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base_src)], input=archive, check=True)
            sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
            threading.Thread(target=sink.serve_forever, daemon=True).start()
            otlp = f"http://127.0.0.1:{sink.server_address[1]}"
            gateways = [
                Gateway("base", base_src, env, 1, tmp),
                Gateway("off", REPO, {**env, "CCG_METRICS": "false"}, 1, tmp),
                Gateway("metrics", REPO, env, 1, tmp),
                Gateway("traces", REPO, {**env, "CCG_OTEL_TRACES": "otlp",
                                         "OTEL_EXPORTER_OTLP_ENDPOINT": otlp}, 1, tmp),
                Gateway("traces10", REPO, {**env, "CCG_OTEL_TRACES": "otlp",
                                           "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
                                           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                           "OTEL_TRACES_SAMPLER_ARG": "0.1"}, 1, tmp),
            ]
            for gw in gateways:
                gw.wait()
            print("observability cost", flush=True)
            out += compare(args, gateways, paths, tmp,
                           f"Observability cost, 1 worker (base = {args.base_rev})", "base")
            out.append("")
            for gw in gateways:
                gw.stop()
            gateways = []
        if "workers" in parts:
            gateways = [Gateway("1 worker", REPO, env, 1, tmp),
                        Gateway("2 workers", REPO, env, 2, tmp)]
            for gw in gateways:
                gw.wait()
            print("workers", flush=True)
            out += compare(args, gateways, paths, tmp, "1 worker vs 2 workers", "1 worker")
            out.append("")
            for gw in gateways:
                gw.stop()
            gateways = []
        if "memory" in parts:
            gw = Gateway("memory", REPO, env, 1, tmp)
            gateways = [gw]
            gw.wait()
            start_rss, _ = rss_kib(gw.proc.pid)
            mixed = [p for trio in zip(paths["a"], paths["b"], paths["c"], strict=True)
                     for p in trio]
            print("memory", flush=True)
            r = load(args, gw, mixed, args.memory_seconds, 0, tmp)
            rss, hwm = rss_kib(gw.proc.pid)
            out += ["### Memory of one worker", "",
                    "| when | RSS MiB | peak RSS MiB |", "|---|---:|---:|",
                    f"| after start-up (baseline) | {start_rss / 1024:.0f} | |",
                    f"| after {args.memory_seconds:g} s of mixed load ({r['requests']:,} "
                    f"requests: read, family+gender search, 100-entry Bundle) | "
                    f"{rss / 1024:.0f} | {hwm / 1024:.0f} |", ""]
            gw.stop()
            gateways = []
    finally:
        for gw in gateways:
            gw.stop()
        if sink is not None:
            sink.shutdown()
    text = "\n".join(out)
    print(text)
    results = DATA_DIR / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text)
    print(json.dumps({"written": str(results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
