"""The SQL adapter's Chain criterion: another mapping's records, as a subquery of one statement.

Two mappings over the test tables of test_sql.py — ITEMS (with its TAGS as a child) and TAGS
on their own, each tag referring to its item — on SQLite and PostgreSQL. Expected answers
come from the rows in plain Python.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.dialects import mssql

from adapters.base import (
    Chain,
    Compare,
    Count,
    Criterion,
    Needs,
    Not,
    Query,
    SortKey,
    Text,
)
from adapters.sql import Prepared, SqlAdapter, compile_page
from tests.adapters import test_sql
from tests.adapters.test_sql import ITEMS_NEEDS, ITEMS_SOURCE, TAG_ROWS, _load
from tests.pg import TempPostgres

pytestmark = pytest.mark.anyio

ITEM_ROWS: list[dict[str, Any]] = test_sql.ITEM_ROWS
TAGS_SOURCE: dict[str, Any] = {"connection": "test", "table": "TAGS", "alias": "x"}
TAGS_NEEDS = Needs(key="x.TAG_ID", fields=frozenset({"x.TAG_ID", "x.ITEM_ID", "x.LABEL"}),
                   children=frozenset(),
                   criteria_refs=frozenset({"x.ITEM_ID", "x.LABEL", "x.POS"}))


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('chain') / 'tables.sqlite'}"
    _load(url)
    return url


@pytest.fixture(scope="module")
def pg_url(postgres_server: TempPostgres) -> str:
    url = postgres_server.create_database(f"tests_sql_chain_{uuid.uuid4().hex[:8]}")
    _load(url)
    return url


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def url(request: pytest.FixtureRequest) -> str:
    value: str = request.getfixturevalue(f"{request.param}_url")
    return value


@pytest.fixture
async def adapter(url: str) -> AsyncIterator[SqlAdapter]:
    a = SqlAdapter(url, timeout_seconds=5, label="test")
    yield a
    await a.aclose()


def _both(a: SqlAdapter) -> tuple[Prepared, Prepared]:
    return a.prepare(ITEMS_SOURCE, ITEMS_NEEDS), a.prepare(TAGS_SOURCE, TAGS_NEEDS)


async def _keys(a: SqlAdapter, p: Prepared, criteria: Criterion, count: int = 500) -> list[Any]:
    out: list[Any] = []
    after = None
    while True:  # walk every page: the chain must hold across keyset positions
        page = await a.fetch(p, Query(criteria, (SortKey(p.key),), count, after=after,
                                      children=False))
        out += [r[p.positions[p.key]] for r in page.records]
        if not page.more:
            return out
        after = page.end


async def test_forward_chain(adapter: SqlAdapter) -> None:
    """Tags whose item scores at least 3."""
    items_p, tags_p = _both(adapter)
    high = {r["ID"] for r in ITEM_ROWS if r["SCORE"] is not None and r["SCORE"] >= 3}
    expected = sorted(t["TAG_ID"] for t in TAG_ROWS if t["ITEM_ID"] in high)
    assert expected
    chain = Chain("x.ITEM_ID", items_p, "t.ID", Compare("t.SCORE", ">=", 3))
    assert await _keys(adapter, tags_p, chain) == expected
    assert await _keys(adapter, tags_p, chain, count=4) == expected
    assert await adapter.count(tags_p, Count(chain)) == len(expected)


async def test_reverse_chain_and_the_targets_child(adapter: SqlAdapter) -> None:
    """Items some tag refers to with this label; and tags whose item has an active tag so
    labelled (the target's criteria on its own child table, inside the subquery)."""
    items_p, tags_p = _both(adapter)
    labelled = {t["ITEM_ID"] for t in TAG_ROWS if t["LABEL"] == "RED-2"}
    assert labelled
    has = Chain("t.ID", tags_p, "x.ITEM_ID", Compare("x.LABEL", "=", "RED-2"))
    assert await _keys(adapter, items_p, has) == sorted(labelled)
    # GONE tags are inactive: the items mapping's child (ACTIVE = Y) never holds one
    assert any(t["LABEL"].startswith("GONE") for t in TAG_ROWS)
    into_child = Chain("x.ITEM_ID", items_p, "t.ID", Text("g.LABEL", "prefix", "gone"))
    assert await _keys(adapter, tags_p, into_child) == []
    # RED-3#<item> only on odd items: tags (any, also inactive) of items holding one
    odd = {t["ITEM_ID"] for t in TAG_ROWS if t["LABEL"].startswith("RED-3#")}
    into_child = Chain("x.ITEM_ID", items_p, "t.ID", Text("g.LABEL", "prefix", "red-3#"))
    assert odd and await _keys(adapter, tags_p, into_child) == sorted(
        t["TAG_ID"] for t in TAG_ROWS if t["ITEM_ID"] in odd)


async def test_not_chain_is_two_valued(adapter: SqlAdapter) -> None:
    items_p, tags_p = _both(adapter)
    labelled = {t["ITEM_ID"] for t in TAG_ROWS if t["LABEL"] == "BLUE-1"}
    has = Chain("t.ID", tags_p, "x.ITEM_ID", Compare("x.LABEL", "=", "BLUE-1"))
    assert await _keys(adapter, items_p, Not(has)) == sorted(
        r["ID"] for r in ITEM_ROWS if r["ID"] not in labelled)
    # an empty reference matches no record, so NOT matches it (not unknown): the scores
    # that are the position of some RED-2 tag (2), and everything else including no score
    twos = Chain("t.SCORE", tags_p, "x.POS", Compare("x.LABEL", "=", "RED-2"))
    assert await _keys(adapter, items_p, twos) == sorted(
        r["ID"] for r in ITEM_ROWS if r["SCORE"] == 2)
    assert await _keys(adapter, items_p, Not(twos)) == sorted(
        r["ID"] for r in ITEM_ROWS if r["SCORE"] != 2)
    assert any(r["SCORE"] is None for r in ITEM_ROWS)


async def test_statement_reused_per_shape_values_bound(adapter: SqlAdapter) -> None:
    items_p, tags_p = _both(adapter)
    kept = None
    for score in (1, 2, 3, 4):
        chain = Chain("x.ITEM_ID", items_p, "t.ID", Compare("t.SCORE", "=", score))
        ids = {r["ID"] for r in ITEM_ROWS if r["SCORE"] == score}
        assert await _keys(adapter, tags_p, chain) == sorted(
            t["TAG_ID"] for t in TAG_ROWS if t["ITEM_ID"] in ids)
        kept = kept if kept is not None else len(tags_p.statements)
        assert len(tags_p.statements) == kept  # one statement, values bound
    assert kept == 1
    # the other mapping's identity is part of the shape: another target, another statement
    other_items = adapter.prepare(ITEMS_SOURCE, ITEMS_NEEDS)
    chain = Chain("x.ITEM_ID", other_items, "t.ID", Compare("t.SCORE", "=", 1))
    await _keys(adapter, tags_p, chain)
    assert len(tags_p.statements) == 2


async def test_chains_only_within_one_adapter(adapter: SqlAdapter, url: str) -> None:
    items_p, tags_p = _both(adapter)
    assert adapter.chains(tags_p, items_p) and adapter.chains(items_p, items_p)
    other = SqlAdapter(url, timeout_seconds=5, label="other")
    try:
        elsewhere = other.prepare(ITEMS_SOURCE, ITEMS_NEEDS)
        assert not adapter.chains(tags_p, elsewhere) and not other.chains(elsewhere, tags_p)
        assert not adapter.chains(tags_p, object())
    finally:
        await other.aclose()


def test_sql_server_text_binds_the_chains_values(sqlite_url: str) -> None:
    a = SqlAdapter(sqlite_url)
    try:
        items_p, tags_p = _both(a)
        chain = Chain("x.ITEM_ID", items_p, "t.ID", Text("t.NAME", "exact", "'; DROP --"))
        sql, params = compile_page(tags_p, Query(chain, (SortKey("x.TAG_ID"),), 5),
                                   mssql.pyodbc.dialect(paramstyle="qmark"))  # type: ignore[no-untyped-call]
        assert "DROP" not in sql and "'; DROP --" in params.values()
        assert "IN (SELECT t.[ID]" in sql and "FROM [ITEMS] AS t" in sql
    finally:
        a.engine.dispose()

