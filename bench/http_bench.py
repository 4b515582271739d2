"""HTTP benchmark: the gateway (one uvicorn worker) against a hand-written BASELINE app.

    python bench/http_bench.py                    # 10,000 patients, 10 s per scenario
    python bench/http_bench.py --patients 100000 --duration 20 --connections 32

1. builds (or reuses) the demo PAS at ``--patients`` in the bench data dir (bench/.data);
2. starts ``careconnect-gateway serve`` and ``bench/baseline_app.py`` on the same SQLite file,
   each ONE uvicorn worker pinned to CPU ``--server-cpu`` (``taskset``);
3. checks that the two serve the same resources: for ``--verify`` random ids the Patient JSON
   must be equal (parsed; plus the same ETag/Last-Modified), and for a sample of every search
   scenario the Bundles must be equal ignoring Bundle id, Bundle meta.lastUpdated, the
   server's own base URL and the opaque ``_page`` token — otherwise it stops;
4. per scenario and server: a warm-up, then ``--duration`` seconds of load with
   ``--connections`` connections from ``wrk`` pinned to CPU ``--client-cpu`` (a Lua script
   rotates through ids / surnames), or, without wrk, a bounded asyncio httpx client;
5. prints the table (and writes it with the raw figures to bench/.data/results/).

Scenarios: (a) ``Patient/{id}``; (b) ``Patient?family=..&gender=..`` first page of 20;
(c) ``Patient?gender=female&birthdate=geYYYY&_count=100`` (a 100-entry Bundle).

The speed rounds run the gateway with every per-client and per-address limit off (``SPEED_ENV``
in _common.py: the rate limits, the auth-failure limit, the per-client in-flight cap and the
per-client backend queue): the load generator is one client on one address, and with the
shipped limits it would measure 429s and a queue, not the hot path. The bench prints this and
stops if any answer of a speed round is not a success (wrk counts 4xx/5xx; the httpx client
anything but 2xx). ``--shipped-limits`` adds one round per scenario with the shipped defaults,
labelled as such (its refusals are reported, not fatal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    DATA_DIR,
    HZ,
    REPO,
    SPEED_ENV,
    Interference,
    ensure_demo,
    gateway_env,
    machine,
    proc_jiffies,
    taskset,
    versions,
    wait_quiet,
)

SEX_CODE = {"1": "male", "2": "female", "9": "other", "X": "unknown"}
SCENARIOS = {
    "a": "(a) Patient read by id",
    "b": "(b) search family+gender, 20/page",
    "c": "(c) search 100-entry Bundle",
}


# --- workload -------------------------------------------------------------------------------


def workload(db: Path, seed: int, size: int) -> dict[str, list[str]]:
    """Request paths per scenario, drawn (seeded) from the database itself."""
    rnd = random.Random(seed)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    lo, hi = con.execute('SELECT min("PATNT_REFNO"), max("PATNT_REFNO") FROM "PATIENTS"').fetchone()
    ids = [rnd.randint(lo, hi) for _ in range(size)]
    # (surname, sex) of random patients: realistic frequencies, every search finds someone.
    pairs = []
    for refno in (rnd.randint(lo, hi) for _ in range(size)):
        row = con.execute('SELECT "SURNAME", "SEXXX_CODE" FROM "PATIENTS" WHERE "PATNT_REFNO" = ?',
                          (refno,)).fetchone()
        if row:
            pairs.append((row[0].lower(), SEX_CODE[row[1]]))
    con.close()
    years = [str(y) for y in range(1940, 1961)]
    return {
        "a": [f"/STU3/Patient/{i}" for i in ids],
        "b": [f"/STU3/Patient?{urlencode([('family', s), ('gender', g)])}" for s, g in pairs],
        "c": [f"/STU3/Patient?gender=female&birthdate=ge{y}&_count=100"
              for y in (rnd.choice(years) for _ in range(size))],
    }


# --- servers --------------------------------------------------------------------------------


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int,
                 log: Path) -> None:
        self.name, self.cmd, self.env, self.port, self.log = name, cmd, env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        import httpx

        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/_health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.name} did not become healthy in {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# --- equivalence ----------------------------------------------------------------------------


def _norm_url(url: str, base: str) -> str:
    if url.startswith(base):
        url = "BASE" + url[len(base):]
    parts = urlsplit(url)
    q = [(k, "<token>" if k == "_page" else v) for k, v in parse_qsl(parts.query,
                                                                     keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(q)))


def normalise(body: Any, base: str) -> Any:
    """A Bundle without its id, timestamp, server base URL and paging token."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return body
    out = {k: v for k, v in body.items() if k not in ("id", "meta")}
    out["link"] = [{**link, "url": _norm_url(link["url"], base)} for link in body.get("link", [])]
    out["entry"] = [{**e, "fullUrl": _norm_url(e["fullUrl"], base)} for e in body.get("entry", [])]
    return out


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{path or '/'}: {a!r:.120} != {b!r:.120}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}/{k}: only in {'gateway' if k in a else 'baseline'}"
            d = first_difference(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r:.120} != {b!r:.120}"


