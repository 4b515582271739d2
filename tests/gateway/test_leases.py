"""gateway.leases on the two kinds of connection its stores give it: sqlite3 (the message
store) and SQLAlchemy on SQLite and PostgreSQL (the ADT store). Holders racing for one lease
on their own connections (as processes would): exactly one has it."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway import leases
from tests.pg import TempPostgres

TABLE = "CREATE TABLE test_lease (name VARCHAR(64) PRIMARY KEY, holder VARCHAR(200) NOT NULL, "\
        "expires FLOAT NOT NULL)"

Connect = Callable[[], leases.Execute]


@pytest.fixture(params=["sqlite3", "sqlalchemy-sqlite", "sqlalchemy-postgresql"])
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Connect]:
    """A new connection's ``Execute`` each call (the table made once)."""
    if request.param == "sqlite3":
        path = tmp_path / "lease.sqlite"
        with sqlite3.connect(path) as db:
            db.execute(TABLE)

        def raw() -> leases.Execute:
            db = sqlite3.connect(path, isolation_level=None, timeout=10,
                                 check_same_thread=False)
            return lambda sql, args: int(db.execute(sql, args).rowcount)

        yield raw
        return
    if request.param == "sqlalchemy-sqlite":
        url = f"sqlite:///{tmp_path / 'lease.sqlite'}"
    else:
        pg: TempPostgres = request.getfixturevalue("postgres_server")
        url = pg.create_database(f"lease_{tmp_path.name[-12:].lower().replace('-', '_')}")
    engine = sa.create_engine(url, connect_args={"timeout": 10} if "sqlite" in url else {})
    with engine.begin() as conn:
        conn.execute(sa.text(TABLE))

    def alchemy() -> leases.Execute:
        def execute(sql: str, args: Mapping[str, Any]) -> int:
            with engine.begin() as conn:
                return int(conn.execute(sa.text(sql), args).rowcount)
        return execute

    yield alchemy
    engine.dispose()


def test_take_renew_give_back_and_expire(connect: Connect) -> None:
    a, b = connect(), connect()
    assert leases.acquire(a, "test_lease", "outbox", "a", 30)
    assert not leases.acquire(b, "test_lease", "outbox", "b", 30)
    assert leases.acquire(a, "test_lease", "outbox", "a", 30)  # renewed by its holder
    assert leases.acquire(b, "test_lease", "other", "b", 30)  # another name: its own lease
    leases.release(b, "test_lease", "outbox", "b")  # not b's to give back
    assert not leases.acquire(b, "test_lease", "outbox", "b", 30)
    leases.release(a, "test_lease", "outbox", "a")
    assert leases.acquire(b, "test_lease", "outbox", "b", 0.2)
    time.sleep(0.3)  # b died: its lease ended
    assert leases.acquire(a, "test_lease", "outbox", "a", 30)
    assert leases.acquire(b, "test_lease", "gone", "b", 0.01)
    time.sleep(0.05)
    assert leases.forget_ended(a, "test_lease") == 1  # b's "gone"; not the live ones
    assert not leases.acquire(b, "test_lease", "outbox", "b", 30)
    assert not leases.acquire(a, "test_lease", "other", "a", 30)


def test_racing_holders_one_wins(connect: Connect) -> None:
    holders = [connect() for _ in range(8)]
    won: list[int] = []
    start = threading.Barrier(len(holders))

    def race(i: int) -> None:
        start.wait()
        if leases.acquire(holders[i], "test_lease", "delivery", f"h{i}", 30):
            won.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(holders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(won) == 1
