"""End-to-end FHIR over HL7 v2: the gateway (one uvicorn worker) against the PAS simulator.

    python bench/hl7v2_http_bench.py                   # 10,000 patients, 10 s per scenario
    python bench/hl7v2_http_bench.py --duration 20 --connections 16 --rounds 3

1. builds (or reuses) the demo PAS at ``--patients`` in the bench data dir (bench/.data) and
   draws the workload from it (seeded): ``--workload-size`` request paths per scenario;
2. CAPTURE: in this process, an in-process ``PasSimulator`` and the gateway app
   (``build_app`` on mappings/demo-hl7v2) answer every workload path through the ASGI
   interface, while the HL7 v2 adapter's MLLP client records the exact messages each request
   sends. Every request must be 200 (and every search must find someone): this checks the
   workload, and gives the raw baseline the very bytes the gateway sends;
3. starts ``careconnect-gateway pas-simulator`` (pinned to ``--sim-cpu``, default 1) over the
   same database, and ``careconnect-gateway serve --mappings mappings/demo-hl7v2`` (ONE uvicorn
   worker, pinned to ``--server-cpu``, default 0) with ``CCG_PAS_HL7_URL`` pointing at it;
4. per scenario (rounds alternate):
   * SIMULATOR ALONE: a raw asyncio MLLP client (framing only, no HL7 parsing) pinned to the
     gateway's CPU replays the captured messages with as many connections as the gateway's
     MLLP pool (``pool_size`` in connections.yaml), for ``--duration`` seconds: the most the
     gateway could get through that pool from this simulator;
   * GATEWAY: a warm-up, then ``--duration`` seconds of ``wrk`` (``--connections``, pinned to
     ``--client-cpu``, default 1, beside the simulator; a Lua script rotates the paths) or,
     without wrk, a bounded asyncio httpx client;
   * the CPU each process used (from /proc), so the simulator's share of each request shows;
5. prints the table (and writes it with the raw figures to bench/.data/results/).

Scenarios: (a) ``Patient/{PAS number}`` → QBP^Q21; (b) ``Patient?family=..&gender=..`` first
page of 20 → QBP^Q22; (c) ``Encounter?patient={PAS number}`` → QBP^ZV1.

Every load loop is bounded in time (and the raw client also in count); everything listens on
127.0.0.1 only; the servers are stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    DATA_DIR,
    HZ,
    REPO,
    Interference,
    ensure_demo,
    machine,
    proc_jiffies,
    taskset,
    versions,
    wait_quiet,
)

MAPPINGS = REPO / "mappings" / "demo-hl7v2"
SEX_CODE = {"1": "male", "2": "female", "9": "other", "X": "unknown"}
SCENARIOS = {
    "a": "(a) Patient read by id (Q21)",
    "b": "(b) Patient family+gender, 20/page (Q22)",
    "c": "(c) Encounter?patient= (ZV1)",
}


# --- workload -------------------------------------------------------------------------------


def workload(db: Path, seed: int, size: int) -> dict[str, list[str]]:
    """Request paths per scenario, drawn (seeded) from the database itself."""
    rnd = random.Random(seed)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    live = [r for r in con.execute('SELECT "PASID", "SURNAME", "SEXXX_CODE" FROM "PATIENTS" '
                                   'WHERE "ARCHV_FLAG" != \'Y\' ORDER BY "PATNT_REFNO"')]
    with_spells = [r[0] for r in con.execute(
        'SELECT DISTINCT p."PASID" FROM "PATIENTS" p JOIN "PROVIDER_SPELLS" s '
        'ON s."PATNT_REFNO" = p."PATNT_REFNO" WHERE p."ARCHV_FLAG" != \'Y\' '
        'ORDER BY p."PASID"')]
    con.close()
    people = [rnd.choice(live) for _ in range(size)]  # realistic surname frequencies
    searched = [rnd.choice(live) for _ in range(size)]
    return {
        "a": [f"/STU3/Patient/{p[0]}" for p in people],
        "b": [f"/STU3/Patient?{urlencode([('family', s.lower()), ('gender', SEX_CODE[g])])}"
              for _, s, g in searched],
        "c": [f"/STU3/Encounter?{urlencode([('patient', rnd.choice(with_spells))])}"
              for _ in range(size)],
    }


def pool_size() -> int:
    """The gateway's MLLP pool: at most this many messages in flight to the PAS."""
    import yaml

    doc = yaml.safe_load((MAPPINGS / "connections.yaml").read_text())
    return int(doc["connections"]["pas-hl7"].get("pool_size", 2))


