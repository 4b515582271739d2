"""OpenTelemetry traces with the SDK's in-memory exporter: the span tree of a read, a search
with ``_include``, an HL7 v2 search and a failing backend; W3C ``traceparent`` honoured; the
trace id in the log line and in a 5xx OperationOutcome; no values in span attributes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.applications import Starlette

from gateway import tracing
from gateway.app import build_app
from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from tests.conftest import gateway_settings

pytestmark = pytest.mark.anyio

HL7_MAPPINGS = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
# values of the fixture patient 100001 (SMITH, JANE) and the search values used below
VALUES = ("100001", "smith", "SMITH", "jane", "JANE", "female", "9990000018")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use_provider(provider)
    try:
        yield memory
    finally:
        tracing.disable()


async def _client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


def tree(spans: tuple[ReadableSpan, ...]) -> dict[str, Any]:
    """The one root span and, under each span, its children: {name, attrs, status, kids}."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(s)

    def node(s: ReadableSpan) -> dict[str, Any]:
        kids = sorted(by_parent.get(s.context.span_id, []), key=lambda k: k.start_time or 0)
        return {"name": s.name, "attrs": dict(s.attributes or {}), "status": s.status.status_code,
                "span": s, "kids": [node(k) for k in kids]}

    roots = by_parent.get(None, [])
    assert len(roots) == 1, [r.name for r in roots]
    return node(roots[0])


def names(n: dict[str, Any]) -> list[str]:
    return [k["name"] for k in n["kids"]]


def find(n: dict[str, Any], name: str) -> list[dict[str, Any]]:
    out = [n] if n["name"] == name else []
    for k in n["kids"]:
        out += find(k, name)
    return out


def assert_no_values(spans: tuple[ReadableSpan, ...]) -> None:
    text = json.dumps([{**dict(s.attributes or {}), "name": s.name} for s in spans])
    for value in VALUES:
        assert value not in text, f"{value!r} in a span"


async def test_a_read(exporter: InMemorySpanExporter, demo_sqlite_url: str,
                      tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path, log_level="info",
                                     audit_log=str(tmp_path / "audit.jsonl")))
    capfd.readouterr()
    async for c in _client(app):
        r = await c.get("/STU3/Patient/100001",
                        headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        assert r.status_code == 200
    spans = exporter.get_finished_spans()
    root = tree(spans)
    assert root["name"] == "GET /STU3/{type}/{id}"
    assert root["attrs"]["http.route"] == "/STU3/{type}/{id}"
    assert root["attrs"]["fhir.resource_type"] == "Patient"
    assert root["attrs"]["fhir.interaction"] == "read"
    assert root["attrs"]["http.response.status_code"] == 200
    # the caller's trace continues: same trace id, its span as the parent
    assert format(root["span"].context.trace_id, "032x") == TRACE
    assert format(root["span"].parent.span_id, "016x") == PARENT
    assert names(root) == ["sql fetch", "audit write"]
    fetch = root["kids"][0]
    assert fetch["attrs"]["ccg.connection"] == "pas"
    statements = [k["attrs"]["db.statement"] for k in find(fetch, "SQL pas")]
    assert len(statements) >= 2  # the patient row, then its child tables (addresses, ...)
    assert '"PATIENTS"' in statements[0]
    assert all("?" in sql for sql in statements)  # the shape: placeholders for the values
    assert_no_values(spans)
    request_lines = [json.loads(line) for line in capfd.readouterr().out.splitlines()
                     if '"event":"request"' in line]
    assert [line["trace_id"] for line in request_lines] == [TRACE]


async def test_a_search_with_include(exporter: InMemorySpanExporter, demo_sqlite_url: str,
                                     tmp_path: Path) -> None:
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path,
                                     audit_log=str(tmp_path / "audit.jsonl")))
    async for c in _client(app):
        r = await c.get("/STU3/Patient", params={
            "family": "smith", "gender": "female", "_count": "5",
            "_include": "Patient:general-practitioner"})
        assert r.status_code == 200
        assert any(e["search"]["mode"] == "include" for e in r.json()["entry"])
    spans = exporter.get_finished_spans()
    root = tree(spans)
    assert root["attrs"]["fhir.interaction"] == "search"
    # the page, then each include target's batch (general-practitioner: Practitioner and
    # Organization), then the audit record
    assert names(root) == ["sql fetch", "map page", "sql fetch", "map batch", "sql fetch",
                           "map batch", "audit write"]
    search, page, include, batch = root["kids"][:4]
    assert page["attrs"] == {"fhir.resource_type": "Patient", "ccg.records": 5}
    assert batch["attrs"]["fhir.resource_type"] == "Practitioner"
    assert "SURNAME" in find(search, "SQL pas")[0]["attrs"]["db.statement"]
    assert find(include, "SQL pas")  # the include's own statement, under its own call
    assert_no_values(spans)


