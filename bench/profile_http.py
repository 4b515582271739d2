"""Profile the gateway (or the baseline) under wrk load with py-spy; print the hot spots.

    pip install py-spy                       # local investigation only, not a project dependency
    python bench/profile_http.py --scenario a --seconds 15
    python bench/profile_http.py --scenario b --target baseline

Starts the server pinned to CPU 0 (as http_bench.py does), drives it with wrk from CPU 1 for
``--seconds`` while ``py-spy record`` samples every thread, writes the collapsed stacks to
bench/.data/profiles/ (for a flame graph), and prints the top functions by self and inclusive
time over the samples that are not idle waits (an idle worker thread in ``Condition.wait``, the
event loop in ``epoll`` under ``Runner.run``).

Caveat, seen on this VM with Python 3.11: py-spy attributes almost nothing to the anyio worker
threads that run the SQL adapter, although cProfile (bench/profile_inprocess.py) shows those
threads doing ~250 µs of Python per read; and a function that releases the GIL (``os.urandom``
in ``uuid4``, socket writes) collects the samples of the event loop thread *waiting to get the
GIL back*. Use this for the shape of the event-loop side; use profile_inprocess.py for
attribution.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, ensure_demo, gateway_env, taskset
from http_bench import Server, lua_script, port_free, workload

# leaf frames of waiting threads: anyio workers, ThreadPoolExecutor workers (blocked in a C
# queue get), the event loop in epoll
IDLE = ("Condition.wait", "Runner.run ", "select (selectors", "Event.wait (threading",
        "_worker (concurrent")


def summarise(collapsed: Path, top: int) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or stack.rsplit(";", 1)[-1].startswith(IDLE):
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        self_t[_short(frames[-1])] += count
        for f in {_short(f) for f in frames}:
            incl[f] += count
    out = [f"non-idle samples: {total}", "", f"top {top} by self time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_t.most_common(top)]
    out += ["", f"top {top} by inclusive time (frames under the event loop):"]
    skip = ("<module>", "run (uvicorn", "main (gateway", "run_until_complete", "run_forever",
            "_run_once", "serve (uvicorn", "_serve (uvicorn", "_run (asyncio", "__call__ (",
            "cmd_serve", "run (asyncio/runners", "uvloop", "<lambda>")
    shown = 0
    for f, n in incl.most_common():
        if any(s in f for s in skip) and n > 0.9 * total:
            continue
        out.append(f"  {100 * n / total:5.1f}%  {f}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out)


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (pkg/file.py)"; line numbers merged
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path = loc.rsplit(":", 1)[0]
    parts = path.split("/")
    for anchor in ("site-packages", "main", "lib"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor):]
            break
    return f"{name} ({'/'.join(parts[-3:])})"


def main() -> int:
    # `timeout`/kill send SIGTERM: turn it into SystemExit so the finally blocks stop the
    # servers (they run in their own sessions and would otherwise outlive this process)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description="py-spy profile under wrk load")
    ap.add_argument("--scenario", choices=("a", "b", "c"), default="a")
    ap.add_argument("--target", choices=("gateway", "baseline"), default="gateway")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--gil", action="store_true",
                    help="sample only the thread holding the GIL (py-spy --gil; unreliable on "
                         "3.11 in our runs: it misses the worker threads)")
    ap.add_argument("--port", type=int, default=8095)
    ap.add_argument("--gateway-log-level", default="info")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = ap.parse_args()
    if not shutil.which("py-spy") or not shutil.which("wrk"):
        raise SystemExit("needs py-spy (pip install py-spy) and wrk (apt-get install -y wrk)")
    if not port_free(args.port):
        raise SystemExit(f"port {args.port} is in use")
    db, _ = ensure_demo(args.patients, args.data_dir)
    paths = workload(db, 7, 1000)[args.scenario]
    logs = args.data_dir / "logs"
    if args.target == "gateway":
        env = gateway_env(CCG_PAS_URL=f"sqlite:///{db.resolve()}",
                          CCG_LOG_LEVEL=args.gateway_log_level)
        cmd = [*taskset(0), sys.executable, "-m", "gateway.cli", "serve", "--port", str(args.port)]
    else:
        env = dict(os.environ)
        cmd = [*taskset(0), sys.executable, str(Path(__file__).parent / "baseline_app.py"),
               "--db", str(db.resolve()), "--port", str(args.port)]
    server = Server(args.target, cmd, env, args.port, logs / f"profile-{args.target}.log")
    prof_dir = args.data_dir / "profiles"
    prof_dir.mkdir(parents=True, exist_ok=True)
    stem = prof_dir / f"{args.target}-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    server.start()
    try:
        assert server.proc is not None
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "rotate.lua"
            script.write_text(lua_script(paths, 0))
            wrk_cmd = [*taskset(1), "wrk", "-t1", f"-c{args.connections}",
                       f"-d{int(args.seconds) + 4}s", "-s", str(script), server.base]
            wrk = subprocess.Popen(wrk_cmd, stdout=subprocess.PIPE, text=True)
            time.sleep(2)  # warm
            for fmt, suffix in (("raw", ".collapsed"),):
                subprocess.run(["py-spy", "record", "--pid", str(server.proc.pid), "--rate",
                                str(args.rate), "--duration", str(int(args.seconds)),
                                "--format", fmt, "--output", str(stem) + suffix,
                                *(["--gil"] if args.gil else []), "--threads"],
                               check=True, capture_output=True, timeout=args.seconds + 60)
            out, _ = wrk.communicate(timeout=60)
    finally:
        server.stop()
    rps = [line for line in out.splitlines() if "Requests/sec" in line]
    print(f"{args.target} scenario {args.scenario}: {rps[0].strip() if rps else '?'} "
          "(while sampled)")
    # --threads prefixes each stack with the thread; fold it away for the summary
    collapsed = Path(str(stem) + ".collapsed")
    lines = []
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        lines.append(";".join(frames) + " " + n)
    collapsed.write_text("\n".join(lines) + "\n")
    print(summarise(collapsed, args.top))
    print(f"\ncollapsed stacks: {collapsed}  (flamegraph.pl or speedscope.app can read them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
