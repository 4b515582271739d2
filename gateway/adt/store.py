"""The durable record of the ADT feed: messages, merges, subscriptions, the notification outbox.

SQLAlchemy Core, so the same code runs on SQLite (default: a file in the data directory, WAL,
``synchronous=FULL``) and PostgreSQL (production). ``AdtStore`` is the interface the listener,
the delivery worker and the API use; another backend implements the same methods.

One transaction per message: the message row, a merge if it is one, and a notification row
for every active Subscription whose criteria match — so an ACKed message can never be missing
its notifications, and a crash before the commit leaves nothing behind (the PAS resends).
Notification ids are ``<subscription>-<message seq>``: stable across retries and restarts,
which is what a subscriber deduplicates on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from gateway import leases as lease_rows
from gateway.adt import criteria as criteria_mod

metadata = sa.MetaData()

messages = sa.Table(
    "adt_message", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sender", sa.String(200), nullable=False),
    sa.Column("control_id", sa.String(200), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("patient_key", sa.String(200)),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("resources", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint("sender", "control_id", name="uq_adt_message_control"),
)

merges = sa.Table(
    "adt_merge", metadata,
    sa.Column("retired", sa.String(200), primary_key=True),
    sa.Column("survivor", sa.String(200), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
)
# the survivor's read asks which ids were merged into it (Patient.link replaces)
_MERGE_SURVIVOR_INDEX = sa.Index("ix_adt_merge_survivor", merges.c.survivor)

subscriptions = sa.Table(
    "subscription", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("criteria", sa.String(2000), nullable=False),
    sa.Column("endpoint", sa.String(2000), nullable=False),
    sa.Column("resource", sa.LargeBinary, nullable=False),
    sa.Column("owner", sa.String(200)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("end_at", sa.Float),
)

notifications = sa.Table(
    "subscription_notification", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subscription_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("patient_key", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending delivered dead cancelled
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_error", sa.String(200)),
    sa.Column("finished_at", sa.Float),
    sa.Index("ix_notification_queue", "status", "subscription_id", "patient_key", "id"),
)


refusals = sa.Table(
    "adt_refusal", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sender", sa.String(200), nullable=False),
    sa.Column("control_id", sa.String(200), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("code", sa.String(2), nullable=False),
    sa.Column("error", sa.String(8), nullable=False),
    sa.Column("text", sa.String(200), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)
"""Messages refused after their header was accepted (AE): what was refused and why (no PHI:
ids, the HL7 error code and our text). Recording it is what makes an enhanced-mode CA honest
— the message was committed, as a refusal — before the application ACK AE reports it."""

leases = sa.Table(
    "adt_lease", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires", sa.Float, nullable=False),
)

# Built once: the per-message statements are the hot path of the listener.
_PRIOR = sa.select(messages.c.seq, messages.c.digest).where(
    messages.c.sender == sa.bindparam("s"), messages.c.control_id == sa.bindparam("c"))
_INSERT = messages.insert()
_NOTIFY = notifications.insert()


@dataclass(frozen=True)
class Incoming:
    """One ADT message, mapped, ready to record."""

    sender: str
    control_id: str
    digest: str
    event: str
    patient_key: str | None
    resources: list[dict[str, Any]]
    retired: str | None = None
    """For a merge: the patient id the PAS retired (the survivor is ``patient_key``)."""


@dataclass(frozen=True)
class Recorded:
    seq: int
    duplicate: bool
    conflict: bool = False
    """The control id was seen before with different content."""
    notifications: int = 0


@dataclass(frozen=True)
class Due:
    id: int
    subscription_id: str
    seq: int
    patient_key: str
    attempts: int
    endpoint: str
    subscription: dict[str, Any]
    event: str
    resources: list[dict[str, Any]]

    @property
    def notification_id(self) -> str:
        return f"{self.subscription_id}-{self.seq}"


SYNCHRONOUS = ("FULL", "NORMAL")


def _sqlite_pragmas(synchronous: str) -> Callable[[Any, Any], None]:
    def apply(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: an ACKed message survives power loss (an fsync per commit). NORMAL: it
        # survives the process being killed, not the machine losing power.
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()
    return apply


class AdtStore:
    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL") -> None:
        if sqlite_synchronous not in SYNCHRONOUS:
            raise ValueError(f"sqlite_synchronous is one of {', '.join(SYNCHRONOUS)}")
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
        self.engine: Engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa_event.listen(self.engine, "connect", _sqlite_pragmas(sqlite_synchronous))
        metadata.create_all(self.engine)
        _MERGE_SURVIVOR_INDEX.create(self.engine, checkfirst=True)  # stores made before it
        self._subs: list[tuple[str, criteria_mod.Criteria]] | None = None
        self._subs_checked = 0.0

    def close(self) -> None:
        self.engine.dispose()

    # -- the feed

    def record(self, msg: Incoming) -> Recorded:
        return self.record_many([msg])[0]

    def record_many(self, batch: list[Incoming]) -> list[Recorded]:
        """Record messages in one transaction (group commit: one fsync for the batch), in
        order. A batch that fails as a whole (a concurrent writer recorded one of them
        first) is retried one message per transaction."""
        subs = self._active_subscriptions()
        try:
            with self.engine.begin() as conn:
                return [self._record_in(conn, msg, subs) for msg in batch]
        except IntegrityError:
            if len(batch) == 1:
                return [Recorded(0, True)]
            return [self.record(m) for m in batch]

    def _record_in(self, conn: sa.Connection, msg: Incoming,
                   subs: list[tuple[str, criteria_mod.Criteria]]) -> Recorded:
        prior = conn.execute(_PRIOR, {"s": msg.sender, "c": msg.control_id}).first()
        if prior is not None:
            return Recorded(prior.seq, True, conflict=prior.digest != msg.digest)
        res = conn.execute(_INSERT, {
            "sender": msg.sender, "control_id": msg.control_id, "digest": msg.digest,
            "event": msg.event, "patient_key": msg.patient_key, "received_at": time.time(),
            "resources": orjson.dumps(msg.resources)})
        key = res.inserted_primary_key
        assert key is not None
        seq = int(key[0])
        if msg.retired and msg.patient_key:
            self._merge(conn, msg.retired, msg.patient_key, seq)
        rows = []
        if msg.patient_key:
            now = time.time()
            for sub_id, crit in subs:
                if any(crit.matches(r) for r in msg.resources):
                    rows.append({"subscription_id": sub_id, "seq": seq,
                                 "patient_key": msg.patient_key, "status": "pending",
                                 "attempts": 0, "next_attempt_at": now})
        if rows:
            conn.execute(_NOTIFY, rows)
        return Recorded(seq, False, notifications=len(rows))

    def _merge(self, conn: sa.Connection, retired: str, survivor: str, seq: int) -> None:
        if retired == survivor:
            return
        conn.execute(merges.delete().where(merges.c.retired == survivor))  # un-merge
        # earlier merges into the retired id now lead to the survivor (no chains at read)
        conn.execute(merges.update().where(merges.c.survivor == retired)
                     .values(survivor=survivor))
        conn.execute(merges.delete().where(merges.c.retired == retired))
        conn.execute(merges.insert().values(retired=retired, survivor=survivor, seq=seq))

    def survivor_of(self, patient_id: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(merges.c.survivor)
                               .where(merges.c.retired == patient_id)).first()
        return None if row is None else str(row.survivor)

    def record_refusal(self, sender: str, control_id: str, digest: str, event: str,
                       code: str, error: str, text: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(refusals.insert().values(
                sender=sender[:200], control_id=control_id[:200], digest=digest,
                event=event[:16], code=code, error=error, text=text[:200],
                received_at=time.time()))

    def refused(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(refusals).order_by(refusals.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def merge_links(self, patient_id: str) -> tuple[str | None, list[str]]:
        """(the survivor ``patient_id`` was merged into, or None; the ids merged into it)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(merges.c.retired, merges.c.survivor, merges.c.seq)
                                .where(sa.or_(merges.c.retired == patient_id,
                                              merges.c.survivor == patient_id))
                                .order_by(merges.c.seq)).all()
        survivor = next((str(r.survivor) for r in rows if r.retired == patient_id), None)
        return survivor, [str(r.retired) for r in rows if r.survivor == patient_id]

    def message_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(messages)).scalar_one())

    # -- subscriptions

    def _active_subscriptions(self) -> list[tuple[str, criteria_mod.Criteria]]:
        # Re-read at most every half second: a Subscription created in another process (serve)
        # starts receiving within that time.
        now = time.monotonic()
        if self._subs is None or now - self._subs_checked > 0.5:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(subscriptions.c.id, subscriptions.c.criteria)
                                    .where(subscriptions.c.status == "active",
                                           sa.or_(subscriptions.c.end_at.is_(None),
                                                  subscriptions.c.end_at > time.time()))).all()
            self._subs = [(r.id, criteria_mod.parse(r.criteria)) for r in rows]
            self._subs_checked = now
        return self._subs

    def add_subscription(self, sub_id: str, resource: dict[str, Any], owner: str | None,
                         end_at: float | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(subscriptions.insert().values(
                id=sub_id, status=resource["status"], criteria=resource["criteria"],
                endpoint=resource["channel"]["endpoint"], resource=orjson.dumps(resource),
                owner=owner, created_at=time.time(), end_at=end_at))
        self._subs = None

    def count_subscriptions(self, owner: str | None) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(
                sa.select(sa.func.count()).select_from(subscriptions).where(
                    subscriptions.c.owner == owner, subscriptions.c.status == "active")
            ).scalar_one())

    def stored_subscription(self, sub_id: str) -> bytes | None:
        """The stored resource as stored (for an update's compare-and-swap), None if gone."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(subscriptions.c.resource).where(
                subscriptions.c.id == sub_id, subscriptions.c.status != "deleted")).first()
        return None if row is None else bytes(row.resource)

    def update_subscription(self, sub_id: str, resource: dict[str, Any], previous: bytes,
                            end_at: float | None) -> bool:
        """Replace the Subscription if it is still ``previous`` (False: it changed meanwhile,
        or was deleted). Turned off, its pending notifications are cancelled."""
        status = "off" if resource["status"] == "off" else "active"
        with self.engine.begin() as conn:
            n = conn.execute(subscriptions.update().where(
                subscriptions.c.id == sub_id, subscriptions.c.status != "deleted",
                subscriptions.c.resource == previous).values(
                status=status, criteria=resource["criteria"],
                endpoint=resource["channel"]["endpoint"], resource=orjson.dumps(resource),
                end_at=end_at)).rowcount
            if n and status == "off":
                conn.execute(notifications.update().where(
                    notifications.c.subscription_id == sub_id,
                    notifications.c.status == "pending").values(status="cancelled",
                                                                 finished_at=time.time()))
        self._subs = None
        return bool(n)

    def get_subscription(self, sub_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(subscriptions.c.resource, subscriptions.c.status,
                                         subscriptions.c.end_at)
                               .where(subscriptions.c.id == sub_id)).first()
        if row is None or row.status == "deleted":
            return None
        return _as_served(row.resource, row.end_at)

    def search_subscriptions(self, status: Iterable[str] | None = None,
                             limit: int = 100) -> list[dict[str, Any]]:
        q = sa.select(subscriptions.c.resource, subscriptions.c.end_at).where(
            subscriptions.c.status != "deleted")
        if status is not None:
            q = q.where(subscriptions.c.status.in_(list(status)))
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(subscriptions.c.created_at).limit(limit)).all()
        return [_as_served(r.resource, r.end_at) for r in rows]

    def delete_subscription(self, sub_id: str) -> bool:
        with self.engine.begin() as conn:
            n = conn.execute(subscriptions.update().where(
                subscriptions.c.id == sub_id, subscriptions.c.status != "deleted")
                .values(status="deleted")).rowcount
            conn.execute(notifications.update().where(
                notifications.c.subscription_id == sub_id,
                notifications.c.status == "pending").values(status="cancelled",
                                                             finished_at=time.time()))
        self._subs = None
        return bool(n)

    def _set_subscription_status(self, conn: sa.Connection, sub_id: str, status: str,
                                 error: str | None) -> None:
        row = conn.execute(sa.select(subscriptions.c.resource)
                           .where(subscriptions.c.id == sub_id)).first()
        if row is None:
            return
        res = orjson.loads(row.resource)
        res["status"] = status
        if error:
            res["error"] = error
        else:
            res.pop("error", None)
        # only an active one: a Subscription turned off (or deleted) while a notification was
        # in flight stays as its client left it
        conn.execute(subscriptions.update().where(subscriptions.c.id == sub_id,
                                                  subscriptions.c.status == "active")
                     .values(resource=orjson.dumps(res)))

    # -- the outbox

    def due(self, now: float, limit: int = 64) -> list[Due]:
        """The first pending notification of each (subscription, patient), if it is due.

        Only the head of each patient's queue is ever handed out, which is what keeps
        delivery in order per patient while different patients proceed in parallel.
        """
        n, m = notifications, notifications.alias("m")
        head = sa.select(sa.func.min(m.c.id)).where(
            m.c.status == "pending", m.c.subscription_id == n.c.subscription_id,
            m.c.patient_key == n.c.patient_key).scalar_subquery()
        q = (sa.select(n.c.id, n.c.subscription_id, n.c.seq, n.c.patient_key, n.c.attempts,
                       subscriptions.c.endpoint, subscriptions.c.resource.label("sub"),
                       messages.c.event, messages.c.resources)
             .join(subscriptions, subscriptions.c.id == n.c.subscription_id)
             .join(messages, messages.c.seq == n.c.seq)
             .where(n.c.status == "pending", n.c.id == head, n.c.next_attempt_at <= now,
                    subscriptions.c.status == "active")
             .order_by(n.c.id).limit(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [Due(r.id, r.subscription_id, r.seq, r.patient_key, r.attempts, r.endpoint,
                    orjson.loads(r.sub), r.event, orjson.loads(r.resources)) for r in rows]

    def delivered(self, nid: int, sub_id: str, *, recovered: bool = False) -> None:
        """Delivered; ``recovered``: the Subscription said error, and is active again."""
        with self.engine.begin() as conn:
            # only a pending one: one cancelled while in flight stays cancelled
            n = conn.execute(notifications.update().where(
                notifications.c.id == nid, notifications.c.status == "pending")
                .values(status="delivered", attempts=notifications.c.attempts + 1,
                        finished_at=time.time(), last_error=None)).rowcount
            if recovered and n:
                self._set_subscription_status(conn, sub_id, "active", None)

    def failed(self, nid: int, sub_id: str, error: str, retry_at: float | None) -> None:
        """A failed attempt: retry at ``retry_at``, or dead-letter it (None)."""
        with self.engine.begin() as conn:
            values: dict[str, Any] = {"attempts": notifications.c.attempts + 1,
                                      "last_error": error[:200]}
            if retry_at is None:
                values.update(status="dead", finished_at=time.time())
            else:
                values["next_attempt_at"] = retry_at
            n = conn.execute(notifications.update().where(
                notifications.c.id == nid, notifications.c.status == "pending")
                .values(**values)).rowcount
            if n:  # a notification cancelled while in flight stays cancelled
                self._set_subscription_status(conn, sub_id, "error" if retry_at is None
                                              else "active", error if retry_at is None
                                              else None)

    def dead_letters(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(notifications).where(
                notifications.c.status == "dead").order_by(notifications.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def prune(self, before: float) -> int:
        """Forget what finished before ``before``: delivered and cancelled notifications, and
        messages none of whose notifications is still pending or dead. Dead letters stay
        until an operator deals with them. A message forgotten can no longer be recognised
        as a resend, so keep more than the PAS's resend horizon (days, not minutes)."""
        n = notifications
        with self.engine.begin() as conn:
            gone = conn.execute(n.delete().where(n.c.status.in_(["delivered", "cancelled"]),
                                                 n.c.finished_at < before)).rowcount
            keep = sa.select(n.c.seq).where(n.c.status.in_(["pending", "dead"]))
            gone += conn.execute(messages.delete().where(
                messages.c.received_at < before, messages.c.seq.not_in(keep))).rowcount
            gone += conn.execute(refusals.delete().where(
                refusals.c.received_at < before)).rowcount
        return int(gone)

    def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl`` seconds; False if another holds it.

        Delivery takes one, so two processes on one store never deliver at once (which could
        reorder a patient's notifications); a holder that died loses it when it expires, and
        the same holder restarting (same host and listen address) takes it back at once."""
        with self.engine.begin() as conn:
            return lease_rows.acquire(
                lambda sql, args: int(conn.execute(sa.text(sql), args).rowcount),
                leases.name, name, holder, ttl)

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease ``name`` back, if ``holder`` has it (a clean stop)."""
        with self.engine.begin() as conn:
            lease_rows.release(lambda sql, args: int(conn.execute(sa.text(sql), args).rowcount),
                               leases.name, name, holder)

    def outbox_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(notifications.c.status, sa.func.count())
                                .group_by(notifications.c.status)).all()
        return {str(r[0]): int(r[1]) for r in rows}


def _as_served(raw: bytes, end_at: float | None) -> dict[str, Any]:
    """The stored Subscription; past its end, status off (STU3: the server turns it off)."""
    out: dict[str, Any] = orjson.loads(raw)
    if end_at is not None and end_at <= time.time():
        out["status"] = "off"
    return out


StoreFactory = Callable[[str], AdtStore]
