"""Searchset paging: stateless signed links, keyset order, and walking both ways.

The expected order is computed in plain Python from the demo tables (read with SQLAlchemy),
and every page is fetched through the gateway's own ``next`` / ``previous`` links.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from adapters.base import SortKey
from gateway.bundle import Pager

pytestmark = pytest.mark.anyio

FEMALE = [("gender", "female"), ("birthdate", "ge1900")]


@asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


@pytest.fixture(scope="module")
def females(demo_url: str) -> list[dict[str, Any]]:
    """The oracle: every female patient (what FEMALE selects), straight from the table."""
    engine = sa.create_engine(demo_url)
    try:
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(sa.text(
                'SELECT "PATNT_REFNO", "SURNAME", "DTTM_OF_BIRTH" FROM "PATIENTS" '
                "WHERE \"SEXXX_CODE\" = '2'"))]
    finally:
        engine.dispose()
    assert len(rows) > 500
    return rows


def ordered(rows: list[dict[str, Any]], *keys: tuple[str, bool]) -> list[str]:
    """Ids sorted by (column, descending) pairs, most important first; ties by key ascending."""
    out = sorted(rows, key=lambda r: r["PATNT_REFNO"])
    for column, desc in reversed(keys):
        out.sort(key=lambda r, c=column: r[c], reverse=desc)  # type: ignore[misc]
    return [str(r["PATNT_REFNO"]) for r in out]


def match_ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])
            if e["search"]["mode"] == "match"]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    found = [x["url"] for x in bundle["link"] if x["relation"] == relation]
    assert len(found) <= 1
    return found[0] if found else None


def page_token(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["_page"]


def with_token(url: str, token: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "_page"] + [("_page", token)]
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}"


async def bundle_at(c: httpx.AsyncClient, url: str) -> dict[str, Any]:
    r = await c.get(url)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def walk(c: httpx.AsyncClient, url: str, relation: str
               ) -> tuple[list[list[str]], list[str]]:
    """Follow ``relation`` links from ``url``: the ids of each page, and each page's URL."""
    pages: list[list[str]] = []
    urls: list[str] = []
    next_url: str | None = url
    while next_url is not None:
        assert len(pages) < 200, "paging does not end"
        bundle = await bundle_at(c, next_url)
        pages.append(match_ids(bundle))
        urls.append(next_url)
        next_url = link(bundle, relation)
    return pages, urls


def first_url(params: list[tuple[str, str]]) -> str:
    return "http://gateway/STU3/Patient?" + urlencode(params)


def tie_split_count(order: list[str], rows: list[dict[str, Any]], column: str) -> int:
    """A page size that puts a page boundary between two records with the same sort value."""
    value = {str(r["PATNT_REFNO"]): r[column] for r in rows}
    for i in range(20, len(order) - 1):
        if value[order[i]] == value[order[i + 1]]:
            return i + 1
    raise AssertionError("no ties to split")


@pytest.mark.parametrize(("sort", "keys"), [
    (None, ()),
    ("-birthdate", (("DTTM_OF_BIRTH", True),)),
    ("family", (("SURNAME", False),)),
    ("family,-birthdate", (("SURNAME", False), ("DTTM_OF_BIRTH", True))),
])
async def test_walk_forwards_and_back(demo_url: str, make_app: Callable[..., Starlette],
                                      females: list[dict[str, Any]], sort: str | None,
                                      keys: tuple[tuple[str, bool], ...]) -> None:
    expected = ordered(females, *keys)
    params = list(FEMALE)
    if sort:
        params.append(("_sort", sort))
        # split a run of equal values across two pages: the key must break the tie
        count = tie_split_count(expected, females, keys[0][0])
    else:
        count = 50
    params.append(("_count", str(count)))
    async with serve(make_app(demo_url)) as c:
        pages, urls = await walk(c, first_url(params), "next")
        assert len(pages) >= 3
        flat = [i for page in pages for i in page]
        assert flat == expected  # every id exactly once, in order
        assert all(len(p) == count for p in pages[:-1]) and 0 < len(pages[-1]) <= count
        first = await bundle_at(c, urls[0])
        assert link(first, "previous") is None
        assert link(await bundle_at(c, urls[-1]), "next") is None

        # back from the last page with `previous`: the same pages, in reverse
        back, back_urls = await walk(c, urls[-1], "previous")
        assert back == pages[::-1]
        # a page reached backwards links forwards to the page after it
        middle = await bundle_at(c, back_urls[1])
        after = link(middle, "next")
        assert after is not None
        assert match_ids(await bundle_at(c, after)) == pages[-1]


async def test_page_links_repeat_the_search(demo_url: str,
                                            make_app: Callable[..., Starlette]) -> None:
    params = [*FEMALE, ("_count", "10"), ("_sort", "family")]
    async with serve(make_app(demo_url)) as c:
        first = await bundle_at(c, first_url(params))
        nxt = link(first, "next")
        assert nxt is not None
        query = parse_qsl(urlsplit(nxt).query)
        assert [kv for kv in query if kv[0] != "_page"] == params
        second = await bundle_at(c, nxt)
        # the second page's self link is the URL that fetched it
        assert link(second, "self") == nxt
        assert link(second, "previous") is not None
        # response-format parameters are not part of the search: the token still fits
        pretty = await bundle_at(c, nxt + "&_pretty=true&_format=json")
        assert match_ids(pretty) == match_ids(second)


