"""Route table and small helpers of gateway.routes (the interactions are tested end to end)."""

from __future__ import annotations

import datetime as dt
import random
from email.utils import format_datetime

from starlette.routing import Match, Route

from gateway.routes import http_date, routes


def test_http_date_is_imf_fixdate() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        naive = dt.datetime(1900, 1, 1) + dt.timedelta(seconds=rng.randrange(0, 5 * 10**9))
        offset = dt.timezone(dt.timedelta(minutes=rng.choice([-300, 0, 60, 330])))
        when = naive.replace(tzinfo=offset, microsecond=rng.randrange(10**6))
        assert http_date(when) == format_datetime(when.astimezone(dt.UTC), usegmt=True)


def _handler_for(table: list[Route], method: str, path: str) -> str:
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    partial = None
    for route in table:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.path_format
        if match == Match.PARTIAL and partial is None:
            partial = route.path_format
    return partial or "none"


def test_fast_routes_first_without_taking_other_routes_paths() -> None:
    class Api:  # only the handlers' identity matters here
        def __getattr__(self, name: str) -> object:
            async def handler(_request: object) -> None: ...
            return handler

    table = [r for r in routes(Api(), None, "/STU3")  # type: ignore[arg-type]
             if isinstance(r, Route)]
    # Binary/[id] first (its own handler, gateway.binary), then the two fast routes.
    assert table[0].path_format == "/STU3/Binary/{id}"
    assert table[1].path_format == "/STU3/{type}/{id}" and table[2].path_format == "/STU3/{type}"
    cases = {
        ("GET", "/STU3/Patient/100001"): "/STU3/{type}/{id}",
        ("GET", "/STU3/Patient"): "/STU3/{type}",
        ("GET", "/STU3/metadata"): "/STU3/metadata",
        ("POST", "/STU3/Patient/_search"): "/STU3/{type}/_search",
        ("GET", "/STU3/Patient/_search"): "/STU3/{type}/{id}",  # GET _search: the instance
        ("POST", "/STU3/Patient/$validate"): "/STU3/{type}/{op}",
        ("POST", "/STU3/Patient/1/$validate"): "/STU3/{type}/{id}/{op}",
        ("GET", "/STU3/Patient/1/$everything"): "/STU3/{type}/{id}/{op}",
        ("GET", "/STU3/$export"): "/STU3/{op}",
        ("GET", "/STU3/Patient/1/_history"): "/STU3/{type}/{id}/{rest}",
        ("GET", "/STU3/patient"): "/STU3/{type}",  # not a type: the same handler says 404
        ("GET", "/_health"): "/_health",
        ("GET", "/STU3/Binary/1"): "/STU3/Binary/{id}",
    }
    for (method, path), expected in cases.items():
        assert _handler_for(table, method, path) == expected, path
