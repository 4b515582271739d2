"""What one durable write costs on this disk: the ceiling of a single MLLP connection.

    python bench/durable_write_micro.py               # 400 writes per route, ~1 min
    python bench/durable_write_micro.py --writes 1000 --dir /some/other/disk

MLLP's original mode is stop-and-wait: on one connection the next message comes only after
the ACK, and the ACK comes only after the message is durable. So one connection is one
durable write per message, and its rate is at most 1 / (the cost of one durable write).
This times the routes a store could take to make a ~1.3 kB record durable, one record per
write, in a directory on the disk the ADT store would use:

- SQLite WAL ``synchronous=FULL`` (the store today: the WAL is synced at each commit);
- an append-only file, ``write`` + ``fdatasync`` (the file grows: its size is metadata,
  which fdatasync must also commit — a filesystem journal commit per write);
- a preallocated, pre-zeroed journal, ``pwrite`` + ``fdatasync`` (no metadata changes:
  only the data block and the disk's cache flush);
- the same journal opened ``O_DSYNC`` (the kernel syncs each write);
- the same journal with ``O_DIRECT | O_DSYNC`` and 4 KiB-aligned writes (no page cache);
- ``fsync`` instead of ``fdatasync`` on the preallocated journal.

Durable here means what the OS promises after fsync / fdatasync / O_DSYNC return (the
device was asked to flush its cache); this bench cannot see whether the virtual disk
underneath honours that. For reference (not durable across power loss): SQLite WAL
``synchronous=NORMAL`` and a plain ``write`` with no sync. And for the multi-connection
route: SQLite FULL committing 8 records per transaction (group commit).

The disk is shared and its flush latency changes from minute to minute, so the routes take
turns: ``--rounds`` rounds, each route writing its share in every round, so each route sees
the same disk weather.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DATA_DIR, busy_percent

RECORD = os.urandom(1300)
BLOCK = 4096


def _times(n: int, one: Callable[[int], None]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        one(i)
        out.append(time.perf_counter() - t0)
    return out


def sqlite_route(d: Path, n: int, synchronous: str, per_commit: int = 1) -> list[float]:
    db = sqlite3.connect(d / f"s-{synchronous}-{per_commit}.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE m (seq INTEGER PRIMARY KEY, body BLOB)")

    def one(_i: int) -> None:
        db.execute("BEGIN")
        for _ in range(per_commit):
            db.execute("INSERT INTO m (body) VALUES (?)", (RECORD,))
        db.execute("COMMIT")

    _times(20, one)  # warm: the WAL file exists and has grown
    times = _times(n, one)
    db.close()
    return [t / per_commit for t in times]


def append_route(d: Path, n: int) -> list[float]:
    fd = os.open(d / "append.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def one(_i: int) -> None:
        os.write(fd, RECORD)
        os.fdatasync(fd)

    times = _times(n, one)
    os.close(fd)
    return times


def _prealloc(path: Path, size: int) -> None:
    # written zeros, not just fallocate: an fallocated extent is "unwritten", and the first
    # write to it is a metadata change (a journal commit) again
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    chunk = b"\0" * (1 << 20)
    for _ in range(0, size, len(chunk)):
        os.write(fd, chunk)
    os.fsync(fd)
    os.close(fd)


def prealloc_route(d: Path, n: int, how: str) -> list[float]:
    path = d / f"journal-{how}.bin"
    size = max(1 << 20, (n + 64) * BLOCK)
    _prealloc(path, size)
    flags = os.O_WRONLY
    if how in ("odsync", "direct"):
        flags |= os.O_DSYNC
    if how == "direct":
        flags |= os.O_DIRECT
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(RECORD)
    offset = [0]

    def one(_i: int) -> None:
        if how == "direct":
            os.pwritev(fd, [buf], offset[0])
            offset[0] += BLOCK
        else:
            os.pwrite(fd, RECORD, offset[0])
            offset[0] += len(RECORD)
        if how == "fdatasync":
            os.fdatasync(fd)
        elif how == "fsync":
            os.fsync(fd)

    times = _times(n, one)
    os.close(fd)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=400, help="per route, over all rounds")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=DATA_DIR / "adt",
                    help="a directory on the disk to measure (default: the bench data dir)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    n = max(8, args.writes // args.rounds)
    routes: list[tuple[str, bool, Callable[[Path], list[float]]]] = [
        ("SQLite WAL synchronous=FULL, 1 record/commit", True,
         lambda d: sqlite_route(d, n, "FULL")),
        ("append-only file: write + fdatasync", True, lambda d: append_route(d, n)),
        ("preallocated journal: pwrite + fdatasync", True,
         lambda d: prealloc_route(d, n, "fdatasync")),
        ("preallocated journal: pwrite + fsync", True,
         lambda d: prealloc_route(d, n, "fsync")),
        ("preallocated journal: O_DSYNC pwrite", True,
         lambda d: prealloc_route(d, n, "odsync")),
        ("preallocated journal: O_DIRECT|O_DSYNC 4 KiB", True,
         lambda d: prealloc_route(d, n, "direct")),
        ("SQLite WAL FULL, 8 records/commit (per record)", True,
         lambda d: sqlite_route(d, max(1, n // 8), "FULL", 8)),
        ("SQLite WAL synchronous=NORMAL, 1 record/commit", False,
         lambda d: sqlite_route(d, n, "NORMAL")),
        ("preallocated journal: pwrite, no sync", False,
         lambda d: prealloc_route(d, n, "none")),
    ]
    print(f"durable write micro-bench: {n * args.rounds} writes of {len(RECORD)} bytes per "
          f"route in {args.rounds} interleaved rounds, in {args.dir}; machine busy before: "
          f"{busy_percent(1.0):.0f}%")
    times: dict[str, list[float]] = {name: [] for name, _, _ in routes}
    per_round: dict[str, list[float]] = {name: [] for name, _, _ in routes}
    for _ in range(args.rounds):
        for name, _durable, run in routes:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                got = run(Path(tmp))
            times[name] += got
            per_round[name].append(1 / statistics.fmean(got))
    print(f"{'route':<50} {'durable':>7} {'median µs':>10} {'p90 µs':>9} {'writes/s':>9} "
          f"{'rounds: min-max /s':>19}")
    for name, durable, _run in routes:
        t = sorted(times[name])
        med = statistics.median(t)
        p90 = t[int(len(t) * 0.9)]
        lo, hi = min(per_round[name]), max(per_round[name])
        print(f"{name:<50} {'yes' if durable else 'NO':>7} {med * 1e6:>10,.0f} "
              f"{p90 * 1e6:>9,.0f} {1 / statistics.fmean(t):>9,.0f} "
              f"{f'{lo:,.0f}-{hi:,.0f}':>19}")
    print(f"machine busy after: {busy_percent(1.0):.0f}% (2 CPUs shared with other work; "
          "the disk is shared too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
