"""Inbound ADT throughput: MLLP → parse → mapping → durable record → ACK, per listener worker.

    python bench/adt_bench.py                      # 3,000 messages, 1 and 8 connections
    python bench/adt_bench.py --messages 10000 --store postgresql+psycopg://...

1. loads mappings/demo-hl7v2 (as tests do; no PAS connection is made) over a small demo PAS
   in the bench data dir (only the SQL-side mappings need it);
2. makes ``--messages`` ADT^A01s from the NHS ITK A01 sample (with a PAS number in PID-3, as in
   tests/golden/adt), each with its own MSH-10, patient and visit number;
3. runs the listener (one asyncio worker, the SQLite store in WAL mode) in this process,
   pinned to one CPU, and a sender in another process (its own CPU where there is one) that
   sends every message and waits for each ACK, over 1 and over ``--connections`` connections
   (several connections share commits: group commit), with ``synchronous=FULL`` (the default:
   an fsync per commit, ACKed messages survive power loss) and ``NORMAL`` (they survive the
   process being killed, not the machine losing power);
4. in the same run, times hl7apy ``parse_message`` (defaults, and ``find_groups=False``) and
   ``er7.parse`` alone on the same messages: the parse-only baselines the whole pipeline is
   compared with — in CPU time (``time.process_time``) as well as wall time, because on a
   shared machine a process pinned to one busy CPU gets a fraction of it and its wall time
   says more about the neighbours than about the parser. hl7apy is also timed on a small
   4-segment ADT (MSH, EVN, PID, PV1), to show how its cost grows with the message;
5. times one fsync'd SQLite commit alone on the same disk (the ceiling of one connection:
   MLLP original mode is stop-and-wait, so one connection is one durable write per message;
   bench/durable_write_micro.py compares the other durable-write routes).

Every message is checked to be ACKed AA and recorded (store row count). The figures are one
pass each after a warm-up; the machine may be shared — the CPU others used during the run is
printed beside them. The headline is ``FULL`` over ``--connections`` connections: the
recommended deployment (several PAS connections, group commit), with an ACKed message
durable across power loss.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import DATA_DIR, REPO, busy_percent, cpu_jiffies, ensure_demo, pin_self

SAMPLE = REPO / "tests" / "golden" / "adt" / "itk-a01.hl7"


def make_messages(n: int) -> list[bytes]:
    base = SAMPLE.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    out = []
    for i in range(n):
        m = base.replace(b"1391320453338055", f"BENCH{i:08d}".encode(), 1)
        m = m.replace(b"R1234567^^^RCB^PI", f"B{i % 5000:07d}^^^RCB^PI".encode(), 1)
        m = m.replace(b"2139^^^VISITID", f"{700000 + i}^^^VISITID".encode(), 1)
        out.append(m)
    return out


def _sender(port: int, payloads: list[bytes], connections: int, cpu: int | None,
            result: mp.Queue) -> None:  # type: ignore[type-arg]
    import threading

    if cpu is not None:
        pin_self(cpu)
    chunks = [payloads[i::connections] for i in range(connections)]
    bad: list[int] = []

    def run(chunk: list[bytes]) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        buf = b""
        for p in chunk:
            s.sendall(b"\x0b" + p + b"\x1c\r")
            while b"\x1c" not in buf:
                buf += s.recv(65536)
            end = buf.index(b"\x1c")
            reply, buf = buf[:end], buf[end + 2:]
            if b"MSA|AA|" not in reply:
                bad.append(1)
        s.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    result.put("ready")
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.put((time.perf_counter() - t0, len(bad)))


async def _serve_and_measure(messages: list[bytes], connections: int, store_url: str,
                             mapper: object, sender_cpu: int | None,
                             synchronous: str = "FULL") -> tuple[float, int, int, float]:
    from gateway.adt.listener import AdtListener
    from gateway.adt.store import AdtStore

    store = AdtStore(store_url, sqlite_synchronous=synchronous)
    listener = AdtListener(mapper, store)  # type: ignore[arg-type]
    await listener.start()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    proc = ctx.Process(target=_sender, args=(listener.port, messages, connections, sender_cpu, q))
    proc.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, q.get)  # the sender is up (its start-up is not counted)
    cpu0 = time.process_time()  # this process is the listener (the sender is another one)
    seconds, bad = await loop.run_in_executor(None, q.get)
    cpu = time.process_time() - cpu0
    await loop.run_in_executor(None, proc.join)
    await listener.stop()
    count = store.message_count()
    store.close()
    return seconds, bad, count, cpu


def _fsync_commit_seconds(directory: Path, n: int = 200) -> float:
    """Mean seconds of one SQLite WAL synchronous=FULL commit of one ~1.3 kB row."""
    import sqlite3

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        db = sqlite3.connect(Path(tmp) / "f.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE m (seq INTEGER PRIMARY KEY, body BLOB)")
        body = os.urandom(1300)
        for _ in range(20):
            db.execute("INSERT INTO m (body) VALUES (?)", (body,))
        t0 = time.perf_counter()
        for _ in range(n):
            db.execute("INSERT INTO m (body) VALUES (?)", (body,))
        seconds = (time.perf_counter() - t0) / n
        db.close()
    return seconds


def _timed(fn: object, items: list[object]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn`` over ``items``."""
    w0, c0 = time.perf_counter(), time.process_time()
    for it in items:
        fn(it)  # type: ignore[operator]
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--hl7apy-messages", type=int, default=300,
                    help="how many of the messages hl7apy parses (it is slow)")
    ap.add_argument("--cpu", type=int, default=0, help="CPU for the listener (default 0)")
    ap.add_argument("--store", help="SQLAlchemy URL of an empty database (default: SQLite "
                    "in a temporary directory under the bench data dir)")
    args = ap.parse_args()

    import structlog

    from gateway import logging as gateway_logging

    gateway_logging.configure("warning")
    path, _ = ensure_demo(300, progress=False)
    from gateway.adt.config import AdtSettings
    from gateway.adt.runtime import build_mapper
    from gateway.settings import Settings

    settings = Settings(data_dir=DATA_DIR, progress=False, log_level="warning",
                        connection_urls={"pas": f"sqlite:///{path}",
                                         "pas-hl7": "mllp://127.0.0.1:9"})
    mapper = build_mapper(settings, AdtSettings())
    messages = make_messages(args.messages)
    ncpu = os.cpu_count() or 1
    pinned = pin_self(args.cpu)
    sender_cpu = (args.cpu + 1) % ncpu if ncpu > 1 else None

    # parse-only baselines, same messages, same process and CPU
    from hl7apy.parser import parse_message

    from adapters.hl7v2 import er7

    texts = [m.decode("utf-8") for m in messages]
    for t in texts[:20]:
        parse_message(t)
    # hl7apy is ~100x slower than the pipeline: timed on a sample of the same messages
    sample = texts[: max(1, min(len(texts), args.hl7apy_messages))]
    hl7apy_s = _timed(parse_message, sample)
    hl7apy_flat_s = _timed(lambda t: parse_message(t, find_groups=False), sample)
    small = [t.split("\rPD1|", 1)[0] + "\r" + "PV1" + t.split("\rPV1", 1)[1].split("\r", 1)[0]
             + "\r" for t in sample]
    assert all(len(m.rstrip("\r").split("\r")) == 4 for m in small)
    hl7apy_small_s = _timed(parse_message, small)
    er7_s = _timed(er7.parse, messages)
    # parse + map only (no store, no network)
    map_s = _timed(lambda m: mapper.incoming(m, er7.parse(m)), messages)
    (DATA_DIR / "adt").mkdir(parents=True, exist_ok=True)
    fsync_s = _fsync_commit_seconds(DATA_DIR / "adt")

    rows = []
    b0, tot0 = cpu_jiffies()
    passes = [("FULL", 1), ("FULL", args.connections), ("NORMAL", 1),
              ("NORMAL", args.connections)]
    if args.store:
        passes = [("FULL", args.connections)]  # an external store is not emptied between
    cpu_rows: list[float] = []
    for sync, conns in passes:
        with tempfile.TemporaryDirectory(dir=DATA_DIR / "adt") as tmp:
            url = args.store or f"sqlite:///{Path(tmp) / 'adt.sqlite'}"
            # warm-up on a separate store, then the measured pass on a fresh one
            asyncio.run(_serve_and_measure(make_messages(200), 1,
                                           f"sqlite:///{Path(tmp) / 'warm.sqlite'}", mapper,
                                           sender_cpu, sync))
            seconds, bad, count, cpu = asyncio.run(
                _serve_and_measure(messages, conns, url, mapper, sender_cpu, sync))
        if bad or count != len(messages):
            print(f"FAILED: {bad} non-AA replies, {count} of {len(messages)} recorded")
            return 1
        store = "store" if args.store else f"SQLite {sync}"
        rows.append((f"listener → map → {store} → ACK, {conns} conn", len(messages) / seconds))
        cpu_rows.append(cpu)
    b1, tot1 = cpu_jiffies()
    fsync_after_s = _fsync_commit_seconds(DATA_DIR / "adt")  # the disk changes: before, after
    busy = 100.0 * (b1 - b0) / (tot1 - tot0) if tot1 > tot0 else 0.0
    n = len(messages)
    print(f"\nADT inbound, {n} ITK A01 messages ({sum(map(len, messages)) // n} bytes each); "
          f"listener pinned to CPU {args.cpu}: {pinned}; sender on CPU {sender_cpu}; "
          f"{ncpu} CPUs, shared with other work")
    print(f"{'pipeline':<48} {'msg/s':>10} {'µs/msg':>9} {'CPU µs/msg':>11}")
    for (name, rate), cpu in zip(rows, cpu_rows, strict=True):
        print(f"{name:<48} {rate:>10,.0f} {1e6 / rate:>9,.0f} {1e6 * cpu / n:>11,.0f}")

    def line(name: str, timed: tuple[float, float], count: int) -> None:
        wall, cpu = timed
        print(f"{name:<48} {count / wall:>10,.0f} {1e6 * wall / count:>9,.0f} "
              f"{1e6 * cpu / count:>11,.0f}")

    line("  (in-process) er7.parse + mapping, no store", map_s, n)
    line(f"baseline: hl7apy parse_message alone ({len(sample)})", hl7apy_s, len(sample))
    line("baseline: hl7apy parse_message, find_groups=False", hl7apy_flat_s, len(sample))
    line("baseline: hl7apy parse_message, 4-segment ADT", hl7apy_small_s, len(sample))
    line("baseline: er7.parse alone", er7_s, n)
    for when, secs in (("before", fsync_s), ("after", fsync_after_s)):
        print(f"{f'1 conn ceiling: 1 / (one FULL commit), {when}':<48} {1 / secs:>10,.0f} "
              f"{1e6 * secs:>9,.0f}")
    headline = dict(rows).get(f"listener → map → SQLite FULL → ACK, {args.connections} conn")
    if headline is not None:
        verdict = "meets" if headline >= 1000 else "does NOT meet"
        print(f"\nrecommended deployment (SQLite FULL, {args.connections} PAS connections, "
              f"group commit): {headline:,.0f} msg/s — {verdict} the 1,000 msg/s target")
    print(f"all CPUs busy during the listener passes: {busy:.0f}% "
          f"(sender + listener + anyone else); idle check now: {busy_percent(1.0):.0f}%")
    structlog.reset_defaults()
    return 0


if __name__ == "__main__":
    sys.exit(main())