# --- capture: what the gateway sends for each path -------------------------------------------


def capture(db: Path, paths: dict[str, list[str]], dialect: str = "demo") -> dict[str, Any]:
    """Serve every path in process (simulator + app) and record the MLLP messages it sends."""
    from gateway.app import build_app
    from gateway.demo_pas.hl7v2 import PasSimulator
    from gateway.settings import Settings

    async def go() -> dict[str, Any]:
        async with PasSimulator(f"sqlite:///{db.resolve()}", dialect=dialect) as sim:
            app = build_app(Settings.from_env(
                mappings_dir=MAPPINGS, log_level="error", paging_secret="bench", progress=False,
                connection_urls={"pas-hl7": f"mllp://127.0.0.1:{sim.port}",
                                 "pas": f"sqlite:///{db.resolve()}"}))
            sent: list[bytes] = []
            seen: set[int] = set()
            for provider in app.state.registry.sources():
                adapter = provider.mapping.adapter
                client = getattr(adapter, "client", None)
                if client is None or id(client) in seen:
                    continue
                seen.add(id(client))
                original = client.send

                async def recording(msg: bytes, control: str, _orig: Any = original,
                                    **kw: Any) -> bytes:
                    sent.append(msg)
                    reply: bytes = await _orig(msg, control, **kw)
                    return reply

                client.send = recording
            out: dict[str, Any] = {}
            async with app.router.lifespan_context(app):
                for scen, plist in paths.items():
                    requests, entries = [], []
                    for path in plist:
                        sent.clear()
                        status, body = await asgi_get(app, path)
                        if status != 200:
                            raise SystemExit(f"capture: {path} → HTTP {status}")
                        doc = json.loads(body)
                        n = len(doc.get("entry", [])) if doc.get("resourceType") == "Bundle" else 1
                        if n == 0:
                            raise SystemExit(f"capture: {path} found nothing")
                        entries.append(n)
                        requests.append([m.decode("latin-1") for m in sent])
                    out[scen] = {"requests": requests, "entries": entries}
        return out

    return asyncio.run(go())


async def asgi_get(app: Any, path: str) -> tuple[int, bytes]:
    raw_path, _, query = path.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": raw_path, "raw_path": raw_path.encode(),
        "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8092"), (b"accept", b"application/fhir+json")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8092),
    }
    status, body = 0, bytearray()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(body)


# --- the raw MLLP client (runs in its own pinned process: --raw-client FILE) -------------------


async def raw_mllp_load(port: int, requests: list[list[bytes]], seconds: float,
                        connections: int, max_requests: int, offset: int) -> dict[str, Any]:
    from adapters.hl7v2.mllp import FrameDecoder, frame

    framed = [[frame(m) for m in req] for req in requests]
    lat: list[int] = []
    errors = 0
    counter = [offset]
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        decoder = FrameDecoder()
        pending: list[bytes] = []
        try:
            while time.perf_counter() < stop and len(lat) < max_requests:
                counter[0] += 1
                t = time.perf_counter_ns()
                for msg in framed[counter[0] % len(framed)]:
                    writer.write(msg)
                    while not pending:
                        data = await asyncio.wait_for(reader.read(65536), 30)
                        if not data:
                            raise ConnectionError("simulator closed the connection")
                        pending.extend(decoder.feed(data))
                    reply = pending.pop(0)
                    if b"MSA|AA|" not in reply:
                        errors += 1
                lat.append(time.perf_counter_ns() - t)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    dur = time.perf_counter() - t0
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1000

    return {"requests": len(lat), "duration_us": dur * 1e6, "p50_us": q(.5), "p90_us": q(.9),
            "p99_us": q(.99), "max_us": lat[-1] / 1000,
            "mean_us": statistics.fmean(lat) / 1000, "errors": errors}


