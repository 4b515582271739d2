"""SQL adapter: SQLAlchemy 2 Core over SQLite, PostgreSQL (psycopg) and SQL Server (pyodbc).

Only bound parameters reach the database: request values never become SQL text. Statements
are built once per criteria *shape* and reused, so the per-request cost is binding values.

Paging is keyset ("seek") paging over the sort keys, which always end with the record key:
page 500 costs what page 1 costs. NULLs sort first ascending, last descending, on every
dialect.

Blocking DBAPI drivers run in worker threads (as many as pooled connections, see
adapters.threads) so the event loop never waits on the database. A reused statement is
compiled once and run on the driver's cursor; concurrent reads by key share one statement
(see _KeyReads). Each statement has a timeout, enforced by the database where it
can (PostgreSQL ``statement_timeout``, SQLite progress handler, ODBC query timeout) and by the
caller as a backstop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import re
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.to_thread
import sqlalchemy as sa
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement, FromClause
from sqlalchemy.sql.functions import FunctionElement

from adapters import observe
from adapters.base import (
    Adapter,
    And,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Chain,
    Compare,
    Count,
    Criterion,
    Fetch,
    In,
    IsNull,
    Layout,
    Needs,
    Not,
    Nothing,
    Or,
    Page,
    Query,
    QueryTooLarge,
    Row,
    SourceConfigError,
    T,
    Text,
    source_config_error,
)
from adapters.text import fold as fold_text
from adapters.threads import Workers

log = structlog.get_logger("adapters.sql")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$#]*$")
_REF = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_$#]*)$")

# --- the source block -------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Condition(_Strict):
    column: str
    equals: str | int | None = None
    in_: list[str | int] | None = Field(default=None, alias="in")
    is_null: bool | None = None

    @field_validator("column")
    @classmethod
    def _ref(cls, v: str) -> str:
        if not _REF.match(v):
            raise ValueError("must be alias.COLUMN")
        return v

    def model_post_init(self, _context: Any) -> None:
        given = [k for k in ("equals", "in_", "is_null")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a condition needs exactly one of: equals, in, is_null")


class Join(_Strict):
    table: str
    alias: str
    link: dict[str, str]
    """Pairs ``this.COLUMN: other.COLUMN`` that must be equal."""
    where: list[Condition] = Field(default_factory=list)


class Child(Join):
    order_by: list[str] = Field(default_factory=list)


class SqlSource(_Strict):
    connection: str
    table: str
    alias: str
    schema_: str | None = Field(default=None, alias="schema")
    where: list[Condition] = Field(default_factory=list)
    joins: list[Join] = Field(default_factory=list)
    children: dict[str, Child] = Field(default_factory=dict)


# --- accent- and case-insensitive text per dialect --------------------------------------------


class fold(FunctionElement[str]):
    """lower(text) without accents, as adapters.text.fold does in Python."""

    inherit_cache = True
    name = "ccg_fold"


@functools.cache
def _pg_fold_table() -> tuple[str, str]:
    """Non-ASCII letters (Latin, Greek, Cyrillic) and what adapters.text.fold makes of each.

    Derived from the Python fold so both sides agree (Ø stays ø, Ř becomes r), and mapping
    to lower case here too, as lower() under a C collation leaves non-ASCII letters alone.
    """
    pairs = [(c, fold_text(c)) for c in map(chr, [*range(0xC0, 0x250), *range(0x370, 0x530),
                                                  *range(0x1E00, 0x1F00)])]
    pairs = [(c, f) for c, f in pairs if len(f) == 1 and f != c and c.isalpha()]
    return "".join(c for c, _ in pairs), "".join(f for _, f in pairs)


@compiles(fold, "postgresql")
def _fold_pg(element: fold, compiler: Any, **kw: Any) -> str:
    arg = compiler.process(element.clauses, **kw)  # a column: repeating it is harmless
    accented, plain = _pg_fold_table()
    # translate() with the long table is slow: only for values that are not plain ASCII
    return (f"lower(CASE WHEN octet_length({arg}) = length({arg}) THEN {arg} "
            f"ELSE translate({arg}, '{accented}', '{plain}') END)")


@compiles(fold, "mssql")
def _fold_mssql(element: fold, compiler: Any, **kw: Any) -> str:
    arg = compiler.process(element.clauses, **kw)
    return f"lower({arg} COLLATE Latin1_General_CI_AI)"


@compiles(fold)
def _fold_default(element: fold, compiler: Any, **kw: Any) -> str:
    # SQLite: a Python function registered on every connection (see _on_connect).
    return f"ccg_fold({compiler.process(element.clauses, **kw)})"


def _py_fold(value: Any) -> Any:
    # Called once per row scanned: keep it lean (fold has an ASCII fast path).
    if value is None:
        return None
    return fold_text(value if isinstance(value, str) else str(value))


# --- prepared mapping -------------------------------------------------------------------------


@dataclass(eq=False)  # compared and hashed by identity: a Chain's target is part of a shape key
class Prepared:
    source: SqlSource
    key: str
    alias_of_child: dict[str, str]
    tables: dict[str, FromClause]
    columns: dict[str, ColumnElement[Any]]
    base_from: FromClause
    base_where: list[ColumnElement[bool]]
    statements: StatementCache
    layout: Layout
    """Records are tuples: the selected top-level fields, then each child's rows (its fields,
    then the parent key) in the order the source declares its children."""
    positions: dict[str, int]
    """Position of each top-level field in a record."""
    owner: Any = None
    """The adapter that prepared it: a Chain joins only mappings on one database."""


NODE_BYTES = 4096
"""Estimated memory per criteria node of a cached statement: measured on CPython 3.11 with
SQLAlchemy 2.0, a 2,000-value ``name=`` search (8,002 nodes) held 25 MB in the statement
and 3.2 MB in its compiled form, ~3.6 KB per node."""
STATEMENT_CACHE_BYTES = 32 * 1024 * 1024
"""Default bound on the statements one mapping keeps (estimated bytes; option
``statement_cache_bytes`` of the connection)."""
STATEMENT_MAX_BYTES = 1024 * 1024
"""A statement estimated larger than this is never kept: it is built, run and dropped."""


class StatementCache:
    """Statements by criteria shape, least recently used dropped first, bounded by their
    estimated size in bytes rather than by count: one hostile shape can weigh as much as
    thousands of ordinary ones. Only statements that ran are kept (see SqlAdapter)."""

    def __init__(self, max_bytes: int = STATEMENT_CACHE_BYTES,
                 max_entry_bytes: int = STATEMENT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.bytes = 0
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def fits(self, weight: int) -> bool:
        return weight <= self.max_entry_bytes

    def put(self, key: Any, stmt: Any, weight: int) -> None:
        if not self.fits(weight) or key in self._entries:
            return
        self._entries[key] = (stmt, weight)
        self.bytes += weight
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped


SQLITE_MMAP_BYTES = 256 * 1024 * 1024
"""How much of a SQLite database file each connection maps (SQLite's own cap applies)."""


class _Timeouts(threading.local):
    deadline: float = 0.0


class SqlAdapter(Adapter):
    name = "sql"
    batches = True

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        timeout_seconds: float = 10.0,
        label: str = "sql",
        statement_cache_bytes: int = STATEMENT_CACHE_BYTES,
    ) -> None:
        self.label = label
        self.statement_cache_bytes = statement_cache_bytes
        self.timeout = timeout_seconds
        self._deadline = _Timeouts()
        # A file-backed SQLite connection cannot go stale; a network one can (pre-ping it).
        kwargs: dict[str, Any] = {"pool_pre_ping": not url.startswith("sqlite")}
        if not url.startswith("sqlite"):
            kwargs.update(pool_size=pool_size, max_overflow=0, pool_timeout=timeout_seconds)
        else:
            kwargs.update(connect_args={"check_same_thread": False, "timeout": timeout_seconds})
        try:
            self.engine: Engine = sa.create_engine(url, **kwargs)
        except (sa_exc.ArgumentError, ImportError) as exc:
            raise SourceConfigError(f"connection '{label}': {type(exc).__name__}") from exc
        self.dialect = self.engine.dialect.name
        sa.event.listen(self.engine, "connect", self._on_connect)
        self._pool_size = pool_size
        # As many threads as connections: no thread waits for a connection.
        self._workers = Workers(pool_size, f"sql-{label}")
        # Compiled forms live exactly as long as their statement (in a mapping's cache).
        self._direct: weakref.WeakKeyDictionary[Any, _Direct | None] = (
            weakref.WeakKeyDictionary())
        self._texts: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._timers: weakref.WeakKeyDictionary[Any, Callable[[float], None]] = (
            weakref.WeakKeyDictionary())
        self._reads = _KeyReads(self)
        self._dbapi_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error

    # -- connection set-up: text folding and statement timeouts per dialect

    def _on_connect(self, dbapi_conn: Any, _record: Any) -> None:
        if self.dialect == "sqlite":
            dbapi_conn.create_function("ccg_fold", 1, _py_fold, deterministic=True)
            deadline = self._deadline

            def interrupt() -> int:
                return 1 if deadline.deadline and time.monotonic() > deadline.deadline else 0

            # Checked every 10,000 VM steps (no measurable cost): a timeout stops a long scan.
            dbapi_conn.set_progress_handler(interrupt, 10_000)
            # Pages read through a memory map instead of a read() call plus a copy into each
            # connection's own page cache: a scan of PATIENTS costs ~15% less (a no-op for
            # an in-memory database). Linux keeps the map coherent with other writers.
            dbapi_conn.execute(f"PRAGMA mmap_size = {SQLITE_MMAP_BYTES}")
        elif self.dialect == "postgresql":
            cur = dbapi_conn.cursor()
            cur.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
            cur.close()
            dbapi_conn.commit()
        elif self.dialect == "mssql":
            dbapi_conn.timeout = max(1, int(self.timeout))

    # -- the interface

    def prepare(self, source: dict[str, Any], needs: Needs) -> Prepared:
        try:
            src = SqlSource.model_validate(source)
        except ValidationError as exc:
            raise source_config_error(exc) from None
        prepared = _prepare(src, needs, self.dialect)
        prepared.owner = self
        prepared.statements = StatementCache(self.statement_cache_bytes)
        return prepared

    def chains(self, prepared: Prepared, target: Any) -> bool:
        # Same adapter, same engine: the other mapping's tables are a subquery away.
        return (isinstance(target, Prepared) and target.owner is self
                and prepared.owner is self)

    def layout(self, prepared: Prepared) -> Layout:
        return prepared.layout

    def shares(self, prepared: Prepared, query: Query) -> bool:
        return _by_key(prepared, query)

    async def fetch(self, prepared: Prepared, query: Query) -> Page:
        if _by_key(prepared, query):
            return await self._reads.read(prepared, query)
        page: Page = await self._run(self._fetch_sync, prepared, query)
        return page

    async def count(self, prepared: Prepared, query: Count) -> int:
        n: int = await self._run(self._count_sync, prepared, query)
        return n

    def explain(self, prepared: Prepared, query: Query) -> list[str]:
        dialect = self.engine.dialect
        sql, params = compile_page(prepared, query, dialect)
        lines = [f"SQL ({dialect.name}): one statement per page, {len(params)} bound "
                 "value(s) (placeholders only; values never go into the text):",
                 *_indent(sql)]
        fresh = replace(prepared, statements=StatementCache())  # not the live cache
        for name, fields in prepared.layout.children:
            if not fields:
                continue
            spec = prepared.source.children[name]
            (child_col, parent_col), = spec.link.items()
            stmt = _child_statement(fresh, name, spec, fields, child_col, _BUCKETS[0])
            lines += [f"child {name}: one statement per page, the page's {parent_col} values "
                      f"bound as an IN list (sizes {', '.join(map(str, _BUCKETS))}):",
                      *_indent(str(stmt.compile(dialect=dialect)))]
        if query.with_total:
            stmt, _ = _count_statement(fresh, query.criteria, dialect.name)
            lines += ["_total=accurate: also", *_indent(str(stmt.compile(dialect=dialect)))]
        return lines

    async def estimate(self, prepared: Prepared, query: Query) -> list[str]:
        lines: list[str] = await self._run(self._estimate_sync, prepared, query)
        return lines

    def _estimate_sync(self, p: Prepared, query: Query) -> list[str]:
        """EXPLAIN (never ANALYZE: nothing runs). The values are bound as a request binds
        them, since a plan can depend on them; only the database's plan is returned."""
        dialect = self.engine.dialect
        stmt, params, _ = _page_statement(replace(p, statements=StatementCache()), query,
                                          self.dialect)
        compiled = stmt.params(params).compile(dialect=dialect,
                                               compile_kwargs={"render_postcompile": True})
        values: Any = (tuple(compiled.params[k] for k in compiled.positiontup or ())
                       if compiled.positional else dict(compiled.params))
        with self.engine.connect() as conn:
            if dialect.name == "sqlite":
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + compiled.string,
                                            values).fetchall()
                return ["SQLite's plan (it gives no cost figures; SCAN reads a whole table, "
                        "SEARCH uses an index):", *(f"    {r[-1]}" for r in rows)]
            if dialect.name == "postgresql":
                plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + compiled.string,
                                            values).scalar_one()
                if isinstance(plan, str):
                    plan = json.loads(plan)
                top = plan[0]["Plan"]
                out = [f"PostgreSQL's estimate: cost {top['Startup Cost']}..{top['Total Cost']}"
                       f", {top['Plan Rows']} row(s) (the page asks for {query.count + 1})"]
                out += [f"    {line}" for line in _plan_nodes(top)]
                return out
        return [f"(no cost estimate for {dialect.name})"]

    async def ping(self) -> None:
        await self._run(self._ping_sync)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.engine.dispose)
        # Like the engine, the adapter stays usable after close (threads start lazily).
        old, self._workers = self._workers, Workers(self._pool_size, f"sql-{self.label}")
        old.close()

    # -- running blocking work off the event loop

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work that uses ``self.engine`` (outside the mapping path: the Binary
        content reads) on this connection's workers, with its timeout and error translation."""
        return await self._run(fn, *args)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            # the caller's backstop: the database's own statement timeout should come first
            return await self._workers.run(self.timeout + 1.0, self._guarded,
                                           time.perf_counter(), fn, *args)
        except TimeoutError as exc:
            raise BackendTimeout(f"the '{self.label}' database did not answer in time") from exc

    def _guarded(self, queued: float, fn: Callable[..., Any], *args: Any) -> Any:
        hook = observe.pool_wait
        if hook is not None:  # queued behind busy connections (plus the hop to the thread)
            hook(self.label, time.perf_counter() - queued)
        self._deadline.deadline = time.monotonic() + self.timeout
        try:
            return fn(*args)
        except sa_exc.TimeoutError as exc:  # no pooled connection free in time
            raise BackendUnavailable(f"the '{self.label}' database has no free connection") from exc
        except sa_exc.DBAPIError as exc:
            raise self._translate(exc) from exc
        finally:
            self._deadline.deadline = 0.0

    def _translate(self, exc: sa_exc.DBAPIError) -> BackendError | QueryTooLarge:
        orig = exc.orig
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        text = str(orig).lower() if orig is not None else ""
        # Log the class and SQLSTATE only: driver messages can quote SQL and values.
        log.warning("sql_error", connection=self.label, error=type(orig).__name__,
                    sqlstate=sqlstate)
        if "too many sql variables" in text or "too many parameters" in text:
            # Input the database cannot take (a backstop for _check_binds): not an outage.
            return QueryTooLarge(f"the search has more values than the '{self.label}' "
                                 "database takes in one query")
        if (sqlstate or "").startswith("42") or "no such table" in text or "no such column" in text:
            # The database answered: the mapping names something it does not have.
            return BackendError(f"the '{self.label}' database does not match the mapping")
        if sqlstate == "57014" or "interrupted" in text or "timeout" in text:
            return BackendTimeout(f"the '{self.label}' database did not answer in time")
        if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
            return BackendUnavailable(f"the '{self.label}' database is not available")
        return BackendError(f"the '{self.label}' database rejected the query")

    def _ping_sync(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _bind_limit(self, conn: sa.Connection) -> int | None:
        """The most bound values one statement may carry on this database."""
        if self.dialect == "sqlite":
            dbapi_conn: Any = conn.connection.driver_connection
            limit: int = dbapi_conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            return limit
        return _BIND_LIMITS.get(self.dialect)

    def _check_binds(self, conn: sa.Connection, params: dict[str, Any]) -> None:
        # Input the database cannot take is the request's fault: found here, before the
        # database is asked (it would answer with an error that reads like an outage).
        limit = self._bind_limit(conn)
        if limit is not None and len(params) > limit:
            raise QueryTooLarge(f"the search needs {len(params)} values in one query; the "
                                f"'{self.label}' database takes at most {limit}")

    def _fetch_sync(self, p: Prepared, query: Query) -> Page:
        with self.engine.connect() as conn:
            return self._fetch_on(conn, p, query)

    async def batch(self, work: Callable[[Fetch], T]) -> T:
        result: T = await self._run(self._batch_sync, work)
        return result

    def _batch_sync(self, work: Callable[[Fetch], T]) -> T:
        with self.engine.connect() as conn:
            lost: list[BackendError] = []

            def fetch(p: Prepared, query: Query) -> Page:
                if lost:  # the connection is gone: what failed it fails the rest
                    raise lost[0]
                try:
                    return self._fetch_on(conn, p, query)
                except sa_exc.DBAPIError as exc:
                    error = self._translate(exc)
                    if isinstance(error, BackendError) and (
                            exc.connection_invalidated or not _rolled_back(conn)):
                        lost.append(error)
                    raise error from exc

            return work(fetch)

    def _fetch_on(self, conn: sa.Connection, p: Prepared, query: Query) -> Page:
        stmt, params, new = _page_statement(p, query, self.dialect)
        self._check_binds(conn, params)
        keep = new is None or p.statements.fits(new[1])
        run = conn
        if not keep:  # built for this request only: nor does SQLAlchemy keep it
            run = conn.execution_options(compiled_cache=None)
        # Records are the rows as the statement selects them (p.layout.fields, in order):
        # SQL Server's page statement is built per call (TOP n): SQLAlchemy runs it
        rows = self._rows(run, stmt, params, reused=keep and self.dialect != "mssql")
        if new is not None:  # it ran: a shape that fails is never kept
            p.statements.put(new[0], stmt, new[1])
        more = len(rows) > query.count
        rows = rows[: query.count]
        if query.backwards:
            rows.reverse()
        if rows and p.layout.children:
            rows = (self._with_children(run, p, rows) if query.children
                    else [r + ((),) * len(p.layout.children) for r in rows])
        total = None
        if query.with_total:
            total = self._count(run, p, query.criteria)
        page = Page(records=rows, more=more, total=total)
        if rows:
            at = [p.positions[k.ref] for k in query.sort]
            page.start = tuple(rows[0][i] for i in at)
            page.end = tuple(rows[-1][i] for i in at)
        return page

    def _count_sync(self, p: Prepared, query: Count) -> int:
        with self.engine.connect() as conn:
            return self._count(conn, p, query.criteria)

    def _count(self, conn: sa.Connection, p: Prepared, criteria: Criterion | None) -> int:
        stmt, params = _count_statement(p, criteria, self.dialect)  # built per call: not hot
        self._check_binds(conn, params)
        if not p.statements.fits(len(params) * NODE_BYTES):
            conn = conn.execution_options(compiled_cache=None)
        hook = observe.statement
        if hook is not None:
            # a new statement object per count: compiled here, not cached
            with hook(self.label, self.dialect, str(stmt.compile(dialect=self.engine.dialect))):
                return int(conn.execute(stmt, params).scalar_one())
        return int(conn.execute(stmt, params).scalar_one())

    def _with_children(self, conn: sa.Connection, p: Prepared, rows: list[Row]
                       ) -> list[Row]:
        """The rows, each followed by its children's rows (in p.layout.children order)."""
        keys_of: dict[str, list[Any]] = {}  # children usually share the parent key: once
        columns: list[list[Any]] = []
        for name, fields in p.layout.children:
            if not fields:  # nothing read from it: no query, no rows
                columns.append([()] * len(rows))
                continue
            spec = p.source.children[name]
            (child_col, parent_col), = spec.link.items()  # one pair (checked in _prepare)
            by_parent: dict[Any, list[Row]] = {}
            parents = keys_of.get(parent_col)
            if parents is None:
                at = p.positions[parent_col]
                parents = keys_of[parent_col] = list({r[at] for r in rows} - {None})
            for start in range(0, len(parents), _BUCKETS[-1]):
                chunk = parents[start:start + _BUCKETS[-1]]
                # IN lists of a few fixed sizes, padded with a repeat: a statement per size is
                # compiled once and reused (an expanding parameter is re-rendered every time).
                size = _BUCKET_OF[len(chunk)]
                stmt = _child_statement(p, name, spec, fields, child_col, size)
                chunk += [chunk[-1]] * (size - len(chunk))
                # a child row is the selected tuple itself: its fields, then the parent key
                for row in self._rows(conn, stmt, dict(zip(_KEY_NAMES[size], chunk, strict=True))):
                    found = by_parent.get(row[-1])
                    if found is None:
                        by_parent[row[-1]] = [row]
                    else:
                        found.append(row)
            at = p.positions[parent_col]
            columns.append([by_parent.get(r[at], ()) for r in rows])
        return list(map(tuple.__add__, rows, zip(*columns, strict=True)))

    # -- running one statement

    def _rows(self, conn: sa.Connection, stmt: Any, params: dict[str, Any],
              reused: bool = True) -> list[Row]:
        """The rows of one statement, as tuples in the order of its select list.

        A statement the adapter reuses is compiled once and run straight on the DBAPI cursor:
        SQLAlchemy's per-execution work (execution context, result metadata, row objects) is
        most of a point read's cost, and buys nothing for untyped columns. Whatever the
        direct path cannot run exactly as SQLAlchemy would (bind processors, values rendered
        into the SQL at execution, e.g. SQL Server's TOP) goes through SQLAlchemy.
        """
        hook = observe.statement
        if hook is not None:  # tracing: a span per statement, its text with placeholders
            with hook(self.label, self.dialect, self._statement_text(stmt)):
                return self._rows_timed(conn, stmt, params, reused)
        return self._rows_timed(conn, stmt, params, reused)

    def _rows_timed(self, conn: sa.Connection, stmt: Any, params: dict[str, Any],
                    reused: bool) -> list[Row]:
        timer = observe.statement_timer
        if timer is None:
            return self._rows_unobserved(conn, stmt, params, reused)
        try:
            record = self._timers[stmt]
        except KeyError:  # once per statement object: its shape id is found from its text
            record = self._timers[stmt] = timer(self.label, self.dialect,
                                                self._statement_text(stmt))
        started = time.perf_counter()
        try:
            return self._rows_unobserved(conn, stmt, params, reused)
        finally:
            record(time.perf_counter() - started)

    def _statement_text(self, stmt: Any) -> str:
        """The SQL text of a statement (placeholders, no values), compiled once per statement
        object: compiling is most of the cost of a statement's span."""
        try:
            return self._texts[stmt]
        except KeyError:  # lives as long as the statement, like its compiled direct form
            text = self._texts[stmt] = str(stmt.compile(dialect=self.engine.dialect))
            return text

    def _rows_unobserved(self, conn: sa.Connection, stmt: Any, params: dict[str, Any],
                         reused: bool) -> list[Row]:
        if not reused:
            return [tuple(r) for r in conn.execute(stmt, params)]
        try:
            direct = self._direct[stmt]
        except KeyError:
            direct = self._direct[stmt] = _Direct.compile(stmt, self.engine.dialect)
        if direct is None:
            return [tuple(r) for r in conn.execute(stmt, params)]
        dbapi_conn = conn.connection.driver_connection
        assert dbapi_conn is not None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(direct.sql, direct.arguments(params))
            out: list[Row] = cursor.fetchall()
            return out
        except self._dbapi_error as exc:
            # The same wrapper SQLAlchemy would raise, so one translation serves both paths.
            invalid = self.engine.dialect.is_disconnect(
                exc, conn.connection.dbapi_connection, cursor)  # type: ignore[arg-type]
            if invalid:
                conn.invalidate()
            raise sa_exc.DBAPIError.instance(direct.sql, None, exc, self._dbapi_error,
                                             connection_invalidated=invalid,
                                             dialect=self.engine.dialect) from exc
        finally:
            cursor.close()


def _rolled_back(conn: sa.Connection) -> bool:
    """After a failed statement in a batch: end the failed transaction (PostgreSQL refuses
    every later statement in it), as the pool does when a connection comes back. Whether the
    connection can go on."""
    try:
        if conn.in_transaction():
            conn.rollback()
        else:  # the direct path ran on the DBAPI connection, past SQLAlchemy's transaction
            dbapi_conn = conn.connection.dbapi_connection
            if dbapi_conn is not None:
                dbapi_conn.rollback()
        return True
    except Exception:  # any failure here: the batch's connection is done
        return False


@dataclass(frozen=True, slots=True)
class _Direct:
    """A statement compiled once for one dialect: its SQL text and how to lay out values."""

    sql: str
    order: tuple[str, ...] | None
    """Bind names in placeholder order (positional paramstyles), or None (named)."""
    fixed: dict[str, Any]
    """Values the mapping put into the statement itself (``where: equals``)."""

    @staticmethod
    def compile(stmt: Any, dialect: sa.Dialect) -> _Direct | None:
        compiled = stmt.compile(dialect=dialect)
        if (compiled.literal_execute_params or compiled.post_compile_params
                or compiled._bind_processors or compiled.escaped_bind_names):
            return None
        fixed: dict[str, Any] = {}
        for bind, name in compiled.bind_names.items():
            if bind.callable is not None:
                return None
            if bind.required:
                if name != bind.key:  # request values are bound by their own names only
                    return None
            else:
                fixed[name] = bind.effective_value
        order = tuple(compiled.positiontup) if compiled.positional else None
        return _Direct(compiled.string, order, fixed)

    def arguments(self, values: dict[str, Any]) -> Any:
        if self.fixed:
            values = {**self.fixed, **values}
        if self.order is None:
            return values
        return [values[name] for name in self.order]


# --- reads by key, coalesced ------------------------------------------------------------------

_MAX_KEYS = 100


def _by_key(p: Prepared, q: Query) -> bool:
    """A read (or _include) by record key: nothing but ``key IN (...)``, in key order."""
    c = q.criteria
    return (isinstance(c, In) and c.ref == p.key and 0 < len(c.values) <= q.count
            and len(c.values) <= _MAX_KEYS and q.after is None and not q.with_total
            and len(q.sort) == 1 and q.sort[0].ref == p.key and not q.sort[0].descending)


@dataclass(slots=True)
class _Waiting:
    query: Query
    future: asyncio.Future[Page]


class _KeyReads:
    """Reads by key run one statement at a time per mapping; those arriving meanwhile share
    the next one (``key IN (...)`` over all their keys), then each takes its own records.

    A lone read runs at once, as before. Under concurrent load this replaces many
    statements and thread hops with one: the FHIR server a trust puts in front of its PAS
    sends it fewer queries. Reads restricted further (a patient compartment) or paged are
    never mixed with others: only the plain key lookup qualifies.
    """

    def __init__(self, adapter: SqlAdapter) -> None:
        self.adapter = adapter
        self.busy: set[tuple[int, bool]] = set()
        self.queues: dict[tuple[int, bool], list[_Waiting]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def read(self, p: Prepared, query: Query) -> Page:
        slot = (id(p), query.children)
        if slot in self.busy:
            future: asyncio.Future[Page] = asyncio.get_running_loop().create_future()
            self.queues.setdefault(slot, []).append(_Waiting(query, future))
            return await future
        self.busy.add(slot)
        try:
            page: Page = await self.adapter._run(self.adapter._fetch_sync, p, query)
        finally:
            self._next(slot, p)
        return page

    def _next(self, slot: tuple[int, bool], p: Prepared) -> None:
        waiting = self.queues.pop(slot, [])
        waiting = [w for w in waiting if not w.future.done()]  # cancelled: client gone
        if not waiting:
            self.busy.discard(slot)
            return
        # In a context of its own: this runs for the waiting reads, not for the read that
        # finished (whose request id would otherwise label the batch's log lines).
        task = asyncio.get_running_loop().create_task(self._batch(slot, p, waiting),
                                                      context=contextvars.Context())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _batch(self, slot: tuple[int, bool], p: Prepared, waiting: list[_Waiting]
                     ) -> None:
        taken: list[_Waiting] = []
        keys: dict[Any, None] = {}
        for w in waiting:  # up to _MAX_KEYS keys; the rest wait for the next statement
            assert isinstance(w.query.criteria, In)
            if taken and len(keys) + len(w.query.criteria.values) > _MAX_KEYS:
                self.queues.setdefault(slot, []).append(w)
                continue
            taken.append(w)
            keys.update(dict.fromkeys(w.query.criteria.values))
        try:
            if len(taken) == 1:
                _settle(taken[0], await self.adapter._run(self.adapter._fetch_sync, p,
                                                          taken[0].query))
                return
            query = replace(taken[0].query, criteria=In(p.key, tuple(keys)),
                            count=sum(w.query.count for w in taken))
            page: Page = await self.adapter._run(self.adapter._fetch_sync, p, query)
            alone = _share(p, page, taken)
            for w in alone:  # rare: the database's keys did not compare equal to the asked
                _settle(w, await self.adapter._run(self.adapter._fetch_sync, p, w.query))
        except Exception as exc:
            for w in taken:
                if not w.future.done():
                    w.future.set_exception(exc)
        finally:
            for w in taken:
                if not w.future.done():  # this task was cancelled (shutdown)
                    w.future.cancel()
            self._next(slot, p)


def _settle(w: _Waiting, page: Page) -> None:
    if not w.future.done():
        w.future.set_result(page)


def _share(p: Prepared, page: Page, taken: list[_Waiting]) -> list[_Waiting]:
    """Give each read its own records (key order); return the reads that must run alone."""
    at = p.positions[p.key]
    given: set[int] = set()
    results: list[tuple[_Waiting, list[Row], bool]] = []
    for w in taken:
        assert isinstance(w.query.criteria, In)
        wanted = set(w.query.criteria.values)
        mine = [r for r in page.records if r[at] in wanted]
        results.append((w, mine[: w.query.count], len(mine) > w.query.count))
        given.update(id(r) for r in mine)
    if page.more or len(given) < len(page.records):
        return taken  # a record nobody asked for: key types differ (e.g. padded CHAR keys)
    for w, mine, more in results:  # records are read-only tuples: two reads may share one
        out = Page(records=mine, more=more)
        if mine:
            out.start = (mine[0][at],)
            out.end = (mine[-1][at],)
        _settle(w, out)
    return []


# --- building -------------------------------------------------------------------------------


def _split(ref: str, path: str) -> tuple[str, str]:
    m = _REF.match(ref)
    if not m:
        raise SourceConfigError(f"{ref!r} is not alias.COLUMN", path)
    return m.group(1), m.group(2)


def _prepare(src: SqlSource, needs: Needs, dialect: str) -> Prepared:
    aliases: dict[str, tuple[str, str | None]] = {src.alias: (src.table, None)}
    for i, j in enumerate(src.joins):
        if j.alias in aliases:
            raise SourceConfigError(f"alias {j.alias!r} used twice", f"joins[{i}].alias")
        aliases[j.alias] = (j.table, None)
    for name, c in src.children.items():
        if c.alias in aliases:
            raise SourceConfigError(f"alias {c.alias!r} used twice", f"children.{name}.alias")
        aliases[c.alias] = (c.table, name)
    tables_named = [src.table, *(j.table for j in src.joins),
                    *(c.table for c in src.children.values())]
    for name in tables_named:
        if not _NAME.match(name):
            raise SourceConfigError(f"{name!r} is not a table name", "table")

    # Every column any part of the mapping names, grouped by alias.
    wanted: dict[str, set[str]] = {a: set() for a in aliases}
    all_refs: set[str] = {needs.key, *needs.fields, *needs.criteria_refs, *needs.sort_refs}
    for j in src.joins:
        all_refs.update(j.link.keys())
        all_refs.update(j.link.values())
        all_refs.update(c.column for c in j.where)
    for c in src.children.values():
        all_refs.update(c.link.keys())
        all_refs.update(c.link.values())
        all_refs.update(c.order_by)
        all_refs.update(w.column for w in c.where)
    all_refs.update(c.column for c in src.where)
    for ref in all_refs:
        alias, col = _split(ref, ref)
        if alias not in aliases:
            raise SourceConfigError(f"{ref!r} uses an alias the source does not declare", ref)
        wanted[alias].add(col)

    tables: dict[str, FromClause] = {}
    for alias, (tname, _) in aliases.items():
        t = sa.table(tname, *(sa.column(c) for c in sorted(wanted[alias])), schema=src.schema_)
        tables[alias] = t.alias(alias)
    columns: dict[str, ColumnElement[Any]] = {
        f"{a}.{c}": tables[a].c[c] for a in wanted for c in wanted[a]
    }
    alias_of_child = {c.alias: name for name, c in src.children.items()}

    key_alias, _ = _split(needs.key, "id")
    if key_alias != src.alias:
        raise SourceConfigError("the id must be a column of the main table", "id")
    for ref in needs.sort_refs:
        if _split(ref, "sort")[0] in alias_of_child:
            raise SourceConfigError(f"cannot sort by {ref!r}: it is a child column", "sort")
    for name in needs.children:
        if name not in src.children:
            raise SourceConfigError(f"output repeats over child {name!r}, not declared", name)

    def join_cond(on: dict[str, str], path: str) -> ColumnElement[bool]:
        if not on:
            raise SourceConfigError("needs at least one column pair", path)
        return sa.and_(*(columns[a] == columns[b] for a, b in on.items()))

    base: FromClause = tables[src.alias]
    for i, j in enumerate(src.joins):
        cond = join_cond(j.link, f"joins[{i}].link")
        extra = [_condition(columns, w) for w in j.where]
        base = base.outerjoin(tables[j.alias], sa.and_(cond, *extra))
    for name, c in src.children.items():
        if len(c.link) != 1:
            raise SourceConfigError("a child links on exactly one column pair",
                                    f"children.{name}.link")
        for a, b in c.link.items():
            if _split(a, "")[0] != c.alias or _split(b, "")[0] in alias_of_child:
                raise SourceConfigError(
                    "child 'link' pairs are child.COLUMN: parent.COLUMN", f"children.{name}.link"
                )

    top = sorted(
        r for r in (needs.fields | {needs.key} | needs.sort_refs)
        if _split(r, "")[0] not in alias_of_child
    )
    # parent columns the children join on must be selected too
    for c in src.children.values():
        top.extend(b for b in c.link.values() if b not in top)
    child_fields: dict[str, list[str]] = {name: [] for name in src.children}
    for r in needs.fields:
        alias = _split(r, "")[0]
        if alias in alias_of_child:
            child_fields[alias_of_child[alias]].append(r)
    return Prepared(
        source=src,
        key=needs.key,
        alias_of_child=alias_of_child,
        tables=tables,
        columns=columns,
        base_from=base,
        base_where=[_condition(columns, w) for w in src.where],
        statements=StatementCache(),
        layout=Layout(tuple(top), tuple((name, tuple(sorted(child_fields[name])))
                                        for name in src.children)),
        positions={r: i for i, r in enumerate(top)},
    )


def _condition(columns: dict[str, ColumnElement[Any]], c: Condition) -> ColumnElement[bool]:
    col = columns[c.column]
    if c.is_null is not None:
        return col.is_(None) if c.is_null else col.is_not(None)
    if c.in_ is not None:
        return col.in_(c.in_)
    return col == c.equals


class _Binder:
    """Turns criteria into SQL with numbered bind parameters, and a reusable shape key."""

    def __init__(self, p: Prepared, dialect: str) -> None:
        self.p = p
        self.dialect = dialect
        self.values: dict[str, Any] = {}
        self.shape: list[Any] = []

    def bind(self, value: Any) -> sa.BindParameter[Any]:
        name = f"v{len(self.values)}"
        self.values[name] = value
        return sa.bindparam(name)

    def sql(self, c: Criterion) -> ColumnElement[bool]:
        if isinstance(c, And | Or):
            self.shape.append((type(c).__name__, len(c.items)))
            parts = [self.sql(i) for i in c.items]
            return sa.and_(*parts) if isinstance(c, And) else sa.or_(*parts)
        if isinstance(c, Not):
            self.shape.append("not")
            return sa.not_(self.sql(c.item))
        if isinstance(c, Nothing):
            self.shape.append("nothing")
            return sa.false()
        child = self.p.alias_of_child.get(c.ref.split(".", 1)[0])
        expr = self._leaf(c)
        if child is None:
            return expr
        # A condition on a child row: does any child row of this record match?
        spec = self.p.source.children[child]
        link = sa.and_(*(self.p.columns[a] == self.p.columns[b] for a, b in spec.link.items()))
        extra = [_condition(self.p.columns, w) for w in spec.where]
        if isinstance(c, IsNull) and c.null:
            # "Missing" on a child column: no child row holds a value -- a record without
            # any child row (no current GP registration) is missing it too.
            col = self.p.columns[c.ref]
            return ~sa.exists().where(link, *extra, col.is_not(None))
        return sa.exists().where(link, *extra, expr)

    def _leaf(self, c: Compare | In | Text | IsNull | Chain) -> ColumnElement[bool]:
        col = self.p.columns[c.ref]
        if isinstance(c, Chain):
            return self._chain(c, col)
        if isinstance(c, Compare):
            self.shape.append(("cmp", c.ref, c.op, c.numeric))
            v = self.bind(c.value)
            if c.numeric:
                col = _as_number(col, self.dialect)
            ops: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
                "=": lambda a, b: a == b, "!=": lambda a, b: a != b,
                "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
                ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
            }
            out: ColumnElement[bool] = ops[c.op](col, v)
            return out
        if isinstance(c, In):
            self.shape.append(("in", c.ref, len(c.values)))
            return col.in_([self.bind(v) for v in c.values])
        if isinstance(c, IsNull):
            self.shape.append(("null", c.ref, c.null))
            return col.is_(None) if c.null else col.is_not(None)
        self.shape.append(("text", c.ref, c.mode, c.value.isascii()))
        folded: Any = fold(col)
        v = self.bind(_like_pattern(c))
        if c.mode == "exact":
            match: ColumnElement[bool] = folded == v
        else:
            match = folded.like(v, escape="\\")
        if self.dialect != "sqlite" or not c.value.isascii():
            return match
        # SQLite calls ccg_fold (Python) once per row scanned, ~0.7 µs each: a name search
        # over 10k patients spent most of its time there. For an ASCII value and an ASCII
        # column, SQLite's own LIKE and NOCASE (ASCII case-insensitive, in C) give the same
        # answer, so only non-ASCII columns still go through the fold. (An ASCII substring
        # found in the raw column survives folding, so the shortcut never adds a match.)
        raw: ColumnElement[bool] = (sa.collate(col, "NOCASE") == v if c.mode == "exact"
                                    else col.like(v, escape="\\"))
        non_ascii = sa.func.length(sa.cast(col, sa.LargeBinary)) != sa.func.length(col)
        return sa.or_(raw, sa.and_(non_ascii, match))


    def _chain(self, c: Chain, col: ColumnElement[Any]) -> ColumnElement[bool]:
        """``col IN (SELECT target_ref FROM <target> WHERE <its criteria>)``: one statement.

        Uncorrelated, so each database runs the subquery once (SQLite builds a temporary
        index of it, PostgreSQL plans a semi-join), whatever the outer query scans: at worst
        one pass over the target's matching rows. A selective target (an NHS number) is a
        few index seeks. A correlated EXISTS was measured too: faster for a broad ``_has``
        target when the reference column is indexed (0.03 against 2.3 ms, 10,000 patients,
        SQLite), but one probe per outer row, which without an index on the reference
        column (GP_REGISTRATIONS.PROCA_REFNO) is a scan per row: not a risk worth taking.
        Values are bound in the order _collect lists them (the target's criteria inline).
        """
        t: Prepared = c.target
        self.shape.append(("chain", c.ref, t, c.target_ref, c.criteria is None))
        sub = _Binder(t, self.dialect)
        sub.values, sub.shape = self.values, self.shape  # one numbering, one shape
        tcol = t.columns[c.target_ref]
        froms: list[FromClause] = [t.base_from]
        conds: list[ColumnElement[bool]] = [*t.base_where, tcol.is_not(None)]
        child = t.alias_of_child.get(c.target_ref.split(".", 1)[0])
        if child is not None:  # the reference sits in a child row (Patient's GP registration)
            spec = t.source.children[child]
            froms.append(t.tables[spec.alias])
            conds += [t.columns[a] == t.columns[b] for a, b in spec.link.items()]
            conds += [_condition(t.columns, w) for w in spec.where]
        if c.criteria is not None:
            conds.append(sub.sql(c.criteria))
        # never correlated with the outer query, even when both read the same table
        subquery = sa.select(tcol).select_from(*froms).where(*conds).correlate(None)
        return sa.and_(col.is_not(None), col.in_(subquery))


def _keyset(
    b: _Binder, p: Prepared, query: Query, dialect: str
) -> tuple[list[ColumnElement[Any]], ColumnElement[bool] | None]:
    """ORDER BY terms, and the seek condition for ``query.after`` (NULLs sort lowest)."""
    order: list[ColumnElement[Any]] = []
    for k in query.sort:
        col = p.columns[k.ref]
        desc = k.descending != query.backwards
        term = col.desc() if desc else col.asc()
        if dialect == "postgresql":  # the others already put NULLs lowest
            term = term.nulls_last() if desc else term.nulls_first()
        order.append(term)
    if query.after is None:
        return order, None
    if len(query.after) != len(query.sort):
        raise BackendError("a paging position does not fit this search")
    ors: list[ColumnElement[bool]] = []
    eqs: list[ColumnElement[bool]] = []
    for k, v in zip(query.sort, query.after, strict=True):
        col = p.columns[k.ref]
        forward = k.descending == query.backwards  # moving towards larger values?
        if forward:
            beyond = col.is_not(None) if v is None else col > b.bind(v)
        else:
            beyond = sa.false() if v is None else sa.or_(col < b.bind(v), col.is_(None))
        ors.append(sa.and_(*eqs, beyond))
        eqs.append(col.is_(None) if v is None else col == b.bind(v))
        b.shape.append(("after", v is None))
    return order, sa.or_(*ors)


def _collect(c: Criterion, shape: list[Any], values: list[Any]) -> None:
    """The shape and bound values of a criteria tree, in the order _Binder binds them.

    Cheap pure Python: a cached statement is found from the shape without building SQL.
    """
    if isinstance(c, And | Or):
        shape.append((type(c).__name__, len(c.items)))
        for i in c.items:
            _collect(i, shape, values)
    elif isinstance(c, Not):
        shape.append("not")
        _collect(c.item, shape, values)
    elif isinstance(c, Nothing):
        shape.append("nothing")
    elif isinstance(c, Compare):
        shape.append(("cmp", c.ref, c.op, c.numeric))
        values.append(c.value)
    elif isinstance(c, In):
        shape.append(("in", c.ref, len(c.values)))
        values.extend(c.values)
    elif isinstance(c, IsNull):
        shape.append(("null", c.ref, c.null))
    elif isinstance(c, Chain):
        shape.append(("chain", c.ref, c.target, c.target_ref, c.criteria is None))
        if c.criteria is not None:
            _collect(c.criteria, shape, values)
    else:
        shape.append(("text", c.ref, c.mode, c.value.isascii()))
        values.append(_like_pattern(c))


_NUMBER_SQL = r"^\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$"


def _as_number(col: ColumnElement[Any], dialect: str) -> ColumnElement[Any]:
    """A column as a number, NULL where it holds no number (legacy results are text): never
    an error for a stray value (PostgreSQL evaluates the CASE before the cast)."""
    if dialect == "postgresql":
        text = sa.cast(col, sa.Text)
        return sa.case((text.regexp_match(_NUMBER_SQL), sa.cast(text, sa.Float)), else_=None)
    if dialect == "sqlite":
        trimmed: ColumnElement[Any] = sa.func.trim(sa.cast(col, sa.Text))
        return sa.case((sa.and_(trimmed != "", trimmed.op("NOT GLOB")("*[^0-9.eE+-]*"),
                                trimmed.op("GLOB")("*[0-9]*")), sa.cast(trimmed, sa.Float)),
                       else_=None)
    return sa.cast(col, sa.Float)


def _like_pattern(c: Text) -> str:
    if c.mode == "exact":
        return c.value
    pattern = c.value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return pattern + "%" if c.mode == "prefix" else "%" + pattern + "%"


def _page_statement(p: Prepared, query: Query, dialect: str
                    ) -> tuple[Any, dict[str, Any], tuple[Any, int] | None]:
    """The statement, its bound values, and (key, estimated bytes) when it was built now
    (the caller keeps it once it has run)."""
    shape: list[Any] = []
    values: list[Any] = []
    if query.criteria is not None:
        _collect(query.criteria, shape, values)
    if query.after is not None:
        if len(query.after) != len(query.sort):
            raise BackendError("a paging position does not fit this search")
        for v in query.after:
            shape.append(("after", v is None))
            if v is not None:
                values += [v, v]  # "beyond" then "equal", as _keyset binds them
    values.append(query.count + 1)
    key = (tuple(shape), query.sort, query.backwards)
    stmt = p.statements.get(key)
    new: tuple[Any, int] | None = None
    if stmt is None:
        b = _Binder(p, dialect)
        where = [b.sql(query.criteria)] if query.criteria is not None else []
        order, seek = _keyset(b, p, query, dialect)
        limit = b.bind(query.count + 1)
        cols = [p.columns[r].label(r) for r in p.layout.fields]
        stmt = sa.select(*cols).select_from(p.base_from)
        conds = [*p.base_where, *where]
        if seek is not None:
            conds.append(seek)
        if conds:
            stmt = stmt.where(*conds)
        stmt = stmt.order_by(*order).limit(limit)
        if list(b.values.values()) != values:  # the two walks must agree, or binds are wrong
            raise BackendError("internal error: statement parameters out of step")
        new = (key, (len(shape) + 1) * NODE_BYTES)
    if dialect == "mssql":  # TOP n needs a literal n; a bound limit becomes a ROW_NUMBER() query
        stmt = stmt.limit(query.count + 1)
    return stmt, {f"v{i}": v for i, v in enumerate(values)}, new


def _plan_nodes(node: dict[str, Any], depth: int = 0) -> list[str]:
    """A PostgreSQL JSON plan as indented node lines: type, relation/index, cost, rows."""
    what = node["Node Type"]
    if node.get("Index Name"):
        what += f" using {node['Index Name']}"
    if node.get("Relation Name"):
        what += f" on {node['Relation Name']}"
    lines = ["  " * depth + f"{what} (cost {node['Total Cost']}, rows {node['Plan Rows']})"]
    for child in node.get("Plans", []):
        lines += _plan_nodes(child, depth + 1)
    return lines


def _indent(sql: str) -> list[str]:
    return ["    " + line for line in sql.splitlines()]


def compile_page(p: Prepared, query: Query, dialect: sa.Dialect) -> tuple[str, dict[str, Any]]:
    """The SQL text and bound values of one page query as ``dialect`` would run it.

    For reviewing what a mapping sends to a database (e.g. T-SQL, with no server at hand).
    Request values are only ever among the bound values, never in the text.
    """
    # a private statement cache: the mapping's own holds statements built for its database
    stmt, params, _ = _page_statement(replace(p, statements=StatementCache()), query,
                                      dialect.name)
    compiled = stmt.params(params).compile(dialect=dialect,
                                           compile_kwargs={"render_postcompile": True})
    return compiled.string, {k: v for k, v in params.items() if k in compiled.binds}


def _count_statement(p: Prepared, criteria: Criterion | None, dialect: str
                     ) -> tuple[Any, dict[str, Any]]:
    b = _Binder(p, dialect)
    conds = [*p.base_where]
    if criteria is not None:
        conds.append(b.sql(criteria))
    stmt = sa.select(sa.func.count()).select_from(p.base_from)
    if conds:
        stmt = stmt.where(*conds)
    return stmt, b.values


def _child_statement(p: Prepared, name: str, spec: Child, fields: tuple[str, ...], child_col: str,
                     size: int) -> Any:
    stmt = p.statements.get(("child", name, size))
    if stmt is None:
        cols = [*(p.columns[f].label(f) for f in fields), p.columns[child_col].label("@parent")]
        stmt = (
            sa.select(*cols)
            .where(
                p.columns[child_col].in_([sa.bindparam(f"k{i}") for i in range(size)]),
                *(_condition(p.columns, w) for w in spec.where),
            )
            .order_by(p.columns[child_col], *(p.columns[o] for o in spec.order_by))
        )
        p.statements.put(("child", name, size), stmt, (size + 4) * NODE_BYTES)
    return stmt


_BIND_LIMITS = {"postgresql": 65_535, "mssql": 2_100}  # protocol / server limits
"""SQLite's is read from the connection (its build decides: 999 before 3.32, 32,766 after)."""

_BUCKETS = (1, 2, 5, 10, 21, 50, 101, 200, 500)
_BUCKET_OF = [0, *(next(b for b in _BUCKETS if b >= n) for n in range(1, _BUCKETS[-1] + 1))]
_KEY_NAMES = {size: tuple(f"k{i}" for i in range(size)) for size in _BUCKETS}