def verify(gw: Server, bl: Server, paths: dict[str, list[str]], n_ids: int,
           n_searches: int, seed: int, headers: dict[str, str]) -> dict[str, int]:
    import httpx

    rnd = random.Random(seed + 1)
    checked = {"a": 0, "b": 0, "c": 0, "entries": 0}
    with httpx.Client(timeout=60, headers=headers) as g, httpx.Client(timeout=60) as b:
        for scen, n in (("a", n_ids), ("b", n_searches), ("c", n_searches)):
            for path in rnd.sample(paths[scen], min(n, len(paths[scen]))):
                rg, rb = g.get(gw.base + path), b.get(bl.base + path)
                if rg.status_code != rb.status_code:
                    raise SystemExit(f"NOT EQUIVALENT {path}: status {rg.status_code} (gateway) "
                                     f"!= {rb.status_code} (baseline)")
                if rg.status_code != 200:
                    continue
                for h in ("content-type", "etag", "last-modified"):
                    if rg.headers.get(h) != rb.headers.get(h):
                        raise SystemExit(f"NOT EQUIVALENT {path}: header {h} "
                                         f"{rg.headers.get(h)!r} != {rb.headers.get(h)!r}")
                jg, jb = normalise(rg.json(), gw.base), normalise(rb.json(), bl.base)
                diff = first_difference(jg, jb)
                if diff:
                    raise SystemExit(f"NOT EQUIVALENT {path}: {diff}")
                checked[scen] += 1
                checked["entries"] += len(jg.get("entry", [])) if scen != "a" else 1
    return checked


# --- load generation ------------------------------------------------------------------------

