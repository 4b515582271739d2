"""The SQL adapter on its own: keyset paging, children, EXISTS, bound values, timeouts, outages.

Runs against small tables of its own, in a temporary SQLite file and in the suite's real
PostgreSQL server; SQL Server statements are compiled with SQLAlchemy's mssql dialect.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql
from starlette.applications import Starlette

from adapters.base import (
    And,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Compare,
    Count,
    Criterion,
    In,
    IsNull,
    Needs,
    Not,
    Or,
    Page,
    Query,
    SortKey,
    SourceConfigError,
    Text,
)
from adapters.sql import Prepared, SqlAdapter, compile_page
from adapters.text import fold
from tests.pg import TempPostgres

pytestmark = pytest.mark.anyio

# --- test tables -----------------------------------------------------------------------------

meta = sa.MetaData()
items = sa.Table(
    "ITEMS", meta,
    sa.Column("ID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("NAME", sa.String(40)),
    sa.Column("SCORE", sa.Integer),
)
tags = sa.Table(
    "TAGS", meta,
    sa.Column("TAG_ID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("ITEM_ID", sa.Integer, nullable=False),
    sa.Column("POS", sa.Integer, nullable=False),
    sa.Column("LABEL", sa.String(40), nullable=False),
    sa.Column("ACTIVE", sa.String(1), nullable=False),
)
patients = sa.Table(
    "PATIENTS", meta,
    sa.Column("PATNT_REFNO", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("SURNAME", sa.String(80), nullable=False),
)
big = sa.Table(
    "BIG", meta,
    sa.Column("ID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("K", sa.Integer, nullable=False),
    sa.Column("NAME", sa.String(20), nullable=False),
)

NAMES = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO"]
ITEM_ROWS = [
    {"ID": i,
     "NAME": None if i % 7 == 0 else NAMES[i % 5],
     "SCORE": None if i % 4 == 0 else (i * 7) % 5}
    for i in range(1, 41)
]
TAG_ROWS: list[dict[str, Any]] = []
for _item in range(1, 41, 3):  # every third item has tags, inserted out of order
    for _pos, _label in [(3, "RED-3"), (1, "BLUE-1"), (2, "RED-2"), (0, "GONE-0")]:
        TAG_ROWS.append({"TAG_ID": len(TAG_ROWS) + 1, "ITEM_ID": _item, "POS": _pos,
                         "LABEL": f"{_label}#{_item}" if _item % 2 else _label,
                         "ACTIVE": "N" if _label.startswith("GONE") else "Y"})

HOSTILE = [
    "'; DROP TABLE PATIENTS; --",
    "Robert'); DROP TABLE PATIENTS;--",
    "O'BRIEN",
    "100%",
    "%",
    "_",
    "_UNDERSCORE",
    "A_B",
    "AXB",
    "AB",
    "BACK\\SLASH",
    "BACKSLASH",
    "BACK\\\\DOUBLE",
    "ZOË",
    "ZOE",
    "ÅNGSTRÖM",
    "李",
    "SMITH\" OR \"1\"=\"1",
    "X' OR '1'='1",
]
# names whose letters lie outside ASCII and Latin-1: PostgreSQL must fold them as Python does
INTERNATIONAL = ["SØRENSEN", "DVOŘÁK", "ŁUKASZEWSKI", "ŞAHIN", "NGUYỄN", "ŽIŽEK", "ĐORĐEVIĆ",
                 "MÜLLER", "ÇELIK", "ÆBELØ", "ИВАНОВ", "ΠΑΠΑΔΌΠΟΥΛΟΥ"]
PATIENT_ROWS = [{"PATNT_REFNO": i + 1, "SURNAME": s}
                for i, s in enumerate([*HOSTILE, *INTERNATIONAL])]


def _load(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            meta.create_all(conn)
            conn.execute(items.insert(), ITEM_ROWS)
            conn.execute(tags.insert(), TAG_ROWS)
            conn.execute(patients.insert(), PATIENT_ROWS)
            conn.execute(big.insert(), [{"ID": i, "K": 1, "NAME": f"N{i}"} for i in range(300)])
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('adapter') / 'tables.sqlite'}"
    _load(url)
    return url


@pytest.fixture(scope="module")
def pg_url(postgres_server: TempPostgres) -> str:
    # unique: pytest may set this module fixture up again when it reorders parametrised tests
    url = postgres_server.create_database(f"tests_adapters_sql_{uuid.uuid4().hex[:8]}")
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


ITEMS_SOURCE: dict[str, Any] = {
    "connection": "test", "table": "ITEMS", "alias": "t",
    "children": {"tags": {"table": "TAGS", "alias": "g", "link": {"g.ITEM_ID": "t.ID"},
                          "order_by": ["g.POS"],
                          "where": [{"column": "g.ACTIVE", "equals": "Y"}]}},
}
ITEMS_NEEDS = Needs(
    key="t.ID",
    fields=frozenset({"t.ID", "t.NAME", "t.SCORE", "g.LABEL", "g.POS"}),
    children=frozenset({"tags"}),
    criteria_refs=frozenset({"t.NAME", "t.SCORE", "g.LABEL"}),
    sort_refs=frozenset({"t.NAME", "t.SCORE"}),
)
PATIENTS_SOURCE: dict[str, Any] = {"connection": "test", "table": "PATIENTS", "alias": "p"}
PATIENTS_NEEDS = Needs(key="p.PATNT_REFNO", fields=frozenset({"p.PATNT_REFNO", "p.SURNAME"}),
                       children=frozenset(), criteria_refs=frozenset({"p.SURNAME"}),
                       sort_refs=frozenset({"p.SURNAME"}))


def _d(p: Prepared, page: Page) -> Page:
    """The page with its records in the dict form (the adapter returns tuples)."""
    page.records = [p.layout.as_dict(r) for r in page.records]
    return page


def prepared_items(a: SqlAdapter) -> Prepared:
    return a.prepare(ITEMS_SOURCE, ITEMS_NEEDS)


# --- keyset paging ---------------------------------------------------------------------------


def oracle_order(rows: list[dict[str, Any]], sort: tuple[SortKey, ...]) -> list[int]:
    """NULLs lowest: first ascending, last descending (the adapter's documented order)."""
    out = list(rows)
    for k in reversed(sort):
        column = k.ref.split(".")[1]

        def nulls_lowest(r: dict[str, Any], c: str = column) -> tuple[bool, Any]:
            return (r[c] is not None, r[c] if r[c] is not None else 0)

        out.sort(key=nulls_lowest, reverse=k.descending)
    return [r["ID"] for r in out]


def oracle_match(row: dict[str, Any], c: Criterion | None) -> bool:
    if c is None:
        return True
    if isinstance(c, Or):
        return any(oracle_match(row, i) for i in c.items)
    if isinstance(c, And):
        return all(oracle_match(row, i) for i in c.items)
    if isinstance(c, IsNull):
        return (row[c.ref.split(".")[1]] is None) == c.null
    if isinstance(c, Compare):
        v = row[c.ref.split(".")[1]]
        assert c.op in (">=", "<")
        return v is not None and (v >= c.value if c.op == ">=" else v < c.value)
    raise AssertionError(c)


SORTS = {
    "score": (SortKey("t.SCORE"), SortKey("t.ID")),
    "-score": (SortKey("t.SCORE", True), SortKey("t.ID")),
    "name,-score": (SortKey("t.NAME"), SortKey("t.SCORE", True), SortKey("t.ID")),
    "-name,score": (SortKey("t.NAME", True), SortKey("t.SCORE"), SortKey("t.ID")),
    "-name,-score,-id": (SortKey("t.NAME", True), SortKey("t.SCORE", True),
                         SortKey("t.ID", True)),
}
FILTERS: dict[str, Criterion | None] = {
    "all": None,
    "null-or-high": Or((IsNull("t.SCORE"), Compare("t.SCORE", ">=", 3))),
    "low": Compare("t.SCORE", "<", 2),
}


@pytest.mark.parametrize("count", [3, 7])
@pytest.mark.parametrize("filter_name", list(FILTERS))
@pytest.mark.parametrize("sort_name", list(SORTS))
async def test_keyset_paging_with_nulls(adapter: SqlAdapter, sort_name: str, filter_name: str,
                                        count: int) -> None:
    sort = SORTS[sort_name]
    criteria = FILTERS[filter_name]
    expected = oracle_order([r for r in ITEM_ROWS if oracle_match(r, criteria)], sort)
    assert any(r["SCORE"] is None for r in ITEM_ROWS if r["ID"] in expected) or \
        filter_name == "low"
    p = prepared_items(adapter)

    pages: list[list[int]] = []
    ends: list[Any] = []
    after = None
    while True:
        page = _d(p, await adapter.fetch(p, Query(criteria, sort, count, after=after)))
        pages.append([r["t.ID"] for r in page.records])
        ends.append(page)
        if not page.more:
            break
        after = page.end
        assert len(pages) < 50
    assert [i for pg in pages for i in pg] == expected
    assert all(len(pg) == count for pg in pages[:-1])
    # page positions are the sort values of the first and last record
    first = ends[0]
    assert first.start == tuple(first.records[0][k.ref] for k in sort)
    assert first.end == tuple(first.records[-1][k.ref] for k in sort)

    # and backwards from the last page: the same pages in reverse
    back = [pages[-1]]
    start = ends[-1].start
    while True:
        page = _d(p, await adapter.fetch(p, Query(criteria, sort, count, after=start,
                                                  backwards=True)))
        back.append([r["t.ID"] for r in page.records])
        if not page.more:
            break
        start = page.start
    assert back == pages[::-1]


async def test_a_position_of_the_wrong_length(adapter: SqlAdapter) -> None:
    p = prepared_items(adapter)
    with pytest.raises(BackendError):
        _d(p, await adapter.fetch(p, Query(None, SORTS["score"], 5, after=(1,))))


# --- children and EXISTS ---------------------------------------------------------------------


async def test_records_are_tuples_in_the_declared_layout(adapter: SqlAdapter) -> None:
    p = prepared_items(adapter)
    layout = adapter.layout(p)
    assert layout is p.layout and "t.ID" in layout.fields
    assert [n for n, _ in layout.children] == ["tags"]
    page = await adapter.fetch(p, Query(In("t.ID", (1, 2)), (SortKey("t.ID"),), 5))
    first, second = page.records
    assert type(first) is tuple and len(first) == len(layout.fields) + 1
    assert first[layout.fields.index("t.ID")] == 1 and second[-1] == ()  # item 2: no tags
    (tag_fields,) = (f for _, f in layout.children)
    assert [row[tag_fields.index("g.POS")] for row in first[-1]] == [1, 2, 3]
    # a child row carries the parent key after its own columns; the dict form drops it
    own = tuple(row[: len(tag_fields)] for row in first[-1])
    assert layout.as_row(layout.as_dict(first)) == (*first[:-1], own)


async def test_children_attached_in_order(adapter: SqlAdapter) -> None:
    p = prepared_items(adapter)
    page = _d(p, await adapter.fetch(p, Query(None, (SortKey("t.ID"),), 100)))
    assert len(page.records) == 40
    for rec in page.records:
        wanted = sorted((t for t in TAG_ROWS if t["ITEM_ID"] == rec["t.ID"] and
                         t["ACTIVE"] == "Y"), key=lambda t: t["POS"])
        assert [(c["g.POS"], c["g.LABEL"]) for c in rec["@tags"]] == \
            [(t["POS"], t["LABEL"]) for t in wanted]
    assert page.records[0]["@tags"] and [c["g.POS"] for c in page.records[0]["@tags"]] == [1, 2, 3]
    assert page.records[1]["@tags"] == []
    # and not fetched when not asked for (the layout keeps its place, empty)
    bare = _d(p, await adapter.fetch(p, Query(None, (SortKey("t.ID"),), 5, children=False)))
    assert len(bare.records) == 5 and all(r["@tags"] == [] for r in bare.records)


@pytest.mark.parametrize(("criterion", "pred"), [
    (Text("g.LABEL", "prefix", "red"), lambda t: t["LABEL"].startswith("RED")),
    (Text("g.LABEL", "contains", "-2"), lambda t: "-2" in t["LABEL"]),
    (Text("g.LABEL", "exact", "blue-1"), lambda t: t["LABEL"] == "BLUE-1"),
    (Text("g.LABEL", "prefix", "gone"), lambda t: False),   # only on inactive child rows
    (Compare("g.LABEL", "=", "RED-3"), lambda t: t["LABEL"] == "RED-3"),
])
async def test_child_criteria_are_exists(adapter: SqlAdapter, criterion: Criterion,
                                         pred: Callable[[dict[str, Any]], bool]) -> None:
    p = prepared_items(adapter)
    expected = sorted({t["ITEM_ID"] for t in TAG_ROWS if t["ACTIVE"] == "Y" and pred(t)})
    page = _d(p, await adapter.fetch(p, Query(criterion, (SortKey("t.ID"),), 100)))
    got = [r["t.ID"] for r in page.records]
    assert got == expected  # each parent once, however many children match
    assert await adapter.count(p, Count(criterion)) == len(expected)
    # with another condition on the parent, and negated
    both = _d(p, await adapter.fetch(p, Query(And((criterion, Compare("t.SCORE", ">=", 2))),
                                        (SortKey("t.ID"),), 100)))
    assert [r["t.ID"] for r in both.records] == [
        i for i in expected if (ITEM_ROWS[i - 1]["SCORE"] or -1) >= 2]
    negated = _d(p, await adapter.fetch(p, Query(Not(criterion), (SortKey("t.ID"),), 100)))
    assert [r["t.ID"] for r in negated.records] == [i for i in range(1, 41) if i not in expected]
    sql, _ = compile_page(p, Query(criterion, (SortKey("t.ID"),), 10), adapter.engine.dialect)
    assert "EXISTS" in sql.upper() and "JOIN" not in sql.upper()


# --- values are bound, never SQL --------------------------------------------------------------


@pytest.mark.parametrize(("mode", "value"), [
    ("prefix", "_"), ("prefix", "%"), ("contains", "%"), ("contains", "_"), ("prefix", "a_"),
    ("prefix", "back\\"), ("contains", "\\"), ("contains", "\\\\"), ("exact", "o'brien"),
    ("prefix", "'; drop table patients; --"), ("contains", "drop table"), ("contains", "zoe"),
    ("prefix", "angstrom"), ("exact", "李"), ("contains", "\" or \"1\"=\"1"),
    ("prefix", "x' or '1'='1"), ("exact", "%"), ("exact", "_"), ("prefix", "ab"),
])
async def test_text_values_match_literally(adapter: SqlAdapter, mode: str, value: str) -> None:
    p = adapter.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
    v = fold(value)
    tests: dict[str, Callable[[str], bool]] = {
        "prefix": lambda s: fold(s).startswith(v), "contains": lambda s: v in fold(s),
        "exact": lambda s: fold(s) == v}
    test = tests[mode]
    expected = [r["PATNT_REFNO"] for r in PATIENT_ROWS if test(str(r["SURNAME"]))]
    assert 0 < len(expected) < len(PATIENT_ROWS)
    crit = Text("p.SURNAME", mode, v)  # type: ignore[arg-type]
    page = _d(p, await adapter.fetch(p, Query(crit, (SortKey("p.PATNT_REFNO"),), 100)))
    assert [r["p.PATNT_REFNO"] for r in page.records] == expected
    await _tables_intact(adapter)


async def test_other_criteria_are_bound(adapter: SqlAdapter) -> None:
    p = adapter.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
    for value in HOSTILE:
        page = _d(p, await adapter.fetch(p, Query(Compare("p.SURNAME", "=", value),
                                            (SortKey("p.PATNT_REFNO"),), 10)))
        assert [r["p.SURNAME"] for r in page.records] == [value]
    page = _d(p, await adapter.fetch(p, Query(In("p.SURNAME", tuple(HOSTILE[:3])),
                                        (SortKey("p.PATNT_REFNO"),), 10)))
    assert [r["p.PATNT_REFNO"] for r in page.records] == [1, 2, 3]
    # a keyset position is bound too
    sort = (SortKey("p.SURNAME"), SortKey("p.PATNT_REFNO"))
    page = _d(p, await adapter.fetch(p, Query(None, sort, 100, after=(HOSTILE[0], 0))))
    assert [r["p.SURNAME"] for r in page.records] == sorted(
        str(r["SURNAME"]) for r in PATIENT_ROWS if str(r["SURNAME"]) >= HOSTILE[0])
    await _tables_intact(adapter)


@pytest.mark.parametrize("name", INTERNATIONAL)
async def test_folding_agrees_with_python(adapter: SqlAdapter, name: str) -> None:
    """Case and accents are folded in the database exactly as gateway.search.fold does."""
    p = adapter.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
    me = next(r["PATNT_REFNO"] for r in PATIENT_ROWS if r["SURNAME"] == name)
    for mode, value in (("exact", name.title()), ("prefix", name[:4].lower()),
                        ("contains", name[2:6]), ("exact", fold(name))):
        v = fold(value)
        page = _d(p, await adapter.fetch(p, Query(Text("p.SURNAME", mode, v),  # type: ignore[arg-type]
                                            (SortKey("p.PATNT_REFNO"),), 100)))
        got = [r["p.PATNT_REFNO"] for r in page.records]
        assert me in got, (mode, value)
        if mode == "exact":
            assert got == [me]


TRICKY = ["Smi\u0301th", "SMITH", "smíth", "ﬁsher", "FISHER", "\u212aelvin", "KELVIN", "Straße",
          "İnce", "INCE", "Æbelø", "o\u0308ller", "Öller", "ZOË", "zoe", "Jo_nes", "Jo%nes",
          "MC\\DONALD", "ẞIG", "Ǆemal", "DŽEMAL"]


def test_sqlite_ascii_shortcut_agrees_with_the_fold(tmp_path: Any) -> None:
    """For ASCII search values SQLite compares ASCII columns with its own LIKE/NOCASE and
    folds only the others: the answers must be exactly the fold's, name by name."""
    import random

    url = f"sqlite:///{tmp_path / 'names.sqlite'}"
    engine = sa.create_engine(url)
    rng = random.Random(7)
    alphabet = ["a", "B", "s", "M", "i", "t", "H", "í", "\u0301", "ﬁ", "\u212a", "ß", "İ", "_", "%",
                "\\", "ø", "Ö", " ", "'"]
    names = [*TRICKY, *("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
                        for _ in range(300))]
    with engine.begin() as conn:
        meta.create_all(conn, tables=[patients])
        conn.execute(patients.insert(), [{"PATNT_REFNO": i, "SURNAME": n}
                                         for i, n in enumerate(names)])
    engine.dispose()
    a = SqlAdapter(url)
    p = a.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
    values = sorted({fold(n)[i:i + k] for n in names for k in (1, 2, 3) for i in range(3)
                     if fold(n)[i:i + k].isascii() and fold(n)[i:i + k]})
    oracle: dict[str, Callable[[str, str], bool]] = {
        "prefix": lambda s, v: fold(s).startswith(v), "contains": lambda s, v: v in fold(s),
        "exact": lambda s, v: fold(s) == v}
    try:
        checked = 0
        for mode, test in oracle.items():
            for v in [*values, *(fold(n) for n in TRICKY if fold(n).isascii())]:
                expected = [i for i, n in enumerate(names) if test(n, v)]
                page = a._fetch_sync(p, Query(Text("p.SURNAME", mode, v),  # type: ignore[arg-type]
                                              (SortKey("p.PATNT_REFNO"),), 1000))
                assert [r[p.positions["p.PATNT_REFNO"]] for r in page.records] == expected, \
                    (mode, v)
                checked += bool(expected)
        assert checked > 100
        # and the shortcut is really in the statement SQLite runs
        direct = [d for d in a._direct.values() if d is not None]
        assert any("LIKE" in d.sql and "ccg_fold" in d.sql and "CAST" in d.sql for d in direct)
    finally:
        a.engine.dispose()


async def _tables_intact(adapter: SqlAdapter) -> None:
    def check() -> None:
        names = set(sa.inspect(adapter.engine).get_table_names())
        assert {"PATIENTS", "ITEMS", "TAGS", "BIG"} <= names
        with adapter.engine.connect() as conn:
            assert conn.execute(sa.text('SELECT count(*) FROM "PATIENTS"')).scalar_one() == \
                len(PATIENT_ROWS)

    check()


async def test_wildcards_through_http(client: httpx.AsyncClient) -> None:
    """On the demo: `_` and `%` are not wildcards, and hostile values find nothing."""
    async def count(params: list[tuple[str, str]]) -> int:
        r = await client.get("/STU3/Patient", params=[*params, ("_summary", "count")])
        assert r.status_code == 200, r.text
        total: int = r.json()["total"]
        return total

    everyone = await count([("gender", "male,female,other,unknown"), ("birthdate", "le2100")])
    assert everyone == 1500
    for value in ("_", "%", "%%", "_%", "\\", "'; DROP TABLE PATIENTS; --", "O'B%"):
        for param in ("family", "family:contains", "name"):
            assert await count([(param, value), ("gender", "male,female,other,unknown")]) == 0
    assert await count([("family", "o'b"), ("gender", "male,female,other,unknown")]) > 0
    assert await count([("gender", "male,female,other,unknown"), ("birthdate", "le2100")]) == \
        everyone


# --- statements run on the DBAPI cursor -------------------------------------------------------


async def test_direct_rows_equal_sqlalchemy_rows(adapter: SqlAdapter) -> None:
    p = prepared_items(adapter)
    queries = [
        Query(None, (SortKey("t.ID"),), 7, children=True),
        Query(Text("g.LABEL", "prefix", "red"), SORTS["-name,score"], 5, children=True,
              with_total=True),
        Query(Or((IsNull("t.SCORE"), Compare("t.SCORE", ">=", 3))), SORTS["score"], 4,
              after=(3, 9)),
    ]
    for query in queries:
        page = _d(p, await adapter.fetch(p, query))
        assert page.records
        # the same statements through SQLAlchemy's own execution
        with adapter.engine.connect() as conn:
            from adapters.sql import _page_statement

            stmt, params, _ = _page_statement(p, query, adapter.dialect)
            expected = [dict(r._mapping) for r in conn.execute(stmt, params)][: query.count]
            if query.backwards:
                expected.reverse()
        assert [{k: v for k, v in r.items() if not k.startswith("@")} for r in page.records] \
            == expected
        if query.children:
            # a child's rows: active tags only, in POS order (the mapping's where + order_by)
            tagged = [r for r in page.records if r["@tags"]]
            assert tagged and all([t["g.POS"] for t in r["@tags"]] == [1, 2, 3] for r in tagged)
    # every statement went the direct way: none needs SQLAlchemy's execution on these dialects
    assert adapter._direct and all(d is not None for d in adapter._direct.values())


async def test_direct_errors_are_translated_and_the_pool_recovers(url: str) -> None:
    a = SqlAdapter(url, timeout_seconds=5, label="pas", pool_size=1)
    try:
        wrong = a.prepare({"connection": "test", "table": "ITEMS", "alias": "t"},
                          Needs(key="t.ID", fields=frozenset({"t.ID", "t.NO_SUCH_COLUMN"}),
                                children=frozenset()))
        with pytest.raises(BackendError) as info:
            _d(wrong, await a.fetch(wrong, Query(Compare("t.ID", "=", 1), (SortKey("t.ID"),), 1)))
        assert not isinstance(info.value, BackendUnavailable | BackendTimeout)
        assert "does not match the mapping" in str(info.value)
        assert "NO_SUCH_COLUMN" not in str(info.value) and "SELECT" not in str(info.value)
        # the one pooled connection was given back clean (PostgreSQL: not in a failed
        # transaction), so the next statement on it works
        p = prepared_items(a)
        page = _d(p, await a.fetch(p, Query(Compare("t.ID", "=", 4), (SortKey("t.ID"),), 1,
                                      children=True)))
        assert [r["t.ID"] for r in page.records] == [4]
    finally:
        await a.aclose()


def test_statements_sqlalchemy_must_finish_are_not_run_directly(sqlite_url: str) -> None:
    from adapters.sql import _Direct, _page_statement

    a = SqlAdapter(sqlite_url)
    try:
        p = a.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
    finally:
        a.engine.dispose()
    query = Query(Text("p.SURNAME", "prefix", "o'b"), (SortKey("p.PATNT_REFNO"),), 20)
    stmt, params, _ = _page_statement(p, query, "mssql")  # TOP n: rendered at execution
    t_sql = mssql.pyodbc.dialect(paramstyle="qmark")  # type: ignore[no-untyped-call]
    assert _Direct.compile(stmt, t_sql) is None
    stmt, params, _ = _page_statement(p, query, "sqlite")
    direct = _Direct.compile(stmt, a.engine.dialect)
    assert direct is not None and "o'b" not in direct.sql
    # positional, in placeholder order (SQLite's ASCII shortcut tests the pattern twice);
    # SQLite's LIMIT comes with an OFFSET the statement fixes
    assert direct.arguments(params) == ["o'b%", "o'b%", 21, 0]


def test_sqlite_connections_read_through_a_memory_map(sqlite_url: str) -> None:
    from adapters.sql import SQLITE_MMAP_BYTES

    a = SqlAdapter(sqlite_url)
    try:
        with a.engine.connect() as conn:
            mapped = conn.exec_driver_sql("PRAGMA mmap_size").scalar_one()
            rows = conn.exec_driver_sql('SELECT count(*) FROM "PATIENTS"').scalar_one()
    finally:
        a.engine.dispose()
    assert mapped == SQLITE_MMAP_BYTES
    assert rows > 0


# --- reads by key, coalesced ------------------------------------------------------------------


def _key_read(*ids: Any) -> Query:
    return Query(In("t.ID", ids), (SortKey("t.ID"),), count=len(ids))


async def test_concurrent_key_reads_share_statements(url: str) -> None:
    import asyncio

    a = SqlAdapter(url, timeout_seconds=5, label="test")
    statements: list[str] = []
    if a.dialect == "sqlite":  # count what really reaches the database
        sa.event.listen(a.engine, "connect",
                        lambda conn, _rec: conn.set_trace_callback(statements.append))
    try:
        p = prepared_items(a)
        asked = [_key_read(i) for i in range(1, 41)] + [
            _key_read(4), _key_read(4, 7), _key_read(999), _key_read(7, 1, 13)]
        alone = [_d(p, await a.fetch(p, q)) for q in asked]
        statements.clear()
        together = [_d(p, page) for page in
                    await asyncio.gather(*(a.fetch(p, q) for q in asked))]
        for q, one, many in zip(asked, alone, together, strict=True):
            assert many.records == one.records, q
            assert (many.more, many.start, many.end) == (one.more, one.start, one.end)
        assert together[42].records == []  # no such item: found by nobody
        if a.dialect == "sqlite":
            selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
            # one lone read, then one batch for all the others (each: items + tags)
            assert 0 < len(selects) <= 4 * 2, len(selects)
    finally:
        await a.aclose()


async def test_coalesced_reads_fail_together_and_recover(url: str) -> None:
    import asyncio

    a = SqlAdapter(url, timeout_seconds=5, label="pas")
    try:
        wrong = a.prepare({"connection": "test", "table": "ITEMS", "alias": "t"},
                          Needs(key="t.ID", fields=frozenset({"t.ID", "t.NO_SUCH_COLUMN"}),
                                children=frozenset()))
        results = await asyncio.gather(*(a.fetch(wrong, _key_read(i)) for i in range(1, 9)),
                                       return_exceptions=True)
        assert all(isinstance(r, BackendError) and not isinstance(r, BackendUnavailable)
                   for r in results), results
        # a cancelled read does not stop the others
        p = prepared_items(a)
        tasks = [asyncio.ensure_future(a.fetch(p, _key_read(i))) for i in range(1, 9)]
        await asyncio.sleep(0)
        tasks[3].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        assert [_d(p, d).records[0]["t.ID"] for i, d in enumerate(done)
                if i != 3 and not isinstance(d, BaseException)] == [1, 2, 3, 5, 6, 7, 8]
        assert not a._reads.busy and not a._reads.queues and not a._reads.tasks
    finally:
        await a.aclose()


async def test_a_coalesced_batch_logs_under_no_request_id(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The batch serves the reads that waited, not the read before it: its log lines must
    not carry that read's request id."""
    import asyncio
    import json

    from gateway import logging as gateway_logging

    gateway_logging.configure("info")
    a = SqlAdapter(url, timeout_seconds=5, label="pas")
    try:
        wrong = a.prepare({"connection": "test", "table": "ITEMS", "alias": "t"},
                          Needs(key="t.ID", fields=frozenset({"t.ID", "t.NO_SUCH_COLUMN"}),
                                children=frozenset()))

        async def read(i: int) -> BaseException | None:
            gateway_logging.current_request_id.set(f"req-{i}")
            try:
                await a.fetch(wrong, _key_read(i))
            except BackendError as exc:
                return exc
            return None

        results = await asyncio.gather(*(read(i) for i in range(1, 9)))
        assert all(isinstance(r, BackendError) for r in results)
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
                 if '"sql_error"' in line]
        # the first read alone, under its own id; then the others together, under none
        assert [line.get("request_id") for line in lines] == ["req-1", None]
    finally:
        await a.aclose()


async def test_coalesced_reads_whose_keys_compare_unequal_run_alone(sqlite_url: str) -> None:
    """SQLite finds INTEGER 4 for '4', but '4' != 4 in Python: those reads go alone."""
    import asyncio

    a = SqlAdapter(sqlite_url, timeout_seconds=5, label="test")
    try:
        p = prepared_items(a)
        pages = await asyncio.gather(*(a.fetch(p, _key_read(str(i))) for i in (4, 5, 6, 7)))
        assert [_d(p, pg).records[0]["t.ID"] for pg in pages] == [4, 5, 6, 7]
    finally:
        await a.aclose()


# --- SQL Server: the T-SQL the adapter sends ------------------------------------------------


def test_sql_server_statements(sqlite_url: str) -> None:
    a = SqlAdapter(sqlite_url)
    try:
        p = a.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
    finally:
        a.engine.dispose()
    dialect = mssql.pyodbc.dialect(paramstyle="qmark")  # type: ignore[no-untyped-call]
    hostile = "o'brien%_\\x"
    sort = (SortKey("p.SURNAME", True), SortKey("p.PATNT_REFNO"))
    query = Query(Text("p.SURNAME", "prefix", hostile), sort, 20,
                  after=("SMITH'; --", 4711))
    sql, params = compile_page(p, query, dialect)
    assert sql.startswith("SELECT TOP 21 ")
    assert "ROW_NUMBER" not in sql and "LIMIT" not in sql
    assert "COLLATE Latin1_General_CI_AI" in sql
    assert "LIKE ? ESCAPE" in sql
    assert sql.count("?") == len(params) == 4  # pattern, then the position: beyond and equal
    assert list(params.values()) == ["o'brien\\%\\_\\\\x%", "SMITH'; --", "SMITH'; --", 4711]
    for fragment in ("o'brien", "SMITH", "4711", "--"):
        assert fragment not in sql
    # descending: NULLs last, so "beyond" a value includes the NULLs
    assert "[p.SURNAME]" in sql and "IS NULL" in sql
    assert "ORDER BY p.[SURNAME] DESC, p.[PATNT_REFNO] ASC" in sql

    # backwards and without criteria: still TOP, still bound
    sql, params = compile_page(p, Query(None, sort, 5, after=(None, 9), backwards=True), dialect)
    assert sql.startswith("SELECT TOP 6 ") and sql.count("?") == len(params) == 1
    assert "ORDER BY p.[SURNAME] ASC, p.[PATNT_REFNO] DESC" in sql

    # a contains search on a child table: EXISTS with bound values
    a = SqlAdapter(sqlite_url)
    try:
        items_p = prepared_items(a)
    finally:
        a.engine.dispose()
    sql, params = compile_page(items_p, Query(Text("g.LABEL", "contains", "x%y"),
                                              (SortKey("t.ID"),), 10), dialect)
    assert sql.startswith("SELECT TOP 11 ") and "EXISTS (SELECT" in sql
    assert "lower(g.[LABEL] COLLATE Latin1_General_CI_AI) LIKE ?" in sql
    assert "x%y" not in sql and params == {"v0": "%x\\%y%"}
    # compiling for another database leaves the mapping's own statement cache alone
    assert len(items_p.statements) == 0


# --- timeouts ---------------------------------------------------------------------------------

SLOW_SOURCE: dict[str, Any] = {
    "connection": "test", "table": "BIG", "alias": "a",
    # every row joins every row, twice: 300^3 = 27 million rows to filter
    "joins": [{"table": "BIG", "alias": "b", "link": {"b.K": "a.K"}},
              {"table": "BIG", "alias": "c", "link": {"c.K": "b.K"}}],
}
SLOW_NEEDS = Needs(key="a.ID", fields=frozenset({"a.ID"}), children=frozenset(),
                   criteria_refs=frozenset({"b.NAME", "c.NAME"}))
# spans two joined tables, so no database can filter either table before joining
NEVER = Or((Text("c.NAME", "contains", "no such name"), Text("b.NAME", "contains", "nor this")))


async def test_slow_query_times_out(url: str) -> None:
    a = SqlAdapter(url, timeout_seconds=0.2, label="slow")
    try:
        p = a.prepare(SLOW_SOURCE, SLOW_NEEDS)
        for call in (lambda: a.fetch(p, Query(NEVER, (SortKey("a.ID"),), 5)),
                     lambda: a.count(p, Count(NEVER))):
            started = time.monotonic()
            with pytest.raises(BackendTimeout) as info:
                await call()
            elapsed = time.monotonic() - started
            # stopped by the database itself (progress handler / statement_timeout), before
            # the caller's backstop at timeout + 1 s (which alone would take at least that)
            assert elapsed < a.timeout + 1.0, elapsed
            assert "no such name" not in str(info.value) and "SELECT" not in str(info.value)
        # the adapter is still usable afterwards
        plain = a.prepare({"connection": "test", "table": "BIG", "alias": "a"},
                          Needs(key="a.ID", fields=frozenset({"a.ID", "a.NAME"}),
                                children=frozenset()))
        page = _d(plain, await a.fetch(plain, Query(Compare("a.ID", "=", 7),
                                                    (SortKey("a.ID"),), 5)))
        assert page.records == [{"a.ID": 7, "a.NAME": "N7"}]
        await a.ping()
    finally:
        await a.aclose()


# --- unavailable -------------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port  # nothing listens here now


async def test_database_down(closed_port: int) -> None:
    a = SqlAdapter(f"postgresql+psycopg://gateway@127.0.0.1:{closed_port}/pas",
                   timeout_seconds=3, label="pas")
    try:
        p = a.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            _d(p, await a.fetch(p, Query(None, (SortKey("p.PATNT_REFNO"),), 5)))
        assert time.monotonic() - started < a.timeout  # refused, not waited out
        assert not isinstance(info.value, BackendTimeout)
        message = str(info.value)
        assert "pas" in message
        assert "127.0.0.1" not in message and str(closed_port) not in message
        with pytest.raises(BackendUnavailable):
            await a.count(p, Count(None))
        with pytest.raises(BackendUnavailable):
            await a.ping()
    finally:
        await a.aclose()


async def test_database_down_through_http(closed_port: int, make_app: Callable[..., Starlette]
                                          ) -> None:
    app = make_app(f"postgresql+psycopg://gateway@127.0.0.1:{closed_port}/pas")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            r = await c.get("/STU3/Patient", params={"identifier": "9990000018"})
            assert r.status_code == 503
            assert r.headers["retry-after"].isdigit()
            body = r.json()
            assert body["resourceType"] == "OperationOutcome"
            assert body["issue"][0]["code"] == "transient"
            assert body["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_UNAVAILABLE"
            for secret in ("127.0.0.1", str(closed_port), "gateway@", "psycopg", "SELECT",
                           "PATIENTS", "9990000018", "Traceback"):
                assert secret not in r.text
            r = await c.get("/STU3/Patient/100001")
            assert r.status_code == 503 and "retry-after" in r.headers
            r = await c.get("/_ready")
            assert r.status_code == 503 and r.json()["status"] == "fail"


async def test_ping(adapter: SqlAdapter) -> None:
    await adapter.ping()


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(SourceConfigError) as info:
        SqlAdapter("nosuchdriver://user:secret@host/db", label="pas")
    assert "secret" not in str(info.value)


# --- bounded statement memory, input the database cannot take (issue 13) ---------------------


def _wide(n: int, tag: str) -> Query:
    """A search shape of its own: ``n`` prefix alternatives (2,000 name=a, in small)."""
    return Query(Or(tuple(Text("p.SURNAME", "prefix", f"{tag}{i}") for i in range(n))),
                 (SortKey("p.PATNT_REFNO"),), 20)


def test_statement_memory_is_bounded_by_bytes(sqlite_url: str) -> None:
    import gc
    import tracemalloc

    from adapters.sql import NODE_BYTES

    budget = 2 * 1024 * 1024
    a = SqlAdapter(sqlite_url, statement_cache_bytes=budget)
    try:
        p = a.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
        a._fetch_sync(p, _wide(1, "warm"))  # one-off allocations (pool, dialect) first
        gc.collect()
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        for shape in range(40):  # 40 shapes of 120 alternatives: ~2 MB each built
            a._fetch_sync(p, _wide(120 + shape, f"s{shape}-"))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
        tracemalloc.stop()
        assert p.statements.bytes <= budget
        # what is kept stays near the budget (not 40 statements' worth: ~100 MB)
        assert grown < 3 * budget, grown
        # a statement over the per-entry bound is run, never kept
        before = len(p.statements)
        a._fetch_sync(p, _wide(1 + 1024 * 1024 // NODE_BYTES, "huge"))
        assert len(p.statements) == before
        # an ordinary shape is kept and found again
        a._fetch_sync(p, _wide(2, "small"))
        assert len(p.statements) == before + 1
    finally:
        a.engine.dispose()


def test_too_many_values_for_the_database_is_found_before_it_is_asked(
        sqlite_url: str) -> None:
    import sqlite3

    from adapters.base import QueryTooLarge

    a = SqlAdapter(sqlite_url)
    # an SQLite built with a small variable limit (999 before 3.32): set on every connection
    sa.event.listen(a.engine, "connect", lambda conn, _rec: conn.setlimit(
        sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50))
    sent: list[str] = []
    sa.event.listen(a.engine, "connect", lambda conn, _rec: conn.set_trace_callback(sent.append))
    try:
        p = a.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
        with pytest.raises(QueryTooLarge):
            a._fetch_sync(p, _wide(60, "x"))
        assert not [s for s in sent if "SELECT" in s.upper()]  # the database was not asked
        assert len(p.statements) == 0  # a shape that failed is not kept
        with pytest.raises(QueryTooLarge):
            a._count_sync(p, Count(_wide(60, "x").criteria))
        assert len(a._fetch_sync(p, _wide(10, "x")).records) >= 0  # within the limit: runs
        assert len(p.statements) == 1
    finally:
        a.engine.dispose()


def test_the_statement_cache_bound_is_a_connection_option(tmp_path: Any) -> None:
    from adapters.registry import create
    from gateway.mapping.model import Connection

    def connection(**options: Any) -> Any:
        return Connection.model_validate({"adapter": "sql", "url": "sqlite://",
                                          "options": options})

    adapter = create("pas", connection(statement_cache_bytes=4096), tmp_path)
    assert isinstance(adapter, SqlAdapter)
    assert adapter.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS).statements.max_bytes == 4096
    for bad in ({"statement_cache_bytes": "lots"}, {"statement_cache_bytes": -1},
                {"colour": "red"}):
        with pytest.raises(SourceConfigError):
            create("pas", connection(**bad), tmp_path)


# --- batches: several queries of one request in one go -------------------------------------------


async def test_a_batch_runs_its_queries_one_after_another_on_one_connection(url: str) -> None:
    a = SqlAdapter(url, timeout_seconds=5, label="test")
    checkouts: list[int] = []
    sa.event.listen(a.engine, "checkout", lambda *_: checkouts.append(1))
    try:
        assert a.batches
        items_p, patients_p = prepared_items(a), a.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
        first = Query(None, (SortKey("t.ID"),), 3)
        people = Query(Text("p.SURNAME", "prefix", "o"), (SortKey("p.PATNT_REFNO"),), 50)

        def work(fetch: Any) -> list[Page]:
            one = fetch(items_p, first)
            # the next query depends on the answer to the one before
            two = fetch(items_p, Query(None, (SortKey("t.ID"),), 3, after=one.end))
            return [one, two, fetch(patients_p, people)]

        got = await a.batch(work)
        assert len(checkouts) == 1
        alone = [await a.fetch(items_p, first),
                 await a.fetch(items_p, Query(None, (SortKey("t.ID"),), 3, after=got[0].end)),
                 await a.fetch(patients_p, people)]
        assert [_d(p, g).records for p, g in zip((items_p, items_p, patients_p), got,
                                                   strict=True)] == \
            [_d(p, g).records for p, g in zip((items_p, items_p, patients_p), alone,
                                              strict=True)]
        assert [r["t.ID"] for r in got[0].records + got[1].records] == [1, 2, 3, 4, 5, 6]
        assert [t["g.POS"] for t in got[1].records[0]["@tags"]] == [1, 2, 3]  # item 4's
    finally:
        await a.aclose()


async def test_a_failed_query_in_a_batch_leaves_the_others_and_the_connection(url: str) -> None:
    """One query's failure is raised by its fetch; the work may go on with the rest on the
    same connection (PostgreSQL: the failed transaction is ended first); what the work
    raises is the batch's error; the adapter is usable afterwards."""
    a = SqlAdapter(url, timeout_seconds=5, label="pas", pool_size=1)
    try:
        wrong = a.prepare({"connection": "test", "table": "ITEMS", "alias": "t"},
                          Needs(key="t.ID", fields=frozenset({"t.ID", "t.NO_SUCH_COLUMN"}),
                                children=frozenset()))
        p = prepared_items(a)
        by_id = Query(Compare("t.ID", "=", 4), (SortKey("t.ID"),), 1)
        seen: list[BaseException] = []

        def work(fetch: Any) -> Page:
            try:
                fetch(wrong, by_id)
            except BackendError as exc:
                seen.append(exc)
            return fetch(p, by_id)  # type: ignore[no-any-return]

        page = _d(p, await a.batch(work))
        assert [r["t.ID"] for r in page.records] == [4]
        [error] = seen
        assert "does not match the mapping" in str(error)
        assert "NO_SUCH_COLUMN" not in str(error)
        with pytest.raises(BackendError):
            await a.batch(lambda fetch: fetch(wrong, by_id))
        assert [r["t.ID"] for r in _d(p, await a.fetch(p, by_id)).records] == [4]
    finally:
        await a.aclose()


async def test_a_batch_is_one_call_under_the_connections_timeout(url: str) -> None:
    a = SqlAdapter(url, timeout_seconds=0.2, label="slow")
    try:
        slow = a.prepare(SLOW_SOURCE, SLOW_NEEDS)
        fast = a.prepare({"connection": "test", "table": "BIG", "alias": "a"},
                         Needs(key="a.ID", fields=frozenset({"a.ID"}), children=frozenset()))
        started = time.monotonic()
        with pytest.raises(BackendTimeout):
            await a.batch(lambda fetch: [fetch(fast, Query(None, (SortKey("a.ID"),), 5)),
                                         fetch(slow, Query(NEVER, (SortKey("a.ID"),), 5))])
        assert time.monotonic() - started < a.timeout + 1.0  # the database, not the backstop
        page = await a.batch(lambda fetch: fetch(fast, Query(None, (SortKey("a.ID"),), 2)))
        assert [r[0] for r in page.records] == [0, 1]
    finally:
        await a.aclose()


async def test_numeric_compare_reads_numbers_and_skips_text(adapter: SqlAdapter) -> None:
    """``Compare(numeric=True)``: a column compared as a number whatever its type; a stored
    value that is not a number never matches, and is never a database error (PostgreSQL
    would refuse to cast 'O''BRIEN')."""
    p = adapter.prepare(PATIENTS_SOURCE, PATIENTS_NEEDS)
    for op in ("<", ">=", "!="):
        page = await adapter.fetch(p, Query(Compare("p.SURNAME", op, 0.0, numeric=True),
                                            (SortKey("p.PATNT_REFNO"),), 100))
        assert page.records == []
    items_p = prepared_items(adapter)
    sort = (SortKey("t.ID"),)
    for op, value in ((">", 2.0), ("<=", 1.5), (">=", 3.0)):
        page = _d(items_p, await adapter.fetch(items_p, Query(
            Compare("t.SCORE", op, value, numeric=True), sort, 100)))
        want = [r["ID"] for r in ITEM_ROWS if r["SCORE"] is not None and {
            ">": r["SCORE"] > value, "<=": r["SCORE"] <= value,
            ">=": r["SCORE"] >= value}[op]]
        assert [r["t.ID"] for r in page.records] == want and want