def raw_client_main(spec_file: Path) -> int:
    spec = json.loads(spec_file.read_text())
    requests = [[m.encode("latin-1") for m in req] for req in spec["requests"]]
    r = asyncio.run(raw_mllp_load(spec["port"], requests, spec["seconds"],
                                  spec["connections"], spec["max_requests"], spec["offset"]))
    print("BENCHJSON " + json.dumps(r))
    return 0


def run_raw(port: int, requests: list[list[str]], seconds: float, connections: int, cpu: int,
            tmp: Path, offset: int = 0) -> dict[str, Any]:
    spec = tmp / f"raw-{os.getpid()}-{offset}.json"
    spec.write_text(json.dumps({"port": port, "requests": requests, "seconds": seconds,
                                "connections": connections, "offset": offset,
                                "max_requests": 2_000_000}))
    proc = subprocess.run([*taskset(cpu), sys.executable, str(Path(__file__).resolve()),
                           "--raw-client", str(spec)], capture_output=True, text=True,
                          timeout=seconds + 120, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            r: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            return r
    raise SystemExit(f"raw MLLP client produced no result:\n{proc.stdout}\n{proc.stderr}")


# --- HTTP load (wrk, or a bounded httpx client) -------------------------------------------------

LUA = """
local paths = {%(paths)s}
local n = #paths
local i = %(offset)d
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% n) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"mean_us":%%.1f,"err_connect":%%d,"err_read":%%d,"err_write":%%d,' ..
    '"err_status":%%d,"err_timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout))
end
"""


def run_wrk(base: str, paths: list[str], seconds: float, connections: int, threads: int,
            client_cpu: int, tmp: Path, offset: int = 0) -> dict[str, Any]:
    script = tmp / f"rotate-{os.getpid()}-{offset}.lua"
    script.write_text(LUA % {"paths": ",".join(json.dumps(p) for p in paths), "offset": offset})
    cmd = [*taskset(client_cpu), "wrk", f"-t{threads}", f"-c{connections}",
           f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(script), base]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            r: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["errors"] = sum(v for k, v in r.items() if k.startswith("err_"))
            return r
    raise SystemExit(f"wrk produced no result:\n{proc.stdout}\n{proc.stderr}")


def run_httpx(base: str, paths: list[str], seconds: float, connections: int,
              client_cpu: int, offset: int = 0) -> dict[str, Any]:
    """Fallback load generator: a bounded asyncio httpx client in a pinned subprocess."""
    code = f"""
import asyncio, json, os, time, httpx, statistics
try: os.sched_setaffinity(0, {{{client_cpu}}})
except Exception: pass
paths = {paths!r}; n = len(paths)
async def main():
    lat = []; errors = 0; counter = [{offset}]
    limits = httpx.Limits(max_connections={connections}, max_keepalive_connections={connections})
    async with httpx.AsyncClient(base_url={base!r}, limits=limits, timeout=30) as c:
        stop = time.perf_counter() + {seconds}
        async def worker():
            nonlocal errors
            while time.perf_counter() < stop:
                counter[0] += 1
                t = time.perf_counter_ns()
                r = await c.get(paths[counter[0] % n])
                lat.append(time.perf_counter_ns() - t)
                if r.status_code >= 400: errors += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range({connections})))
        dur = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000
    print("BENCHJSON " + json.dumps({{"requests": len(lat), "duration_us": dur * 1e6,
        "p50_us": q(.5), "p90_us": q(.9), "p99_us": q(.99), "max_us": lat[-1] / 1000,
        "mean_us": statistics.fmean(lat) / 1000, "errors": errors}}))
asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=seconds + 120)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            r: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            return r
    raise SystemExit(f"httpx client produced no result:\n{proc.stdout}\n{proc.stderr}")


# --- servers --------------------------------------------------------------------------------


class Proc:
    """A server subprocess in its own session, ready when ``ready()`` says so."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.cmd, self.env, self.log = name, cmd, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: Any, timeout: float = 120.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            if ready():
                return
            time.sleep(0.2)
        raise SystemExit(f"{self.name} not ready in {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL, 5 s apart: only this process (own session).
        (A shell that runs this script in the background makes its children ignore SIGINT.)"""
        if self.proc is None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.proc = None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def tcp_ready(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_ready(base: str) -> bool:
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(base + "/_health", timeout=2).status_code == 200
    return False


@contextlib.contextmanager
def running(*procs: tuple[Proc, Any]) -> Iterator[None]:
    started: list[Proc] = []
    try:
        for p, ready in procs:
            started.append(p)
            p.start(ready)
        yield
    finally:
        for p in reversed(started):
            p.stop()


def tree_state() -> str:
    """HEAD and how many files differ from it: the figures are of the working tree."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=REPO, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=REPO,
                               timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"HEAD {head}" + (f" + {len(dirty)} modified files" if dirty else "")


# --- report -----------------------------------------------------------------------------------


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "gateway req/s", "p50 ms", "p99 ms", "sim alone req/s", "p50 ms",
            "p99 ms", "gateway/sim", "gw CPU ms/req", "sim CPU ms/req", "gw/sim core %",
            "non-2xx (g/s)", "others' CPU %"]
    body = []
    for r in rows:
        g, s = r["gateway"], r["simulator"]
        body.append([SCENARIOS[r["scenario"]], f"{g['rps']:,.0f}", f"{g['p50_us'] / 1000:.2f}",
                     f"{g['p99_us'] / 1000:.2f}", f"{s['rps']:,.0f}", f"{s['p50_us'] / 1000:.2f}",
                     f"{s['p99_us'] / 1000:.2f}", f"{g['rps'] / s['rps']:.2f}x",
                     f"{g['gw_cpu_ms']:.2f}", f"{g['sim_cpu_ms']:.2f}",
                     f"{g['gw_core_pct']:.0f} / {g['sim_core_pct']:.0f}",
                     f"{g['errors']} / {s['errors']}",
                     f"{g['others_cpu_pct']:.1f} / {s['others_cpu_pct']:.1f}"])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [fmt_row(head, widths),
             "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2))
                            for i, w in enumerate(widths)) + "|"]
    lines += [fmt_row(b, widths) for b in body]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description="FHIR over HL7 v2 end to end (see module doc)")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per run")
    ap.add_argument("--connections", type=int, default=16, help="HTTP connections (wrk)")
    ap.add_argument("--mllp-connections", type=int, default=0,
                    help="raw MLLP client connections (default: the gateway's pool_size)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat each measurement, report the round with the median req/s")
    ap.add_argument("--scenarios", default="a,b,c")
    ap.add_argument("--dialect", choices=("demo", "itk", "strict"), default="demo",
                    help="the simulator's dialect profile (the gateway keeps the ITK "
                         "defaults: use demo or itk)")
    ap.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto")
    ap.add_argument("--server-cpu", type=int, default=0, help="the gateway's CPU")
    ap.add_argument("--sim-cpu", type=int, default=1, help="the PAS simulator's CPU")
    ap.add_argument("--client-cpu", type=int, default=1, help="wrk's CPU")
    ap.add_argument("--gateway-port", type=int, default=8092)
    ap.add_argument("--sim-port", type=int, default=2592)
    ap.add_argument("--auth-mode", default="insecure-demo",
                    help="CCG_AUTH_MODE for the gateway ('' leaves it unset: then the demo "
                         "wants a dev-key JWT and every request here would be 401)")
    ap.add_argument("--rate-limit-per-minute", type=int, default=0,
                    help="CCG_RATE_LIMIT_PER_MINUTE for the gateway (0: no per-client limit)")
    ap.add_argument("--gateway-log-level", default="info",
                    help="CCG_LOG_LEVEL for the gateway (default info: one line per request)")
    ap.add_argument("--workload-size", type=int, default=200,
                    help="request paths per scenario (all captured and checked first)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quiet-threshold", type=float, default=10.0,
                    help="before each run, wait until under this %% of all CPUs is busy")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="longest wait for a quiet machine (s); then measure anyway")
    ap.add_argument("--max-interference", type=float, default=5.0,
                    help="retry a run in which other processes used more than this %% of "
                         "the CPUs")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--raw-client", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_client:
        return raw_client_main(args.raw_client)
    # A plain `kill` of this script still stops the servers (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "httpx"
    if client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install -y wrk (or --client httpx)")
    for port in (args.gateway_port, args.sim_port):
        if not port_free(port):
            raise SystemExit(f"port {port} is in use")
    mllp_conns = args.mllp_connections or pool_size()
    pinned = all(taskset(c) for c in (args.server_cpu, args.sim_cpu, args.client_cpu))

    t0 = time.perf_counter()
    db, info = ensure_demo(args.patients, args.data_dir)
    print(f"demo PAS: {db} ({args.patients:,} patients, "
          f"{'reused' if info['reused'] else f'built in {time.perf_counter() - t0:.1f} s'})",
          flush=True)
    # For the capture app and the served gateway alike: authentication off (or as asked), and
    # no per-client rate limit (all the load comes from one client: a 429 is not a response).
    if args.auth_mode:
        os.environ["CCG_AUTH_MODE"] = args.auth_mode
    os.environ["CCG_RATE_LIMIT_PER_MINUTE"] = str(args.rate_limit_per_minute)
    print(f"code: {tree_state()}", flush=True)
    paths = {k: v for k, v in workload(db, args.seed, args.workload_size).items()
             if k in scenarios}
    t0 = time.perf_counter()
    captured = capture(db, paths, args.dialect)
    checked = {s: {"requests": len(c["requests"]),
                   "messages_per_request": statistics.mean(len(r) for r in c["requests"]),
                   "entries_mean": round(statistics.mean(c["entries"]), 2)}
               for s, c in captured.items()}
    print(f"capture: every path answered 200 in process ({time.perf_counter() - t0:.1f} s); "
          + "; ".join(f"{s}: {c['messages_per_request']:.2f} MLLP messages/request, "
                      f"{c['entries_mean']} resources/response" for s, c in checked.items()),
          flush=True)

    logs = args.data_dir / "logs"
    sim = Proc("pas-simulator",
               [*taskset(args.sim_cpu), sys.executable, "-m", "gateway.cli", "pas-simulator",
                "--port", str(args.sim_port), "--db", str(db.resolve()),
                "--dialect", args.dialect],
               dict(os.environ), logs / "hl7v2-simulator.log")
    env = {**os.environ, "CCG_PAS_URL": f"sqlite:///{db.resolve()}",
           "CCG_PAS_HL7_URL": f"mllp://127.0.0.1:{args.sim_port}",
           "CCG_PAGING_SECRET": "bench-paging-secret", "CCG_LOG_LEVEL": args.gateway_log_level}
    env.pop("CCG_PORT", None)
    gw = Proc("gateway",
              [*taskset(args.server_cpu), sys.executable, "-m", "gateway.cli", "serve",
               "--port", str(args.gateway_port), "--mappings", str(MAPPINGS)],
              env, logs / "hl7v2-gateway.log")
    base = f"http://127.0.0.1:{args.gateway_port}"
    results: list[dict[str, Any]] = []
    with running((sim, lambda: tcp_ready(args.sim_port)), (gw, lambda: http_ready(base))), \
            tempfile.TemporaryDirectory(prefix="ccg-hl7bench-") as tmpdir:
        tmp = Path(tmpdir)
        print(f"servers: gateway :{args.gateway_port} (one uvicorn worker, CPU {args.server_cpu})"
              f", PAS simulator :{args.sim_port} (CPU {args.sim_cpu}); "
              f"{'pinned' if pinned else 'NOT pinned (no taskset)'}; HTTP client: {client} on "
              f"CPU {args.client_cpu}, {args.connections} connections; raw MLLP client on CPU "
              f"{args.server_cpu}, {mllp_conns} connections (the gateway's pool_size)",
              flush=True)

        def measure(kind: str, scen: str, rnd: int) -> dict[str, Any]:
            def load(seconds: float, offset: int) -> dict[str, Any]:
                if kind == "simulator":
                    return run_raw(args.sim_port, captured[scen]["requests"], seconds,
                                   mllp_conns, args.server_cpu, tmp, offset)
                if client == "wrk":
                    return run_wrk(base, paths[scen], seconds, args.connections, args.threads,
                                   args.client_cpu, tmp, offset)
                return run_httpx(base, paths[scen], seconds, args.connections,
                                 args.client_cpu, offset)

            best: dict[str, Any] | None = None
            for attempt in range(1 + args.retries):
                wait_quiet(args.quiet_threshold, args.quiet_wait)
                if args.warmup > 0:
                    load(args.warmup, 500 + rnd)
                j0 = {p.name: proc_jiffies(p.pid) for p in (gw, sim)}
                ru = resource.getrusage(resource.RUSAGE_CHILDREN)
                kids0 = ru.ru_utime + ru.ru_stime
                t = time.perf_counter()
                with Interference([gw.pid, sim.pid]) as noise:
                    r = load(args.duration, rnd * 97)
                wall = time.perf_counter() - t
                ru = resource.getrusage(resource.RUSAGE_CHILDREN)
                used = {p.name: (proc_jiffies(p.pid) - j0[p.name]) / HZ for p in (gw, sim)}
                n = max(1, r["requests"])
                r.update({
                    "others_cpu_pct": round(noise.percent, 1),
                    "gw_cpu_ms": 1000 * used["gateway"] / n,
                    "sim_cpu_ms": 1000 * used["pas-simulator"] / n,
                    "client_cpu_ms": 1000 * (ru.ru_utime + ru.ru_stime - kids0) / n,
                    "gw_core_pct": 100 * used["gateway"] / wall,
                    "sim_core_pct": 100 * used["pas-simulator"] / wall,
                })
                retry = noise.percent > args.max_interference and attempt < args.retries
                label = "gateway" if kind == "gateway" else "sim alone"
                print(f"  {SCENARIOS[scen]:42} {label:9} round {rnd + 1}: {r['rps']:8,.1f} req/s"
                      f"  p50 {r['p50_us'] / 1000:7.2f} ms  p99 {r['p99_us'] / 1000:7.2f} ms  "
                      f"errors {r['errors']}  CPU gw {r['gw_core_pct']:3.0f}% sim "
                      f"{r['sim_core_pct']:3.0f}%  others' CPU {noise.percent:4.1f}%"
                      f"{'  (retrying)' if retry else ''}", flush=True)
                if best is None or r["others_cpu_pct"] < best["others_cpu_pct"]:
                    best = r
                if not retry:
                    break
            assert best is not None
            return best

        for scen in scenarios:
            row: dict[str, Any] = {"scenario": scen, "path_example": paths[scen][0],
                                   "capture": checked[scen]}
            runs: dict[str, list[dict[str, Any]]] = {"simulator": [], "gateway": []}
            for rnd in range(args.rounds):  # simulator alone and gateway alternate
                for kind in ("simulator", "gateway"):
                    runs[kind].append(measure(kind, scen, rnd))
            for name, rs in runs.items():
                med = statistics.median_low([r["rps"] for r in rs])
                chosen = next(r for r in rs if r["rps"] == med)
                chosen["rounds_rps"] = [round(r["rps"], 1) for r in rs]
                row[name] = chosen
            results.append(row)

    out = table(results)
    print()
    print(out)
    bad = [SCENARIOS[r["scenario"]] for r in results
           if r["gateway"]["errors"] or r["simulator"]["errors"]]
    if bad:
        print(f"\nWARNING: non-2xx responses / non-AA replies in {', '.join(bad)}: "
              "those figures are not of successful requests (see the logs in "
              f"{args.data_dir / 'logs'})")
    print()
    print("sim alone = a raw MLLP client replaying the gateway's own captured queries with "
          f"{mllp_conns} connections (the gateway's MLLP pool): the bound for the gateway. "
          "CPU ms/req = CPU time of that process per HTTP request; core % = share of its "
          "pinned core during the gateway run.")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    res_dir = args.data_dir / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "versions": versions(),
            "patients": args.patients, "duration_s": args.duration, "warmup_s": args.warmup,
            "connections": args.connections, "mllp_connections": mllp_conns, "client": client,
            "rounds": args.rounds, "gateway_log_level": args.gateway_log_level,
            "auth_mode": args.auth_mode, "code": tree_state(),
            "rate_limit_per_minute": args.rate_limit_per_minute,
            "cpus": {"gateway": args.server_cpu, "simulator": args.sim_cpu,
                     "http_client": args.client_cpu, "raw_mllp_client": args.server_cpu}}
    (res_dir / f"hl7v2-http-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2))
    (res_dir / f"hl7v2-http-{stamp}.md").write_text(out + "\n")
    print(f"\nresults: {res_dir / f'hl7v2-http-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