LUA = """
local paths = {%(paths)s}
local headers = {%(headers)s}
local n = #paths
local i = %(offset)d
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% n) + 1], headers)
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


def lua_script(paths: list[str], offset: int, headers: dict[str, str] | None = None) -> str:
    return LUA % {"paths": ",".join(json.dumps(p) for p in paths), "offset": offset,
                  "headers": ",".join(f"[{json.dumps(k)}]={json.dumps(v)}"
                                      for k, v in (headers or {}).items())}


def run_wrk(base: str, paths: list[str], seconds: float, connections: int, threads: int,
            client_cpu: int, tmp: Path, offset: int = 0,
            headers: dict[str, str] | None = None) -> dict[str, Any]:
    script = tmp / f"rotate-{os.getpid()}-{offset}.lua"
    script.write_text(lua_script(paths, offset, headers))
    cmd = [*taskset(client_cpu), "wrk", f"-t{threads}", f"-c{connections}",
           f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(script), base]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            r = json.loads(line[len("BENCHJSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["errors"] = sum(v for k, v in r.items() if k.startswith("err_"))
            return r
    raise SystemExit(f"wrk produced no result:\n{proc.stdout}\n{proc.stderr}")


def run_httpx(base: str, paths: list[str], seconds: float, connections: int,
              client_cpu: int, offset: int = 0,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Fallback load generator: a bounded asyncio httpx client in a pinned subprocess."""
    code = f"""
import asyncio, json, os, time, httpx, statistics
try: os.sched_setaffinity(0, {{{client_cpu}}})
except Exception: pass
paths = {paths!r}; n = len(paths)
async def main():
    lat = []; errors = 0; counter = [{offset}]
    limits = httpx.Limits(max_connections={connections}, max_keepalive_connections={connections})
    async with httpx.AsyncClient(base_url={base!r}, limits=limits, timeout=30,
                                 headers={headers or {}!r}) as c:
        stop = time.perf_counter() + {seconds}
        async def worker():
            nonlocal errors
            while time.perf_counter() < stop:
                counter[0] += 1
                t = time.perf_counter_ns()
                r = await c.get(paths[counter[0] % n])
                lat.append(time.perf_counter_ns() - t)
                if not 200 <= r.status_code < 300: errors += 1
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
            r = json.loads(line[len("BENCHJSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            return r
    raise SystemExit(f"httpx client produced no result:\n{proc.stdout}\n{proc.stderr}")


# --- main -----------------------------------------------------------------------------------


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "gateway req/s", "p50 ms", "p99 ms", "baseline req/s", "p50 ms",
            "p99 ms", "gateway/baseline", "others' CPU % (g/b)"]
    body = []
    for r in rows:
        g, b = r["gateway"], r["baseline"]
        body.append([SCENARIOS[r["scenario"]], f"{g['rps']:,.0f}", f"{g['p50_us'] / 1000:.2f}",
                     f"{g['p99_us'] / 1000:.2f}", f"{b['rps']:,.0f}", f"{b['p50_us'] / 1000:.2f}",
                     f"{b['p99_us'] / 1000:.2f}", f"{g['rps'] / b['rps']:.2f}x",
                     f"{g.get('others_cpu_pct', 0):.1f} / {b.get('others_cpu_pct', 0):.1f}"])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [fmt_row(head, widths),
             "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2))
                            for i, w in enumerate(widths)) + "|"]
    lines += [fmt_row(b, widths) for b in body]
    return "\n".join(lines)


def main() -> int:
    # `timeout`/kill send SIGTERM: turn it into SystemExit so the finally blocks stop the
    # servers (they run in their own sessions and would otherwise outlive this process)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description="gateway vs baseline over HTTP (see module doc)")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per run")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat each measurement, report the round with the median req/s")
    ap.add_argument("--scenarios", default="a,b,c")
    ap.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--gateway-port", type=int, default=8090)
    ap.add_argument("--baseline-port", type=int, default=8091)
    ap.add_argument("--baseline-db-mode", choices=("thread", "inline"), default="thread")
    ap.add_argument("--gateway-log-level", default="info",
                    help="CCG_LOG_LEVEL for the gateway (default info: one line per request)")
    ap.add_argument("--auth", choices=("insecure-demo", "jwt"), default="insecure-demo",
                    help="gateway authentication: none (demo mode, default) or a dev-token "
                         "JWT sent with every request")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="CCG_X=VALUE",
                    help="extra environment for the gateway (repeatable)")
    ap.add_argument("--verify", type=int, default=200, help="random ids compared at start")
    ap.add_argument("--verify-searches", type=int, default=30, help="searches compared at start")
    ap.add_argument("--workload-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quiet-threshold", type=float, default=10.0,
                    help="before each run, wait until under this %% of all CPUs is busy")
    ap.add_argument("--quiet-wait", type=float, default=300.0,
                    help="longest wait for a quiet machine (s); then measure anyway")
    ap.add_argument("--max-interference", type=float, default=5.0,
                    help="retry a run in which other processes used more than this %% of "
                         "the CPUs")
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--shipped-limits", action="store_true",
                    help="after the speed rounds, one more round per scenario with the "
                         "gateway's shipped per-client limits (labelled; 429s reported)")
    args = ap.parse_args()
    check_setting_names(SPEED_ENV)

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "httpx"
    if client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install -y wrk (or --client httpx)")
    for port in (args.gateway_port, args.baseline_port):
        if not port_free(port):
            raise SystemExit(f"port {port} is in use")
    pin_note = "pinned" if taskset(args.server_cpu) else "NOT pinned (no taskset / one CPU)"

    t0 = time.perf_counter()
    db, info = ensure_demo(args.patients, args.data_dir)
    print(f"demo PAS: {db} ({args.patients:,} patients, "
          f"{'reused' if info['reused'] else f'built in {time.perf_counter() - t0:.1f} s'})")
    paths = workload(db, args.seed, args.workload_size)
    logs = args.data_dir / "logs"
    env = gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}",
                      CCG_LOG_LEVEL=args.gateway_log_level, CCG_DATA_DIR=str(args.data_dir))
    env.pop("CCG_PORT", None)
    headers: dict[str, str] = {}
    if args.auth == "jwt":  # the demo's development key (ES256), verified by the gateway
        env.pop("CCG_AUTH_MODE", None)
        token = subprocess.run([sys.executable, "-m", "gateway.cli", "dev-token", "--data-dir",
                                str(args.data_dir), "--lifetime", "86400"], env=env, cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        headers["Authorization"] = f"Bearer {token}"
    shipped_env = {k: v for k, v in env.items() if k not in SPEED_ENV}
    for item in args.gateway_env:
        key, _, value = item.partition("=")
        env[key] = shipped_env[key] = value
    limits_note = ("per-client limits OFF for the speed rounds: "
                   + " ".join(f"{k}={env[k]}" for k in SPEED_ENV))
    gw = Server("gateway", [*taskset(args.server_cpu), sys.executable, "-m", "gateway.cli",
                            "serve", "--port", str(args.gateway_port)],
                env, args.gateway_port, logs / "gateway.log")
    bl = Server("baseline", [*taskset(args.server_cpu), sys.executable,
                             str(Path(__file__).resolve().parent / "baseline_app.py"),
                             "--db", str(db.resolve()), "--port", str(args.baseline_port),
                             "--db-mode", args.baseline_db_mode],
                dict(os.environ), args.baseline_port, logs / "baseline.log")
    results: list[dict[str, Any]] = []
    with _servers(gw, bl), tempfile.TemporaryDirectory(prefix="ccg-bench-") as tmpdir:
        ver = versions()  # as the servers started: the tree may change while they run
        print(ver)
        print(f"servers: gateway :{gw.port}, baseline :{bl.port} (one uvicorn worker each, "
              f"CPU {args.server_cpu}, {pin_note}); client: {client} on CPU {args.client_cpu}, "
              f"{args.connections} connections")
        print(limits_note)
        checked = verify(gw, bl, paths, args.verify, args.verify_searches, args.seed, headers)
        print(f"equivalence: OK — {checked['a']} reads, {checked['b']} family+gender and "
              f"{checked['c']} 100-entry searches identical ({checked['entries']} resources)")
        tmp = Path(tmpdir)
        def measure(server: Server, scen: str, rnd: int, speed: bool = True) -> dict[str, Any]:
            """One round: warm-up + measured run, retried while others load the machine.
            A speed round with any unsuccessful answer stops the bench: it would be
            measuring refusals, not the hot path."""
            hdrs = headers if server is gw else {}

            def load(seconds: float, offset: int) -> dict[str, Any]:
                if client == "wrk":
                    return run_wrk(server.base, paths[scen], seconds, args.connections,
                                   args.threads, args.client_cpu, tmp, offset, hdrs)
                return run_httpx(server.base, paths[scen], seconds, args.connections,
                                 args.client_cpu, offset, hdrs)

            best: dict[str, Any] | None = None
            for attempt in range(1 + args.retries):
                wait_quiet(args.quiet_threshold, args.quiet_wait)
                if args.warmup > 0:
                    load(args.warmup, 500 + rnd)
                assert server.proc is not None
                cpu0 = proc_jiffies(server.proc.pid)
                with Interference([server.proc.pid]) as noise:
                    r = load(args.duration, rnd * 97)
                # The server's own CPU time per request (all its threads, /proc): what a
                # request costs it, much less moved by a busy machine than req/s are.
                r["cpu_us_per_req"] = ((proc_jiffies(server.proc.pid) - cpu0) / HZ * 1e6
                                       / max(1, r["requests"]))
                r["others_cpu_pct"] = round(noise.percent, 1)
                retry = noise.percent > args.max_interference and attempt < args.retries
                print(f"  {SCENARIOS[scen]:38} {server.name:8} round {rnd + 1}: "
                      f"{r['rps']:8,.0f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms  "
                      f"p99 {r['p99_us'] / 1000:6.2f} ms  CPU {r['cpu_us_per_req']:5.0f} us/req  "
                      f"errors {r['errors']}  "
                      f"others' CPU {noise.percent:4.1f}%{'  (retrying)' if retry else ''}",
                      flush=True)
                if speed and r["errors"]:
                    raise SystemExit(
                        f"STOPPED: {r['errors']} unsuccessful answers or socket errors from "
                        f"the {server.name} in a speed round of {SCENARIOS[scen]} "
                        f"({ {k: v for k, v in r.items() if k.startswith('err_')} }); "
                        f"see {server.log}. The figures would not measure the hot path.")
                if best is None or r["others_cpu_pct"] < best["others_cpu_pct"]:
                    best = r
                if not retry:
                    break
            assert best is not None
            return best

        for scen in scenarios:
            row: dict[str, Any] = {"scenario": scen, "path_example": paths[scen][0]}
            runs: dict[str, list[dict[str, Any]]] = {gw.name: [], bl.name: []}
            for rnd in range(args.rounds):  # gateway and baseline alternate, round by round
                # ... and take turns going first, so a machine slowing down or speeding up
                # over a round does not always favour the same one
                for server in ((gw, bl) if rnd % 2 == 0 else (bl, gw)):
                    runs[server.name].append(measure(server, scen, rnd))
            for name, rs in runs.items():
                med = statistics.median_low([r["rps"] for r in rs])
                chosen = next(r for r in rs if r["rps"] == med)
                chosen["rounds_rps"] = [round(r["rps"], 1) for r in rs]
                chosen["rounds_cpu_us"] = [round(r["cpu_us_per_req"], 1) for r in rs]
                row[name] = chosen
            results.append(row)
        shipped: list[dict[str, Any]] = []
        if args.shipped_limits:
            gw.stop()
            gw = Server("gateway", gw.cmd, shipped_env, args.gateway_port,
                        logs / "gateway-shipped-limits.log")
            gw.start()
            try:
                print("one round with the gateway's SHIPPED per-client limits "
                      f"(none of {', '.join(SPEED_ENV)} set):")
                for scen in scenarios:
                    g = measure(gw, scen, 0, speed=False)
                    b = measure(bl, scen, 0, speed=False)
                    shipped.append({"scenario": scen, "gateway": g, "baseline": b})
            finally:
                gw.stop()

    out = table(results)
    print()
    print(out)
    for r in results:
        ratios = [g / b for g, b in zip(r["gateway"]["rounds_rps"], r["baseline"]["rounds_rps"],
                                        strict=True)]
        r["round_ratios"] = [round(x, 3) for x in ratios]
        low, high = bootstrap_median_ci(ratios)
        r["round_ratio_median"], r["round_ratio_ci95"] = statistics.median(ratios), [low, high]
        print(f"{SCENARIOS[r['scenario']]}: round ratios "
              f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}x"
              + (f", 95% CI {low:.2f}-{high:.2f}x (bootstrap over rounds)"
                 if len(ratios) >= 5 else ""))
        cpu = [b / g for g, b in zip(r["gateway"]["rounds_cpu_us"],
                                     r["baseline"]["rounds_cpu_us"], strict=True) if g > 0]
        r["cpu_ratios"] = [round(x, 3) for x in cpu]
        if cpu:
            clow, chigh = bootstrap_median_ci(cpu)
            print(f"{SCENARIOS[r['scenario']]}: server CPU per request, baseline/gateway "
                  f"(above 1: the gateway spends less): "
                  f"{', '.join(f'{x:.2f}' for x in cpu)}; median {statistics.median(cpu):.2f}x"
                  + (f", 95% CI {clow:.2f}-{chigh:.2f}x" if len(cpu) >= 5 else "")
                  + f"; gateway {statistics.median(r['gateway']['rounds_cpu_us']):.0f} us, "
                  f"baseline {statistics.median(r['baseline']['rounds_cpu_us']):.0f} us "
                  "(medians)")
        if r["scenario"] in ("a", "b"):
            ratio = r["gateway"]["rps"] / r["baseline"]["rps"]
            steady = ("" if len(ratios) < 5 else
                      "; reliably (the 95% interval of the round ratios' median is >= 1.0)"
                      if low >= 1.0 else "; not reliably (the interval reaches below 1.0)")
            print(f"target >= 1.0x baseline on {SCENARIOS[r['scenario']]}: "
                  f"{'MET' if ratio >= 1.0 else 'NOT MET'} ({ratio:.2f}x){steady}")
    print(f"\n({limits_note})")
    if shipped:
        print("\nWITH THE SHIPPED PER-CLIENT LIMITS (one round; not a speed figure: "
              "unsuccessful answers counted):")
        print(table(shipped))
        for r in shipped:
            print(f"{SCENARIOS[r['scenario']]}: gateway answered {r['gateway']['errors']} "
                  f"of {r['gateway']['requests']} requests unsuccessfully (429 and the like)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    res_dir = args.data_dir / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "versions": ver,
            "patients": args.patients, "duration_s": args.duration, "warmup_s": args.warmup,
            "connections": args.connections, "client": client, "rounds": args.rounds,
            "baseline": f"plain sqlite3, db-mode {args.baseline_db_mode}",
            "gateway_log_level": args.gateway_log_level, "auth": args.auth,
            "gateway_env": args.gateway_env, "equivalence": checked,
            "speed_rounds_env": {k: env[k] for k in SPEED_ENV}}
    (res_dir / f"http-{stamp}.json").write_text(json.dumps(
        {"meta": meta, "results": results, "shipped_limits": shipped}, indent=2))
    (res_dir / f"http-{stamp}.md").write_text(out + "\n")
    print(f"\nresults: {res_dir / f'http-{stamp}.json'}")
    return 0


def check_setting_names(env: dict[str, str]) -> None:
    """Each variable names a gateway setting (a misspelt one would be ignored silently)."""
    from dataclasses import fields

    from gateway.settings import Settings

    known = {f"CCG_{f.name.upper()}" for f in fields(Settings)}
    unknown = sorted(set(env) - known)
    if unknown:
        raise SystemExit(f"not gateway settings: {', '.join(unknown)} (gateway/settings.py)")


def bootstrap_median_ci(values: list[float], resamples: int = 2000,
                        seed: int = 1) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval for the median of ``values`` (paired round
    ratios): how far the median could move with other rounds on this machine."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


@contextlib.contextmanager
def _servers(*servers: Server) -> Iterator[None]:
    started: list[Server] = []
    try:
        for s in servers:
            s.start()
            started.append(s)
        yield
    finally:
        for s in reversed(started):
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