async def _second_page_url(c: httpx.AsyncClient, params: list[tuple[str, str]]) -> str:
    first = await bundle_at(c, first_url(params))
    nxt = link(first, "next")
    assert nxt is not None
    return nxt


async def _error_code(c: httpx.AsyncClient, url: str,
                      headers: dict[str, str] | None = None) -> str:
    r = await c.get(url, headers=headers)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    code: str = body["issue"][0]["details"]["coding"][0]["code"]
    return code


async def test_tampered_token(demo_url: str, make_app: Callable[..., Starlette]) -> None:
    async with serve(make_app(demo_url)) as c:
        nxt = await _second_page_url(c, [*FEMALE, ("_count", "20")])
        token = page_token(nxt)
        raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        for i in (0, 9, 20, len(raw) // 2, len(raw) - 1):  # version, nonce, tag, payload
            bad = bytearray(raw)
            bad[i] ^= 0x01
            forged = base64.urlsafe_b64encode(bytes(bad)).decode().rstrip("=")
            assert await _error_code(c, with_token(nxt, forged)) == "INVALID_PAGE_TOKEN"
        for bad_token in (token[:-4], token[:20], "garbage", "é" + token, token[1:],
                          base64.urlsafe_b64encode(b"x" * 120).decode()):
            assert await _error_code(c, with_token(nxt, bad_token)) == "INVALID_PAGE_TOKEN"
        # the genuine token still works
        r = await c.get(nxt)
        assert r.status_code == 200


async def test_expired_token(demo_url: str, make_app: Callable[..., Starlette]) -> None:
    params = [*FEMALE, ("_count", "20")]
    pager = Pager("test-secret")  # the secret make_app configures
    fingerprint = Pager.fingerprint("Patient", params, sort=[SortKey("p.PATNT_REFNO")])
    fresh = pager.token(fingerprint, (100100,), False)
    yesterday = Pager("test-secret", clock=lambda: time.time() - 25 * 3600)
    stale = yesterday.token(fingerprint, (100100,), False)
    tomorrow = Pager("test-secret", clock=lambda: time.time() + 3600)  # a clock far ahead
    future = tomorrow.token(fingerprint, (100100,), False)
    async with serve(make_app(demo_url)) as c:
        url = first_url([*params, ("_page", fresh)])
        ok = await bundle_at(c, url)  # a token made like this one is accepted ...
        assert match_ids(ok) and all(int(i) > 100100 for i in match_ids(ok))
        # ... until it is a day old
        assert await _error_code(c, first_url([*params, ("_page", stale)])) == \
            "INVALID_PAGE_TOKEN"
        assert await _error_code(c, first_url([*params, ("_page", future)])) == \
            "INVALID_PAGE_TOKEN"


async def test_token_from_another_search(demo_url: str,
                                         make_app: Callable[..., Starlette]) -> None:
    async with serve(make_app(demo_url)) as c:
        nxt = await _second_page_url(c, [*FEMALE, ("_count", "20")])
        token = page_token(nxt)
        for other in ([("gender", "male"), ("birthdate", "ge1900"), ("_count", "20")],
                      [*FEMALE, ("_count", "21")],
                      [*FEMALE, ("_count", "20"), ("_sort", "family")]):
            url = first_url([*other, ("_page", token)])
            assert await _error_code(c, url) == "INVALID_PAGE_TOKEN"
        wrong_type = nxt.replace("/Patient?", "/Practitioner?")
        # strict by default, Practitioner's unknown birthdate is the first error; leniently,
        # the token is what is refused
        assert await _error_code(c, wrong_type) == "UNKNOWN_PARAMETER"
        assert await _error_code(c, wrong_type, {"Prefer": "handling=lenient"}) == \
            "INVALID_PAGE_TOKEN"


async def test_token_signed_with_another_secret(demo_url: str,
                                                make_app: Callable[..., Starlette]) -> None:
    async with serve(make_app(demo_url)) as a:
        nxt = await _second_page_url(a, [*FEMALE, ("_count", "20")])
    async with serve(make_app(demo_url, paging_secret="other")) as b:
        assert await _error_code(b, nxt) == "INVALID_PAGE_TOKEN"


async def test_token_works_on_another_replica(demo_url: str,
                                              make_app: Callable[..., Starlette]) -> None:
    params = [*FEMALE, ("_count", "20"), ("_sort", "-birthdate")]
    async with serve(make_app(demo_url)) as a:
        nxt = await _second_page_url(a, params)
        here = await bundle_at(a, nxt)
    async with serve(make_app(demo_url)) as b:  # a fresh instance, same secret
        there = await bundle_at(b, nxt)
        here_next = link(here, "next")
    assert match_ids(there) == match_ids(here) and len(match_ids(here)) == 20
    there_next = link(there, "next")
    assert here_next is not None and there_next is not None
    async with serve(make_app(demo_url)) as a:  # and back again: the links are interchangeable
        third = await bundle_at(a, there_next)
        assert match_ids(third) == match_ids(await bundle_at(a, here_next))
        assert len(match_ids(third)) == 20