async def test_an_hl7v2_search(exporter: InMemorySpanExporter, tmp_path: Path) -> None:
    db = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(db, patients=300, progress=False)
    async with PasSimulator(f"sqlite:///{db}") as sim:
        app = build_app(gateway_settings(
            f"sqlite:///{db}", tmp_path, mappings_dir=HL7_MAPPINGS,
            audit_log=str(tmp_path / "audit.jsonl"),
            connection_urls={"pas": f"sqlite:///{db}",
                             "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        async for c in _client(app):
            r = await c.get("/STU3/Patient", params={"family": "smith", "gender": "female"})
            assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    root = tree(spans)
    fetch = root["kids"][0]
    assert fetch["name"] == "hl7v2 fetch"
    assert fetch["attrs"]["ccg.connection"] == "pas-hl7"
    exchanges = [k for k in fetch["kids"] if k["name"].startswith("MLLP ")]
    assert exchanges, names(fetch)
    first = exchanges[0]["attrs"]
    assert first["hl7.message_type"].startswith("QBP^Q22")
    assert first["hl7.control_id"]
    assert_no_values(spans)


async def test_a_failing_backend(exporter: InMemorySpanExporter, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here" / "pas.sqlite"
    app = build_app(gateway_settings(f"sqlite:///{missing}", tmp_path,
                                     audit_log=str(tmp_path / "audit.jsonl")))
    async for c in _client(app):
        r = await c.get("/STU3/Patient/100001")
    assert r.status_code >= 500
    root = tree(exporter.get_finished_spans())
    trace_id = format(root["span"].context.trace_id, "032x")
    assert f"(trace id {trace_id})" in r.json()["issue"][0]["diagnostics"]
    assert root["status"] == StatusCode.ERROR
    fetch = root["kids"][0]
    assert fetch["name"] == "sql fetch"
    assert fetch["status"] == StatusCode.ERROR
    # the class of the error the client got (the adapter's, translated at the boundary)
    assert r.status_code == 503
    assert fetch["span"].status.description == "ServiceUnavailable"
    assert not fetch["span"].events  # no exception event: its message could quote data


async def test_off_by_default_no_layer_and_no_trace_id(demo_sqlite_url: str,
                                                       tmp_path: Path) -> None:
    assert not tracing.enabled()
    missing = tmp_path / "nothing-here" / "pas.sqlite"
    app = build_app(gateway_settings(f"sqlite:///{missing}", tmp_path,
                                     audit_log=str(tmp_path / "audit.jsonl")))
    assert not any(m.cls is tracing.TracingLayer for m in app.user_middleware)
    async for c in _client(app):
        r = await c.get("/STU3/Patient/100001")
    assert r.status_code >= 500
    assert "trace id" not in r.text


def test_the_otlp_exporter_is_set_up_from_the_setting() -> None:
    with pytest.raises(tracing.TracingUnavailable):
        tracing.configure("zipkin")
    assert not tracing.enabled()
    tracing.configure("otlp")  # exports in batches, off the request path; nothing sent here
    try:
        assert tracing.enabled()
    finally:
        tracing.disable()
    assert not tracing.enabled()


async def test_a_sampled_out_request_has_no_spans_but_still_a_trace_id(
        tmp_path: Path) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use_provider(provider)
    try:
        missing = tmp_path / "nothing-here" / "pas.sqlite"
        app = build_app(gateway_settings(f"sqlite:///{missing}", tmp_path,
                                         audit_log=str(tmp_path / "audit.jsonl")))
        async for c in _client(app):
            r = await c.get("/STU3/Patient/100001")
    finally:
        tracing.disable()
    assert r.status_code == 503
    assert memory.get_finished_spans() == ()
    assert "(trace id " in r.json()["issue"][0]["diagnostics"]  # for the support call
