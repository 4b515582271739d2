"""Two real OS processes deliver from one ADT store (two replicas or workers on one store):
the store's delivery lease lets one of them deliver at a time, so every notification arrives
once and each patient's notifications arrive in order. The receiver is a real HTTP server
that takes a moment per request, so the two processes' rounds overlap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from gateway.adt.store import AdtStore
from tests.gateway.adt.conftest import Receiver, adt_settings
from tests.gateway.adt.test_delivery import event, subscribe

REPO = Path(__file__).resolve().parents[3]

DELIVERER_PROCESS = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from gateway.adt.delivery import Deliverer
    from gateway.adt.store import AdtStore
    from tests.gateway.adt.conftest import adt_settings

    async def main() -> None:
        store = AdtStore(f"sqlite:///{sys.argv[1]}")
        d = Deliverer(store, adt_settings(Path(sys.argv[1]).parent), holder=sys.argv[2])
        await d.start()
        await asyncio.sleep(float(sys.argv[3]))
        await d.stop()
        store.close()

    asyncio.run(main())
""")


def test_two_processes_deliver_each_notification_once_in_order(
        tmp_path: Path, receiver: Receiver) -> None:
    path = tmp_path / "adt.sqlite"
    store = AdtStore(f"sqlite:///{path}")
    settings = adt_settings(tmp_path)
    subscribe(store, settings, receiver.url)
    patients, per_patient = ("P1", "P2", "P3"), 8
    for n in range(per_patient):
        for p in patients:
            store.record(event(p, n))
    receiver.fail_next = 3  # some retries too: a retried head holds its patient's queue
    procs = [subprocess.Popen([sys.executable, "-c", DELIVERER_PROCESS, str(path),
                               f"worker-{i}", "8"], cwd=REPO, stderr=subprocess.PIPE)
             for i in range(2)]
    try:
        got = receiver.wait_for(len(patients) * per_patient, timeout=60)
        time.sleep(0.5)  # nothing more may come (no second copy)
    finally:
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()[-2000:]
    got = list(receiver.got)
    store.close()
    ids = [g.notification_id for g in got]
    assert len(ids) == len(set(ids)) == len(patients) * per_patient  # each once
    for p in patients:
        notes = [g.body["entry"][0]["resource"]["note"] for g in got  # type: ignore[index]
                 if g.body["entry"][0]["resource"]["id"] == p]  # type: ignore[index]
        assert notes == list(range(per_patient)), (p, notes)  # in order per patient
