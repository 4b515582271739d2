"""Optional observers of backend work, installed by the gateway (metrics, traces).

Adapters call these module-level hooks around a unit of backend work; unset (None), a hook
costs one attribute read. The gateway installs ``exchange`` always (metrics per HL7 v2
exchange) and ``statement`` only while tracing is on (a span per SQL statement).

* ``statement(connection, dialect, sql)`` — a context manager around one SQL statement;
  ``sql`` is the statement text with placeholders, never the values.
* ``statement_timer(connection, dialect, sql)`` — for one statement (its text with
  placeholders), a function the adapter calls with each run's seconds; asked once per
  statement object and kept with it (metrics: time by statement shape).
* ``exchange(connection, message_type, control_id)`` — a context manager around one HL7 v2
  request/reply (retries included); an exception leaving it is the exchange's outcome.
* ``event(connection, name)`` — a countable occurrence: ``mllp_retry``.
* ``pool_wait(connection, seconds)`` — how long a call waited for a free connection (SQL: a
  worker thread with its pooled connection; HL7 v2: one of the MLLP client's connections).
* ``dropped(where, reason)`` — one source value left out (``adapters.dropped.note``): a
  place from the configuration and a fixed phrase, never the value.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

statement: Callable[[str, str, str], AbstractContextManager[Any]] | None = None
statement_timer: Callable[[str, str, str], Callable[[float], None]] | None = None
exchange: Callable[[str, str, str], AbstractContextManager[Any]] | None = None
event: Callable[[str, str], None] | None = None
pool_wait: Callable[[str, float], None] | None = None
dropped: Callable[[str, str], None] | None = None
