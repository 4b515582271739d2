"""``/metrics``: Prometheus text, outside FHIR authentication, bounded labels, no PHI.

Metrics are process-wide (prometheus-client's registry), so every check compares a value
before and after the requests of the test.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from tests.conftest import LiveServer

pytestmark = pytest.mark.anyio

READ = {"route": "/STU3/{type}/{id}", "resource_type": "Patient", "interaction": "read",
        "method": "GET", "status": "200"}


def sample(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of the sample ``name`` whose labels include ``labels`` (0 if absent)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def scrape(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


async def _client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_requests_latency_and_adapter_time_with_bounded_labels(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    # real JWT authentication: /metrics needs no token, FHIR does
    app = make_app(demo_sqlite_url, auth_mode="", audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app), await _client(app) as c:
        before = await scrape(c)
        assert (await c.get("/STU3/Patient/100001")).status_code == 401  # FHIR needs a token
        from gateway.auth.devkeys import mint_dev_token

        token = mint_dev_token(app.state.settings.data_dir, "user/*.read")
        c.headers["authorization"] = f"Bearer {token}"
        assert (await c.get("/STU3/Patient/100001")).status_code == 200
        assert (await c.get("/STU3/Patient", params={"family": "smith",
                                                     "gender": "female"})).status_code == 200
        assert (await c.get("/STU3/Xyzzy/12345")).status_code == 404
        after = await scrape(c)
    name = "ccg_http_requests_total"
    assert sample(after, name, READ) - sample(before, name, READ) == 1
    # Refused before routing (authentication is outside the router): counted under the route
    # it would have been served by, matched without running it.
    unauth = {**READ, "status": "401"}
    assert sample(after, name, unauth) - sample(before, name, unauth) == 1
    search = {"route": "/STU3/{type}", "resource_type": "Patient", "interaction": "search",
              "status": "200"}
    assert sample(after, name, search) - sample(before, name, search) == 1
    other = {"resource_type": "other", "status": "404"}
    assert sample(after, name, other) - sample(before, name, other) == 1
    latency = "ccg_http_request_duration_seconds_count"
    labels = {"route": "/STU3/{type}/{id}", "resource_type": "Patient", "interaction": "read"}
    # the read and the 401 of the same route (latency has no status label)
    assert sample(after, latency, labels) - sample(before, latency, labels) == 2
    adapter = "ccg_adapter_call_duration_seconds_count"
    fetch = {"connection": "pas", "adapter": "sql", "operation": "fetch"}
    assert sample(after, adapter, fetch) - sample(before, adapter, fetch) >= 2
    # SQL time by statement shape: an id of the statement's text (placeholders only)
    shapes = {s.labels["shape"] for f in text_string_to_metric_families(after)
              for s in f.samples if s.name == "ccg_sql_statement_duration_seconds_count"
              and s.labels["connection"] == "pas"}
    assert shapes and all(re.fullmatch(r"q[0-9a-f]{10}|other", x) for x in shapes), shapes
    statements = "ccg_sql_statement_duration_seconds_count"
    assert (sum(sample(after, statements, {"shape": x}) for x in shapes)
            - sum(sample(before, statements, {"shape": x}) for x in shapes)) >= 2
    # No id, search value, resource type the client made up, or token in any label; every
    # label value of every ccg_ series comes from a closed set or is a bounded id.
    # (in names and labels: a sample's value or timestamp may hold "100001" by chance)
    texts = [f"{s.name} {s.labels}" for f in text_string_to_metric_families(after)
             for s in f.samples]
    for leak in ("100001", "smith", "female", "Xyzzy", "12345", token[:20]):
        assert not [t for t in texts if leak in t], leak
    for family in text_string_to_metric_families(after):
        for s in family.samples:
            if s.name.startswith("ccg_"):
                for label, v in s.labels.items():
                    # (a dropped value's reason is a phrase from the code: "date/time")
                    assert len(v) <= 64 and ("/" not in v or label in ("route", "reason")), (
                        s.name, v)
                    # a template (other tests' apps share the registry), never a path
                    assert label != "route" or v == "unmatched" or (
                        v.startswith("/") and "Patient/" not in v), v


def test_statement_shapes_are_bounded_and_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import metrics

    monkeypatch.setattr(metrics, "_sql_shapes", {})
    monkeypatch.setattr(metrics, "MAX_SQL_SHAPES", 3)
    first = metrics.sql_shape("pas", "SELECT a FROM t WHERE b = ?")
    assert metrics.sql_shape("pas", "SELECT a FROM t WHERE b = ?") == first  # the same text
    assert re.fullmatch(r"q[0-9a-f]{10}", first)
    others = [metrics.sql_shape("pas", f"SELECT a FROM t WHERE c{i} = ?") for i in range(4)]
    assert len(set(others[:2]) | {first}) == 3 and others[2:] == ["other", "other"]
    assert metrics.sql_shape("pas", "SELECT a FROM t WHERE b = ?") == first  # still known


async def test_refused_requests_are_labelled_with_the_route_they_would_match(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    app = make_app(demo_sqlite_url, rate_limit_per_minute=1, rate_limit_burst=1,
                   audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app), await _client(app) as c:
        before = await scrape(c)
        search = {"family": "smith", "gender": "female"}
        assert (await c.get("/STU3/Patient", params=search)).status_code == 200
        assert (await c.get("/STU3/Patient", params=search)).status_code == 429
        assert (await c.get("/nothing/here")).status_code == 429
        after = await scrape(c)
    name = "ccg_http_requests_total"
    limited = {"route": "/STU3/{type}", "resource_type": "Patient", "interaction": "search",
               "status": "429"}
    assert sample(after, name, limited) - sample(before, name, limited) == 1
    nowhere = {"route": "unmatched", "status": "429"}
    assert sample(after, name, nowhere) - sample(before, name, nowhere) == 1


async def test_refusals_and_audit_failures_are_counted(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    app = make_app(demo_sqlite_url, rate_limit_per_minute=1, rate_limit_burst=1,
                   audit_log="/dev/full", audit_fail_closed=True)
    async with app.router.lifespan_context(app), await _client(app) as c:
        before = await scrape(c)
        first = await c.get("/STU3/Patient/100001")
        second = await c.get("/STU3/Patient/100001")
        after = await scrape(c)
    # Neither audit record could be written, so neither request is answered as such: the
    # rate limit's 429 became the audit's 503 too; the refusal was counted all the same.
    assert first.status_code == second.status_code == 503
    refused = {"reason": "rate_limit"}
    assert (sample(after, "ccg_refusals_total", refused)
            - sample(before, "ccg_refusals_total", refused)) == 1
    failures = "ccg_audit_write_failures_total"
    assert sample(after, failures, {}) - sample(before, failures, {}) >= 2


async def test_backend_errors_are_counted_by_class(
        make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here" / "pas.sqlite"
    app = make_app(f"sqlite:///{missing}", audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app), await _client(app) as c:
        before = await scrape(c)
        r = await c.get("/STU3/Patient/100001")
        after = await scrape(c)
    assert r.status_code >= 500
    errors = "ccg_adapter_errors_total"
    labels = {"connection": "pas", "adapter": "sql", "operation": "fetch"}
    assert sample(after, errors, labels) - sample(before, errors, labels) == 1


def test_metrics_on_a_separate_port_only(demo_sqlite_url: str,
                                         make_app: Callable[..., Starlette],
                                         tmp_path: Path) -> None:
    import socket

    from gateway import metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app(demo_sqlite_url, metrics_port=port, audit_log=str(tmp_path / "audit.jsonl"))
    server = metrics.serve_separately("127.0.0.1", port)
    try:
        with LiveServer(app) as live:
            assert httpx.get(f"{live.url}/metrics").status_code == 404
            assert httpx.get(f"{live.url}/STU3/Patient/100001").status_code == 200
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert sample(text, "ccg_http_requests_total", READ) >= 1
    finally:
        server.shutdown()
        server.server_close()


def test_values_left_out_by_a_code_map_are_counted() -> None:
    from prometheus_client import REGISTRY

    from gateway.mapping.codemaps import CodeMap, Target

    cm = CodeMap("test-sex", "http://example.org/sex", "omit", {"1": Target("male")})

    def dropped() -> float:
        return REGISTRY.get_sample_value("ccg_mapping_values_dropped_total",
                                         {"codemap": "test-sex"}) or 0.0

    before = dropped()
    assert cm.lookup("1") == Target("male")
    assert cm.lookup("7") is None
    assert cm.lookup("8") is None
    assert dropped() - before == 2


def test_source_values_that_cannot_be_mapped_are_counted(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    """adapters.dropped (an HL7 date/time that is none, a group without its id) is exported as
    ccg_dropped_values_total{where, reason}: a place from the configuration, never the value."""
    from zoneinfo import ZoneInfo

    from prometheus_client import REGISTRY, generate_latest

    from gateway.mapping.storage import make_storage

    make_app(demo_sqlite_url)  # the app builder installs the adapters' hooks
    labels = {"where": "datetime:hl7", "reason": "not an HL7 date/time"}

    def counted() -> float:
        return REGISTRY.get_sample_value("ccg_dropped_values_total", labels) or 0.0

    storage = make_storage("datetime:hl7", ZoneInfo("Europe/London"))
    before = counted()
    assert storage.to_fhir("20240131101500") is not None
    assert storage.to_fhir("20241399887766") is None
    assert storage.to_fhir("20241399887766") is None  # cached, and counted again
    assert counted() - before == 2
    assert "20241399887766" not in generate_latest(REGISTRY).decode()


async def test_pool_waits_and_mllp_naks_are_counted(tmp_path: Path) -> None:
    """HL7 v2 demo: the PAS simulator NAKs one query; every call's wait for a connection
    is observed, for the SQL and the MLLP connection alike."""
    from gateway.app import build_app
    from gateway.demo_pas import ensure_sqlite_demo
    from gateway.demo_pas.hl7v2 import PasSimulator
    from tests.conftest import gateway_settings

    db = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(db, patients=300, progress=False)
    mappings = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2"
    async with PasSimulator(f"sqlite:///{db}") as sim:
        app = build_app(gateway_settings(
            f"sqlite:///{db}", tmp_path, mappings_dir=mappings,
            audit_log=str(tmp_path / "audit.jsonl"),
            connection_urls={"pas": f"sqlite:///{db}",
                             "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        async with app.router.lifespan_context(app), await _client(app) as c:
            before = await scrape(c)
            sim.faults.nak_ae_count = 1
            nak = await c.get("/STU3/Patient", params={"family": "smith", "gender": "female"})
            ok = await c.get("/STU3/Patient", params={"family": "smith", "gender": "female"})
            org = await c.get("/STU3/Organization", params={"name": "a"})
            after = await scrape(c)
    assert nak.status_code == 502 and ok.status_code == 200 and org.status_code == 200
    events = "ccg_mllp_events_total"
    labels = {"connection": "pas-hl7", "event": "nak"}
    assert sample(after, events, labels) - sample(before, events, labels) == 1
    exchanges = "ccg_mllp_exchange_duration_seconds_count"
    for outcome, n in (("BackendRejected", 1), ("ok", 1)):
        labels = {"connection": "pas-hl7", "outcome": outcome}
        assert sample(after, exchanges, labels) - sample(before, exchanges, labels) == n
    waits = "ccg_adapter_pool_wait_seconds_count"
    for connection in ("pas-hl7", "pas"):
        assert (sample(after, waits, {"connection": connection})
                - sample(before, waits, {"connection": connection})) >= 1
