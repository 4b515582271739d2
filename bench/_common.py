"""Shared helpers for the bench scripts: the bench data directory and demo PAS builds.

Every script reuses a database that already exists; a build records how long it took in a
``<db>.build.json`` sidecar so the figure can be reported later.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import sys
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DATA_DIR = pathlib.Path(os.environ.get("CCG_BENCH_DATA", BENCH_DIR / ".data"))


def demo_path(patients: int, data_dir: pathlib.Path | None = None) -> pathlib.Path:
    return (data_dir or DATA_DIR) / f"demo-pas-{patients}.sqlite"


def generator_fingerprint() -> str:
    """A hash of the demo PAS generator's source: a database built by other code is stale."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "gateway" / "demo_pas").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def ensure_demo(patients: int, data_dir: pathlib.Path | None = None,
                progress: bool = True) -> tuple[pathlib.Path, dict[str, object]]:
    """Build (or reuse) the demo PAS; return its path and the build record.

    A database is reused only if its ``.build.json`` says it was built by the current demo
    generator (gateway/demo_pas); otherwise it is rebuilt (atomically: readers keep the old
    file), so a generator change (new rows, new indexes, ANALYZE) is never measured stale.
    """
    from gateway.demo_pas import ensure_sqlite_demo

    path = demo_path(patients, data_dir)
    sidecar = path.with_name(path.name + ".build.json")
    fingerprint = generator_fingerprint()
    if path.exists():
        info: dict[str, object] = (json.loads(sidecar.read_text()) if sidecar.exists()
                                   else {"patients": patients, "build_seconds": None})
        if info.get("generator") == fingerprint:
            info["reused"] = True
            return path, info
        print(f"{path.name}: built by another version of gateway/demo_pas; rebuilding",
              file=sys.stderr, flush=True)
    # Build beside it and move into place: anyone reading the old file is never left without
    # one (a missing SQLite file would be silently re-created empty by the next connect).
    fresh = path.with_name(path.stem + ".rebuild.sqlite")
    fresh.unlink(missing_ok=True)
    started = time.perf_counter()
    ensure_sqlite_demo(fresh, patients=patients, progress=progress)
    seconds = time.perf_counter() - started
    os.replace(fresh, path)
    info = {"patients": patients, "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S"), "size_bytes": path.stat().st_size,
            "python": platform.python_version(), "generator": fingerprint,
            "commit": git_rev()}
    sidecar.write_text(json.dumps(info, indent=2))
    info["reused"] = False
    return path, info


# Every per-client and per-address limit off: a load generator is one client on one address,
# and with the shipped limits a speed round measures throttling, not the hot path (the source
# limit answers 429 beyond 100 requests a second after a burst of 1,000; the per-client backend
# queue lets a lone client run only a few backend calls at once). These are the real setting
# names (gateway/settings.py); http_bench.py prints them, and its --shipped-limits round runs
# without them.
SPEED_ENV = {
    "CCG_RATE_LIMIT_PER_MINUTE": "0",
    "CCG_SOURCE_RATE_LIMIT_PER_MINUTE": "0",
    "CCG_AUTH_FAILURES_PER_MINUTE": "0",
    "CCG_MAX_IN_FLIGHT_PER_CLIENT": "0",
    "CCG_MAX_BACKEND_CALLS_PER_CLIENT": "0",
}

# Settings the benches give the gateway unless the caller's environment already sets them.
# Unknown CCG_* variables are ignored by gateway.settings, so these are harmless on a gateway
# that predates a feature. Authentication is the demo's "insecure-demo" mode unless a bench
# asks for tokens (http_bench.py --auth jwt).
GATEWAY_BENCH_ENV = {
    "CCG_PAGING_SECRET": "bench-paging-secret",
    "CCG_AUTH_MODE": "insecure-demo",
    **SPEED_ENV,
}


