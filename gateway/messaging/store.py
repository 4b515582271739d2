"""The durable record of messages (SQLite in the data directory; WAL, synchronous=FULL).

``message``: one row per MessageHeader.id: a hash of the message (the same id with other
content is refused), its state (``accepted`` — asynchronous, not yet processed — then
``unknown`` — the write was sent and not acknowledged — or ``done``) and the response
message once final. The message body is held only while it waits to be processed; a done
row keeps the response (ids and codes, no patient data) for as long as the file is kept.
``outbox``: responses to deliver to a ``response-url``, with attempts and the next try.
``lease``: who works what, when several processes share the file (``serve --workers N`` on
one data directory): the outbox (one deliverer at a time) and each asynchronous message
while it is processed (applied by one process only). A lease ends when its holder gives it
back or ``ttl`` seconds after its holder last renewed it (the holder died).
Each call is short and runs on a worker thread (the event loop never waits on a disk sync).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson

from gateway import leases

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
  id TEXT PRIMARY KEY, digest TEXT NOT NULL, state TEXT NOT NULL,
  body BLOB, response BLOB, response_url TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE, url TEXT NOT NULL,
  body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL,
  delivered REAL, dead INTEGER NOT NULL DEFAULT 0, last_error TEXT);
CREATE TABLE IF NOT EXISTS lease (
  name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
"""


@dataclass(frozen=True)
class Stored:
    id: str
    digest: str
    state: str
    body: dict[str, Any] | None
    response: dict[str, Any] | None
    response_url: str | None


@dataclass(frozen=True)
class Delivery:
    seq: int
    message_id: str
    url: str
    body: bytes
    attempts: int


class MessageStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.executescript(_RETRY_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- messages

    def get_sync(self, mid: str) -> Stored | None:
        rows = self._run("SELECT id, digest, state, body, response, response_url FROM message "
                         "WHERE id = ?", (mid,))
        if not rows:
            return None
        r = rows[0]
        return Stored(r[0], r[1], r[2], orjson.loads(r[3]) if r[3] else None,
                      orjson.loads(r[4]) if r[4] else None, r[5])

    async def get(self, mid: str) -> Stored | None:
        return await anyio.to_thread.run_sync(self.get_sync, mid)

    async def put(self, mid: str, digest: str, state: str, body: dict[str, Any] | None = None,
                  response_url: str | None = None) -> None:
        raw = orjson.dumps(body) if body is not None else None
        await anyio.to_thread.run_sync(self._run, (
            "INSERT INTO message (id, digest, state, body, response_url, created) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET state = excluded.state"),
            (mid, digest, state, raw, response_url, time.time()))

    async def state(self, mid: str, state: str) -> None:
        await anyio.to_thread.run_sync(self._run, "UPDATE message SET state = ? WHERE id = ?",
                                       (state, mid))

    async def finish(self, mid: str, response: dict[str, Any], deliver_to: str | None) -> None:
        """The final response, and (asynchronous) its delivery, in one transaction: a
        response is never recorded without its delivery queued, nor queued twice."""
        raw = orjson.dumps(response)

        def go() -> None:
            with self._lock:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("UPDATE message SET state = 'done', response = ?, body = NULL "
                               "WHERE id = ?", (raw, mid))
                    if deliver_to:
                        db.execute("INSERT OR IGNORE INTO outbox (message_id, url, body, "
                                   "next_at) VALUES (?, ?, ?, ?)", (mid, deliver_to, raw,
                                                                    time.time()))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise

        await anyio.to_thread.run_sync(go)

    async def forget(self, mid: str) -> None:
        """A transient failure before anything was sent: the message may be sent again."""
        await anyio.to_thread.run_sync(self._run, "DELETE FROM message WHERE id = ? AND "
                                       "state != 'done'", (mid,))

    async def waiting(self) -> list[Stored]:
        """Accepted asynchronous messages not yet answered (after a restart too)."""
        ids = await anyio.to_thread.run_sync(self._run, (
            "SELECT id FROM message WHERE state IN ('accepted', 'unknown') AND response_url "
            "IS NOT NULL ORDER BY created"))
        out = []
        for (mid,) in ids:
            found = await self.get(mid)
            if found is not None:
                out.append(found)
        return out

    # -- the outbox

    async def due(self, limit: int = 20) -> list[Delivery]:
        rows = await anyio.to_thread.run_sync(self._run, (
            "SELECT seq, message_id, url, body, attempts FROM outbox WHERE delivered IS NULL "
            "AND dead = 0 AND next_at <= ? ORDER BY seq LIMIT ?"), (time.time(), limit))
        return [Delivery(*r) for r in rows]

    async def delivered(self, seq: int) -> None:
        await anyio.to_thread.run_sync(self._run, "UPDATE outbox SET delivered = ?, "
                                       "attempts = attempts + 1 WHERE seq = ?",
                                       (time.time(), seq))

    async def failed(self, seq: int, error: str, next_at: float | None) -> None:
        """A failed attempt: retried at ``next_at``, or dead (kept, with its last error)."""
        await anyio.to_thread.run_sync(self._run, (
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_at = ?, dead = ? "
            "WHERE seq = ?"), (error[:200], next_at or 0.0, 1 if next_at is None else 0, seq))

    async def purge(self, older_than_seconds: float) -> int:
        """Forget answered messages and delivered responses older than the retention: a
        resend after that is processed as new. Dead deliveries and unanswered messages are
        kept (someone must look at them)."""
        cut = time.time() - older_than_seconds

        def go() -> int:
            with self._lock:
                n = self._db.execute("DELETE FROM outbox WHERE delivered IS NOT NULL AND "
                                     "delivered < ?", (cut,)).rowcount
                n += self._db.execute(
                    "DELETE FROM message WHERE state = 'done' AND created < ? AND id NOT IN "
                    "(SELECT message_id FROM outbox)", (cut,)).rowcount
                leases.forget_ended(self._unsynced, "lease")
                return int(n)

        return await anyio.to_thread.run_sync(go)

    # -- leases (SQLite serialises writers across processes: the claim is atomic)

    def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew ``name`` for ``ttl`` seconds; False while another holder has it."""
        with self._lock:
            return leases.acquire(self._unsynced, "lease", name, holder, ttl)

    def release_lease(self, name: str, holder: str) -> None:
        with self._lock:
            leases.release(self._unsynced, "lease", name, holder)

    def _unsynced(self, sql: str, args: Mapping[str, Any]) -> int:
        # A lease need not survive power loss (every holder is gone then too): no fsync of
        # its own; the next synchronous commit syncs it with everything else.
        self._db.execute("PRAGMA synchronous=OFF")
        try:
            return int(self._db.execute(sql, args).rowcount)
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lease, name, holder, ttl)

    async def unlease(self, name: str, holder: str) -> None:
        await anyio.to_thread.run_sync(self.release_lease, name, holder)

    def outbox_rows(self) -> list[tuple[Any, ...]]:
        """Every outbox row (operations and tests): message id, attempts, delivered, dead."""
        return self._run("SELECT message_id, attempts, delivered, dead, last_error FROM outbox "
                         "ORDER BY seq")


# -- the worker's retries and its dead letters (kept apart from the tables above):
# ``retry``, the worker's attempts at an accepted message that met transient errors;
# ``dead_letter``, the messages it gave up on (gateway.retry.Backoff; kept, never deleted).

_RETRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS retry (
  message_id TEXT PRIMARY KEY, attempts INTEGER NOT NULL, first_at REAL NOT NULL,
  last_error TEXT);
CREATE TABLE IF NOT EXISTS dead_letter (
  id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, outcome TEXT NOT NULL,
  attempts INTEGER NOT NULL, first_at REAL NOT NULL, at REAL NOT NULL, last_error TEXT);
"""


def _attempted(store: MessageStore, mid: str, error: str) -> tuple[int, float]:
    now = time.time()
    with store._lock:
        row = store._db.execute(
            "INSERT INTO retry (message_id, attempts, first_at, last_error) VALUES (?, 1, ?, ?) "
            "ON CONFLICT(message_id) DO UPDATE SET attempts = attempts + 1, "
            "last_error = excluded.last_error RETURNING attempts, first_at",
            (mid, now, error[:200])).fetchone()
    return int(row[0]), now - float(row[1])


async def attempted(store: MessageStore, mid: str, error: str) -> tuple[int, float]:
    """One more failed attempt at message ``mid``: (attempts so far, seconds since the first);
    durable, so a restart does not reset the bound."""
    return await anyio.to_thread.run_sync(_attempted, store, mid, error)


async def clear_retries(store: MessageStore, mid: str) -> None:
    await anyio.to_thread.run_sync(store._run, "DELETE FROM retry WHERE message_id = ?", (mid,))


async def give_up(store: MessageStore, mid: str, outcome: str, response: dict[str, Any],
                  deliver_to: str | None) -> int:
    """The worker gives up on message ``mid``, in one transaction: a dead letter (kept), the
    final response queued for the response-url, and the message row left so that the same
    message sent again is processed again: forgotten when nothing reached the backend
    (``outcome`` ``unsent``), kept ``unknown`` without its body when a write may have been
    applied (a resend then looks for it first). The dead letter's id."""
    raw = orjson.dumps(response)

    def go() -> int:
        with store._lock:
            db = store._db
            db.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                row = db.execute("SELECT attempts, first_at, last_error FROM retry WHERE "
                                 "message_id = ?", (mid,)).fetchone() or (0, now, None)
                dead = db.execute(
                    "INSERT INTO dead_letter (message_id, outcome, attempts, first_at, at, "
                    "last_error) VALUES (?, ?, ?, ?, ?, ?)",
                    (mid, outcome, row[0], row[1], now, row[2])).lastrowid
                db.execute("DELETE FROM retry WHERE message_id = ?", (mid,))
                if outcome == "unsent":
                    db.execute("DELETE FROM message WHERE id = ? AND state != 'done'", (mid,))
                else:
                    db.execute("UPDATE message SET body = NULL, response_url = NULL WHERE "
                               "id = ? AND state != 'done'", (mid,))
                if deliver_to:  # its own outbox row: a later answer to a resend gets one too
                    db.execute("INSERT INTO outbox (message_id, url, body, next_at) VALUES "
                               "(?, ?, ?, ?)", (f"{mid}#gave-up-{dead}", deliver_to, raw, now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return int(dead or 0)

    return await anyio.to_thread.run_sync(go)


async def reaccept(store: MessageStore, mid: str, body: dict[str, Any],
                   response_url: str) -> None:
    """A message given up on with its outcome unknown, sent again asynchronously: waiting
    again (its state stays ``unknown``: the worker looks for the first write first)."""
    await anyio.to_thread.run_sync(store._run, (
        "UPDATE message SET body = ?, response_url = ? WHERE id = ? AND state = 'unknown' "
        "AND body IS NULL"), (orjson.dumps(body), response_url, mid))


def dead_letters(store: MessageStore) -> list[dict[str, Any]]:
    """The messages the worker gave up on (operations and tests), oldest first."""
    rows = store._run("SELECT id, message_id, outcome, attempts, first_at, at, last_error FROM "
                      "dead_letter ORDER BY id")
    keys = ("id", "message_id", "outcome", "attempts", "first_at", "at", "last_error")
    return [dict(zip(keys, r, strict=True)) for r in rows]
