"""Leases in a database table: which process works what, when several share one database.

A lease (a row ``name``, ``holder``, ``expires``) is held until its holder gives it back or
``ttl`` seconds after the holder last took or renewed it (the holder died). Taking and
renewing are one upsert that changes the row only when it is the holder's already or has
ended, so the claim is atomic however many processes race for it (SQLite >= 3.24,
PostgreSQL >= 9.5). The statements use named parameters (``:name``), which both the
sqlite3 module (gateway.messaging.store) and SQLAlchemy's ``text`` (gateway.adt.store) take.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

Execute = Callable[[str, Mapping[str, Any]], int]
"""Runs one statement with named parameters; the number of rows it changed."""


def acquire(execute: Execute, table: str, name: str, holder: str, ttl: float) -> bool:
    """Take or renew ``name`` for ``holder`` for ``ttl`` seconds; False while another has it."""
    now = time.time()
    return execute(
        f"INSERT INTO {table} (name, holder, expires) VALUES (:name, :holder, :expires) "
        "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
        f"expires = excluded.expires WHERE {table}.holder = excluded.holder "
        f"OR {table}.expires < :now",
        {"name": name, "holder": holder, "expires": now + ttl, "now": now}) > 0


def release(execute: Execute, table: str, name: str, holder: str) -> None:
    """Give ``name`` back, if ``holder`` has it (another's is left alone)."""
    execute(f"DELETE FROM {table} WHERE name = :name AND holder = :holder",
            {"name": name, "holder": holder})


def forget_ended(execute: Execute, table: str) -> int:
    """Delete the leases of holders that died (a live holder renews or gives its back);
    how many."""
    return execute(f"DELETE FROM {table} WHERE expires < :now", {"now": time.time()})
