"""The embedded demo PAS: a legacy-style patient administration database with synthetic data.

`ensure_sqlite_demo()` gives the gateway something real to talk to on first start;
`build_database()` loads the same rows into any SQLAlchemy URL (SQLite, PostgreSQL, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    Connection,
    Index,
    Table,
    create_engine,
    event,
    inspect,
    literal,
    select,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.schema import CreateTable

# Import names, not the `generate` function: binding it here would shadow the submodule.
from gateway.demo_pas import (
    epr_clinical,  # registers the EPR tables on metadata
    epr_documents,  # registers the document store's tables
)
from gateway.demo_pas.epr_medres import with_medication_and_results
from gateway.demo_pas.generate import FIXTURE_PATIENTS, DemoPasGenerator
from gateway.demo_pas.schema import metadata

__all__ = ["FIXTURE_PATIENTS", "DemoDatabaseNotEmpty", "build_database", "demo_documents_dir",
           "demo_file_name", "ensure_sqlite_demo", "metadata", "schema_fingerprint"]

DEFAULT_SEED = 20261123
_SQLITE = sqlite.dialect()


class DemoDatabaseNotEmpty(RuntimeError):
    """The target already holds demo PAS rows; refusing to load a second copy."""


def _sqlite_bulk_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # A build is all-or-nothing (ensure_sqlite_demo renames only a finished file), so the
    # rollback journal and fsyncs buy nothing and cost most of the load time.
    cur = dbapi_conn.cursor()
    for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=MEMORY",
                   "cache_size=-262144"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def _create_schema(conn: Connection) -> list[Index]:
    """Create missing tables; return the indexes to build after loading (faster in bulk)."""
    existing = set(inspect(conn).get_table_names())
    for table in metadata.sorted_tables:
        if table.name in existing and conn.execute(
                select(literal(1)).select_from(table).limit(1)).first() is not None:
            raise DemoDatabaseNotEmpty(f"table {table.name} already contains rows")
    deferred: list[Index] = []
    for table in metadata.sorted_tables:
        if table.name not in existing:
            conn.execute(CreateTable(table))
            deferred.extend(table.indexes)
    return deferred


def build_database(url: str, patients: int = 10_000, seed: int = DEFAULT_SEED,
                   progress: bool = False, documents_dir: pathlib.Path | None = None) -> None:
    """Create the demo PAS tables at `url` and load `patients` synthetic patients.

    Deterministic: the same seed and scale give identical rows on every database (and the same
    document files, written under `documents_dir` when given; the rows name them either way).
    Raises DemoDatabaseNotEmpty if any demo table already has rows.
    """
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_bulk_pragmas)
    try:
        with engine.begin() as conn, _progress(progress, patients) as advance:
            deferred = _create_schema(conn)
            batches = DemoPasGenerator(patients, seed).batches()
            batches = epr_clinical.extend(batches, seed)
            batches = epr_documents.extend(batches, seed, documents_dir)
            for batch in with_medication_and_results(batches, seed):
                _insert(conn, batch.table, batch.rows)
                advance(batch.patients_done, None)
            advance(patients, "Indexing demo PAS")  # ~10% of a large build: say so
            for index in deferred:
                index.create(conn)
            # Planner statistics, as a DBA would keep them: without them SQLite sorts every
            # match of a broad search by key instead of walking the key (1 s vs 0.4 ms at 1M).
            conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


def schema_fingerprint() -> str:
    """A short hash of the demo tables' DDL: it changes whenever a table or column does."""
    ddl = "\n".join(str(CreateTable(t).compile(dialect=_SQLITE)).strip()
                    for t in sorted(metadata.sorted_tables, key=lambda t: t.name))
    return hashlib.sha256(ddl.encode()).hexdigest()[:10]


def demo_file_name(patients: int) -> str:
    """The cached demo database's file name: a new schema gets a new file, so an upgraded
    gateway builds the new tables instead of serving an old file that lacks them."""
    return f"demo-pas-{patients}-{schema_fingerprint()}.sqlite"


def _insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """``conn.execute(table.insert(), rows)`` without SQLAlchemy's per-row parameter work.

    That work (~20 µs a row) cost more than the database's own insert once the EPR tables
    came; the compiled statement goes to the driver's executemany instead. The demo tables
    hold only String, CHAR and Integer columns, which no dialect converts on the way in, and
    one LargeBinary (DOCUMENT_BLOBS.CONTENT) whose rows are already ``bytes``, which sqlite3
    stores as a BLOB and psycopg sends as bytea unconverted (tests/gateway/demo_pas).
    """
    compiled = table.insert().compile(dialect=conn.dialect, column_keys=list(rows[0]))
    if compiled.positional:
        values = itemgetter(*(compiled.positiontup or ()))  # every table has 2+ columns
        conn.exec_driver_sql(compiled.string, [values(row) for row in rows])
    else:
        conn.exec_driver_sql(compiled.string, rows)


Advance = Callable[[int, str | None], None]


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Advance]:
    """Yield `advance(patients_done, new_description)`; draws a rich bar on stderr if enabled."""
    if not enabled:
        yield lambda _done, _description: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("Building demo PAS (patients)", total=total)
        yield lambda done, description: bar.update(task, completed=done,
                                                   description=description)


def demo_documents_dir(path: pathlib.Path) -> pathlib.Path:
    """The document root of the SQLite demo at `path`: its file-stored documents."""
    return pathlib.Path(path).with_suffix(".documents")


def ensure_sqlite_demo(path: pathlib.Path, patients: int = 10_000,
                       progress: bool = True) -> pathlib.Path:
    """Return `path`, first building the SQLite demo PAS there if the file does not exist.

    The build goes to `path.with_suffix('.tmp')` (documents to `.documents.tmp`) and is renamed
    into place only when complete, so a first start that is killed half-way leaves no
    half-built database behind. The documents directory is renamed first: a database file
    present means its documents are too.
    """
    path = pathlib.Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    docs = demo_documents_dir(path)
    docs_tmp = docs.with_name(docs.name + ".tmp")
    tmp.unlink(missing_ok=True)  # leftovers of an interrupted build
    shutil.rmtree(docs_tmp, ignore_errors=True)
    try:
        build_database(f"sqlite:///{tmp.resolve()}", patients=patients, progress=progress,
                       documents_dir=docs_tmp)
        shutil.rmtree(docs, ignore_errors=True)
        os.replace(docs_tmp, docs)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(docs_tmp, ignore_errors=True)
        raise
    return path
