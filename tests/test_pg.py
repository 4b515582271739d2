"""The test-suite PostgreSQL server (tests/pg.py) really works."""

from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa

from tests.pg import TempPostgres, require_pg_bin

pytestmark = pytest.mark.postgres


def test_server_roundtrip_with_uppercase_quoted_table(postgres_server: TempPostgres) -> None:
    url = postgres_server.create_database("pg_selftest")
    assert url == f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server.port}/pg_selftest"

    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text('CREATE TABLE "PATIENT" ("ID" int PRIMARY KEY, "NHS_NO" text)'))
            conn.execute(
                sa.text('INSERT INTO "PATIENT" ("ID", "NHS_NO") VALUES (:id, :nhs)'),
                [{"id": 1, "nhs": "9434765919"}, {"id": 2, "nhs": "9434765870"}],
            )
        with engine.connect() as conn:
            rows = conn.execute(sa.text('SELECT "ID", "NHS_NO" FROM "PATIENT" ORDER BY "ID"')).all()
            assert [tuple(r) for r in rows] == [(1, "9434765919"), (2, "9434765870")]
            # the name really is upper case in the catalog (quoted identifier)...
            names = (
                conn.execute(
                    sa.text(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = 'public'"
                    )
                )
                .scalars()
                .all()
            )
            assert names == ["PATIENT"]
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "pg_selftest"
            assert conn.execute(sa.text("SHOW server_encoding")).scalar() == "UTF8"
            assert conn.execute(sa.text("SHOW fsync")).scalar() == "off"
            # ...so the unquoted (folded to lower case) name does not resolve
            with pytest.raises(sa.exc.ProgrammingError):
                conn.execute(sa.text("SELECT * FROM PATIENT"))
        # reflection via SQLAlchemy sees the same table
        table = sa.Table("PATIENT", sa.MetaData(), autoload_with=engine)
        assert [c.name for c in table.columns] == ["ID", "NHS_NO"]
    finally:
        engine.dispose()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_server_is_stopped_and_removed_after_context_exit() -> None:
    with TempPostgres(require_pg_bin()) as pg:
        port, base_dir = pg.port, pg.base_dir
        assert port is not None and base_dir is not None
        assert _port_open(port)
        assert (base_dir / "data" / "PG_VERSION").exists()
    assert not _port_open(port)
    assert not base_dir.exists()