def gateway_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for a gateway under test: ``base`` (default os.environ) + bench defaults."""
    env = dict(os.environ if base is None else base)
    for k, v in GATEWAY_BENCH_ENV.items():
        env.setdefault(k, v)
    env.update(extra)
    return env


def apply_gateway_env(**extra: str) -> None:
    """The same, applied to this process (for benches that build the app in-process)."""
    os.environ.update(gateway_env(**extra))


def taskset(cpu: int) -> list[str]:
    """``taskset -c <cpu>`` prefix when available and the CPU exists; else nothing."""
    if shutil.which("taskset") and cpu < (os.cpu_count() or 1):
        return ["taskset", "-c", str(cpu)]
    return []


def pin_self(cpu: int) -> bool:
    """Pin the current process to one CPU (Linux); say whether it worked."""
    try:
        os.sched_setaffinity(0, {cpu})
        return True
    except (AttributeError, OSError):
        return False


# --- other people's work on the machine ---------------------------------------------------------
# The bench machine may be shared: anything else running skews the figures. These helpers
# measure how much CPU *others* used while a measurement ran, and wait for a quiet machine.

HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat (0, 0 if unavailable)."""
    try:
        fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0]
                  .split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


def proc_jiffies(pid: int) -> int:
    """utime + stime of a process (all its threads), 0 if it is gone."""
    try:
        parts = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])
    except (OSError, IndexError, ValueError):
        return 0


def busy_percent(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over the next ``seconds`` (this process sleeps meanwhile)."""
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    return 100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def wait_quiet(threshold: float = 10.0, max_wait: float = 120.0, quiet: bool = False) -> float:
    """Wait (at most ``max_wait`` s) until under ``threshold`` % of the CPUs are busy."""
    deadline = time.monotonic() + max_wait
    busy = busy_percent()
    while busy > threshold and time.monotonic() < deadline:
        if not quiet:
            print(f"  (machine busy: {busy:.0f}% CPU used by other processes; waiting)",
                  file=sys.stderr, flush=True)
        time.sleep(4)
        busy = busy_percent()
    return busy


class Interference:
    """CPU used by processes other than ``own_pids`` (and our children) during a block.

    ``percent`` is that CPU time as a share of the block's wall time x CPU count.
    """

    def __init__(self, own_pids: list[int]) -> None:
        self.own = own_pids
        self.percent = 0.0

    def __enter__(self) -> Interference:
        import resource

        self._b0, self._t0 = cpu_jiffies()
        self._own0 = sum(proc_jiffies(p) for p in [*self.own, os.getpid()])
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._kids0 = r.ru_utime + r.ru_stime
        return self

    def __exit__(self, *_exc: object) -> None:
        import resource

        b1, t1 = cpu_jiffies()
        own = sum(proc_jiffies(p) for p in [*self.own, os.getpid()]) - self._own0
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        kids = (r.ru_utime + r.ru_stime - self._kids0) * HZ
        if t1 > self._t0:
            foreign = max(0.0, (b1 - self._b0) - own - kids)
            self.percent = 100.0 * foreign / (t1 - self._t0)


def machine() -> str:
    cpu = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu or platform.processor()}), "
            f"Python {platform.python_version()}")


def git_rev() -> str:
    """The commit measured, and whether gateway/, adapters/ or mappings/ differ from it."""
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "adapters",
                                "mappings"], cwd=REPO, text=True, capture_output=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "unknown"


def versions() -> str:
    out = []
    out.append(f"commit {git_rev()}")
    for mod in ("starlette", "uvicorn", "sqlalchemy", "orjson", "fhir.resources"):
        try:
            from importlib.metadata import version

            out.append(f"{mod} {version(mod)}")
        except Exception:
            pass
    return ", ".join(out)


if __name__ == "__main__":  # python bench/_common.py build N  (pre-build a scale)
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        p, i = ensure_demo(int(sys.argv[2]))
        print(p, json.dumps(i))
    else:
        print("usage: python bench/_common.py build PATIENTS", file=sys.stderr)
        sys.exit(2)
