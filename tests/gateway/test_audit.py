"""The audit trail: a record per patient touched for every access and denial, written before the
response is released, failing the request closed when it cannot be written."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import structlog.testing
from starlette.applications import Starlette

from adapters.base import Query
from gateway import audit
from gateway.audit import AuditTrail, JsonLinesSink, classify
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio


def _records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


@pytest.fixture
async def app(demo_sqlite_url: str, make_app: Callable[..., Starlette], audit_path: Path
              ) -> AsyncIterator[Starlette]:
    audit_path.parent.mkdir()
    application = make_app(demo_sqlite_url, auth_mode="insecure-demo",
                           audit_log=str(audit_path),
                           audit_fhir_log=str(audit_path.with_suffix(".fhir.jsonl")))
    install(application, {
        "clinician": user_token(),
        "P": patient_token("100001"),
        "practitioners-only": user_token("user/Practitioner.read"),
    })
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def api(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


async def test_a_read_is_one_complete_record(api: httpx.AsyncClient, audit_path: Path) -> None:
    r = await api.get("/STU3/Patient/100001?_format=json",
                      headers={**as_("clinician"), "X-Request-ID": "req-read-1"})
    assert r.status_code == 200
    [rec] = _records(audit_path)
    assert rec["logger"] == "gateway.audit" and rec["event"] == "access"
    assert rec["timestamp"].endswith("+00:00")
    assert rec["request_id"] == "req-read-1"
    assert (rec["client_id"], rec["user"], rec["role"]) == ("clinician-app", "dr-who",
                                                            "clinician")
    assert rec["source_ip"] == "203.0.113.7"
    assert rec["interaction"] == "read" and rec["resource_type"] == "Patient"
    assert rec["target"] == "Patient/100001"
    assert rec["patient"] == "100001" and rec["patient_count"] == 1
    assert rec["entities"] == ["Patient/100001"]
    assert rec["outcome"] == {"status": 200, "code": None, "result": "success"}
    assert rec["query"] == []  # _format is not part of what was asked
    [q] = rec["backend"]["queries"]
    assert q["adapter"] == "sql" and q["connection"] == "pas" and q["operation"] == "fetch"
    assert q["shape"] == "p.PATNT_REFNO in ?[1] order(p.PATNT_REFNO)"
    assert "100001" not in q["shape"]  # the shape never carries values


async def test_one_record_per_patient_with_the_normalised_search(
    api: httpx.AsyncClient, audit_path: Path
) -> None:
    r = await api.get("/STU3/Encounter?date=ge2020&_include=Encounter:patient"
                      "&_include=Encounter:practitioner&_count=5&_format=xml",
                      headers=as_("clinician"))
    assert r.status_code == 200
    records = _records(audit_path)
    patients = {rec["patient"] for rec in records}
    assert None in patients  # the practitioners: not patient data, in their own record
    patients.discard(None)
    assert len(patients) == records[0]["patient_count"] >= 2
    assert len({rec["request_id"] for rec in records}) == 1
    # every line has the same fields in the same order, ending timestamp, event, logger
    assert len({tuple(rec) for rec in records}) == 1
    assert list(records[0])[-3:] == ["timestamp", "event", "logger"]
    for rec in records:
        assert rec["query"] == [["date", "ge2020"], ["_include", "Encounter:patient"],
                                ["_include", "Encounter:practitioner"], ["_count", "5"]]
        if rec["patient"] is None:
            assert rec["entities"] and all(e.startswith("Practitioner/")
                                           for e in rec["entities"])
        else:
            assert f"Patient/{rec['patient']}" in rec["entities"]
            assert any(e.startswith("Encounter/") for e in rec["entities"])


async def test_denials_are_audited(api: httpx.AsyncClient, audit_path: Path) -> None:
    r = await api.get("/STU3/Patient/100002", headers=as_("practitioners-only"))
    assert r.status_code == 403
    r = await api.get("/STU3/Patient/100002", headers=as_("P"))
    assert r.status_code == 404  # another patient's record: not found, and audited as such
    r = await api.get("/STU3/Patient?family=smith&birthdate=ge1900&_page=tampered",
                      headers=as_("clinician"))
    assert r.status_code == 400
    denied, hidden, bad = _records(audit_path)
    assert denied["outcome"] == {"status": 403, "code": "ACCESS_DENIED", "result": "denied"}
    assert denied["patient"] == "100002" and denied["entities"] == []
    assert hidden["outcome"]["code"] == "RESOURCE_NOT_FOUND"
    assert hidden["patient"] == "100002" and hidden["context_patient"] == "100001"
    assert bad["outcome"]["code"] == "INVALID_PAGE_TOKEN"
    assert ["_page", "(paging link)"] not in bad["query"]  # planned: _page is not a criterion
    assert ["family", "smith"] in bad["query"]


async def test_errors_in_xml_are_coded_too(api: httpx.AsyncClient, audit_path: Path) -> None:
    r = await api.get("/STU3/Patient/100001/_history", headers={**as_("clinician"),
                                                               "Accept": "application/fhir+xml"})
    assert r.status_code == 501
    [rec] = _records(audit_path)
    assert rec["outcome"]["code"] == "NOT_IMPLEMENTED" and rec["interaction"] == "history"


async def test_a_patient_restricted_count_is_about_the_patient(
    api: httpx.AsyncClient, audit_path: Path
) -> None:
    r = await api.get("/STU3/Encounter?_summary=count", headers=as_("P"))
    assert r.status_code == 200
    [rec] = _records(audit_path)
    assert rec["patient"] == "100001" and rec["entities"] == []
    # one count per Encounter source, each confined to the patient
    assert [q["operation"] for q in rec["backend"]["queries"]] == ["count"] * 3
    assert sorted(q["shape"] for q in rec["backend"]["queries"]) == [
        "e.PATNT_REFNO=?", "o.PATNT_REFNO=?", "s.PATNT_REFNO=?"]


async def test_health_probes_are_not_audited(api: httpx.AsyncClient, audit_path: Path) -> None:
    assert (await api.get("/_health")).status_code == 200
    assert _records(audit_path) == []


async def test_an_unexpected_error_is_audited(
    api: httpx.AsyncClient, app: Starlette, audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Any, query: Query) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(type(app.state.registry.get("Patient")), "_fetch", broken)
    r = await api.get("/STU3/Patient/100001", headers=as_("clinician"))
    assert r.status_code == 500
    [rec] = _records(audit_path)
    assert rec["outcome"] == {"status": 500, "code": "INTERNAL_SERVER_ERROR",
                              "result": "failure"}


async def test_fhir_audit_events_are_valid_stu3(api: httpx.AsyncClient, audit_path: Path) -> None:
    await api.get("/STU3/Patient/100001", headers=as_("clinician"))
    await api.get("/STU3/Encounter?patient=100001&_include=Encounter:practitioner",
                  headers=as_("P"))
    await api.get("/STU3/Patient/100002", headers=as_("practitioners-only"))
    from fhir.resources.STU3.auditevent import AuditEvent

    events = _records(audit_path.with_suffix(".fhir.jsonl"))
    assert len(events) == len(_records(audit_path)) >= 4
    for event in events:
        AuditEvent.model_validate(event)
    read = events[0]
    assert read["action"] == "R" and read["outcome"] == "0"
    assert read["subtype"][0]["code"] == "read"
    assert read["entity"][0]["reference"]["reference"] == "Patient/100001"
    assert read["entity"][0]["role"]["code"] == "1"  # patient
    assert {a["userId"]["value"] for a in read["agent"]} == {"clinician-app", "dr-who"}
    search = events[1]
    assert search["action"] == "E"
    assert any(e.get("role", {}).get("code") == "24" for e in search["entity"])  # the query
    denied = events[-1]
    assert denied["outcome"] == "4" and denied["outcomeDesc"] == "ACCESS_DENIED"


# --- a sink that cannot be written fails the request ---------------------------------------


class FullDisk:
    def write_lines(self, lines: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


async def test_a_failing_sink_fails_the_request(api: httpx.AsyncClient, app: Starlette) -> None:
    app.state.audit.sink.close()
    app.state.audit.sink = FullDisk()
    with structlog.testing.capture_logs() as logs:
        r = await api.get("/STU3/Patient/100001", headers=as_("clinician"))
    assert r.status_code == 503
    body = r.json()
    assert body["issue"][0]["details"]["coding"][0]["code"] == "AUDIT_UNAVAILABLE"
    assert "Smith" not in r.text and "100001" not in r.text  # the data was not served
    assert r.headers["x-request-id"]
    assert any(e["event"] == "audit_write_failed" for e in logs)
    # denials fail closed too; a failed record for an error still leaves an error
    r = await api.get("/STU3/Patient/100001", headers=as_("practitioners-only"))
    assert r.status_code == 503


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_full_disk_fails_the_request(demo_sqlite_url: str,
                                             make_app: Callable[..., Starlette]) -> None:
    application = make_app(demo_sqlite_url, auth_mode="insecure-demo", audit_log="/dev/full")
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            r = await c.get("/STU3/Patient/100001")
            assert r.status_code == 503
            assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "AUDIT_UNAVAILABLE"


async def test_fail_open_is_a_decision(demo_sqlite_url: str,
                                       make_app: Callable[..., Starlette]) -> None:
    application = make_app(demo_sqlite_url, auth_mode="insecure-demo", audit_log="stderr",
                           audit_fail_closed=False)
    application.state.audit.sink = FullDisk()
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            with structlog.testing.capture_logs() as logs:
                r = await c.get("/STU3/Patient/100001")
    assert r.status_code == 200
    assert [e["fail_closed"] for e in logs if e["event"] == "audit_write_failed"] == [False]


def test_an_unwritable_destination_stops_the_server_starting(
    demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path
) -> None:
    with pytest.raises(OSError):
        make_app(demo_sqlite_url, auth_mode="insecure-demo",
                 audit_log=str(tmp_path / "no-such-dir" / "audit.jsonl"))
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OSError):
            make_app(demo_sqlite_url, auth_mode="insecure-demo", audit_log=str(ro / "a.jsonl"))


def test_the_stream_follows_a_replaced_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    trail = AuditTrail("stderr")
    trail.emit([{"event": "access", "patient": "1"}])
    err = capsys.readouterr().err
    rec = orjson.loads(err.strip())
    assert rec["patient"] == "1" and rec["logger"] == "gateway.audit"
    # the audit stream is not the application log
    assert capsys.readouterr().out == ""


def test_the_sink_raises_on_a_closed_file(tmp_path: Path) -> None:
    sink = JsonLinesSink(str(tmp_path / "a.jsonl"))
    sink.write_lines([b"{}"])
    sink._file.close()  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        sink.write_lines([b"{}"])


def test_a_requests_records_go_in_one_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    writes: list[int] = []
    real = trail.sink._file
    assert real is not None

    class Counting:  # the real file underneath; counts the system calls asked of it
        def write(self, data: bytes | memoryview) -> int | None:
            writes.append(len(data))
            return real.write(data)

        def close(self) -> None:
            real.close()

    trail.sink._file = Counting()  # type: ignore[assignment]
    trail.emit([{"event": "access", "patient": str(i), "outcome": "success"} for i in range(17)])
    trail.close()
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line)["patient"] for line in lines] == [str(i) for i in range(17)]
    assert len(writes) == 1


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/STU3/metadata", ("capabilities", None)),
    ("GET", "/STU3/Patient", ("search-type", "Patient")),
    ("POST", "/STU3/Patient", ("create", "Patient")),
    ("POST", "/STU3/Patient/_search", ("search-type", "Patient")),
    ("GET", "/STU3/Patient/1", ("read", "Patient")),
    ("PUT", "/STU3/Patient/1", ("update", "Patient")),
    ("POST", "/STU3/Patient/$validate", ("operation", "Patient")),
    ("GET", "/STU3/Patient/1/$validate", ("operation", "Patient")),
    ("POST", "/STU3/$process-message", ("operation", None)),
    ("GET", "/STU3/Patient/1/_history", ("history", "Patient")),
    ("GET", "/elsewhere", ("unknown", None)),
])
def test_interactions_are_classified(method: str, path: str, expected: tuple[str, Any]) -> None:
    assert classify(method, path, "/STU3") == expected


def test_query_values_are_bounded() -> None:
    pairs = [("family", "x" * 5000)] + [(f"p{i}", "v") for i in range(100)]
    out = audit._normalise(pairs)
    assert len(out) == audit.MAX_QUERY_PAIRS + 1
    assert len(out[0][1]) < 300 and out[0][1].endswith("(truncated)")


# --- HL7 v2: MSH-10 correlation, and a failing sink stops a write before the PAS sees it --------


@pytest.fixture
async def hl7(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any, Starlette]]:
    from gateway.app import build_app
    from gateway.demo_pas import ensure_sqlite_demo
    from gateway.demo_pas.hl7v2 import PasSimulator
    from gateway.settings import Settings

    db = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(db, patients=50, progress=False)
    mappings = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2"
    async with PasSimulator(f"sqlite:///{db}") as sim:
        application = build_app(Settings(
            mappings_dir=mappings, data_dir=tmp_path, paging_secret="t", log_level="warning",
            progress=False, auth_mode="insecure-demo", audit_log=str(tmp_path / "audit.jsonl"),
            connection_urls={"pas": f"sqlite:///{db}",
                             "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                yield c, sim, application


async def test_hl7_control_ids_are_in_the_record(
    hl7: tuple[httpx.AsyncClient, Any, Starlette], tmp_path: Path
) -> None:
    api, sim, _app = hl7
    r = await api.get("/STU3/Patient/D0000001")
    assert r.status_code == 200
    [rec] = _records(tmp_path / "audit.jsonl")
    assert rec["backend"]["sent"] == [f"pas-hl7:MSH-10={sim.received[-1]}"]
    assert rec["patient"] == "D0000001" and rec["client_id"] == "insecure-demo"


async def test_a_failing_sink_stops_a_write_before_the_backend(
    hl7: tuple[httpx.AsyncClient, Any, Starlette]
) -> None:
    from tests.adapters.hl7v2.test_adapter import NEW_PATIENT

    api, sim, application = hl7
    application.state.audit.sink.close()
    application.state.audit.sink = FullDisk()
    before = len(sim.received)
    r = await api.post("/STU3/Patient", json=NEW_PATIENT,
                       headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 503
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "AUDIT_UNAVAILABLE"
    assert len(sim.received) == before  # no A28 was sent: nothing was written unaudited


async def test_the_attempt_record_names_the_caller(
    hl7: tuple[httpx.AsyncClient, Any, Starlette], tmp_path: Path
) -> None:
    # issue 13: attempts were written before authentication ran, naming nobody
    from tests.adapters.hl7v2.test_adapter import NEW_PATIENT

    api, _sim, _app = hl7
    r = await api.post("/STU3/Patient", json=NEW_PATIENT,
                       headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    attempt, access = _records(tmp_path / "audit.jsonl")
    assert attempt["event"] == "attempt" and access["event"] == "access"
    assert attempt["outcome"]["result"] == "attempt"
    assert attempt["client_id"] == "insecure-demo" == access["client_id"]
    assert attempt["scopes"] == access["scopes"] and attempt["scopes"]
    assert attempt["auth_mode"] == "insecure-demo"
    # a write refused before it reaches the backend has no attempt: it attempted nothing
    r = await api.post("/STU3/Patient", json={"resourceType": "Patient", "gender": "x"},
                       headers={"Content-Type": "application/fhir+json"})
    assert r.status_code in (400, 422)
    assert [x["event"] for x in _records(tmp_path / "audit.jsonl")][2:] == ["access"]


def test_production_must_choose_the_audit_destination(tmp_path: Path) -> None:
    from gateway.audit import AuditConfigError, destination
    from gateway.auth.errors import AuthConfigError
    from gateway.settings import Settings

    demo = Settings(data_dir=tmp_path / "data")
    assert destination(demo) == str(tmp_path / "data" / "audit.jsonl")  # never the terminal
    assert (tmp_path / "data").is_dir()
    with pytest.raises(AuditConfigError) as info:
        destination(Settings(data_dir=tmp_path, env="production"))
    assert isinstance(info.value, AuthConfigError)  # the CLI reports it and exits 2
    assert "CCG_AUDIT_LOG" in str(info.value)
    chosen = Settings(data_dir=tmp_path, env="production", audit_log="/var/log/ccg/audit.jsonl")
    assert destination(chosen) == "/var/log/ccg/audit.jsonl"
    # Any other mapping directory is a production configuration: stderr only when chosen.
    with pytest.raises(AuditConfigError):
        destination(Settings(data_dir=tmp_path, mappings_dir=tmp_path))
    assert destination(Settings(data_dir=tmp_path, mappings_dir=tmp_path,
                                audit_log="stderr")) == "stderr"


async def test_an_authentication_failure_is_audited(
    demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path
) -> None:
    """A 401 answered by the authentication layer, before any route, is still recorded."""
    log = tmp_path / "audit.jsonl"
    application = make_app(demo_sqlite_url, auth_mode="jwt", audit_log=str(log))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            r = await c.get("/STU3/Patient/100001")
            assert r.status_code == 401
            assert (await c.get("/STU3/metadata")).status_code == 200  # public, audited too
    denied, metadata = _records(log)
    assert denied["outcome"]["status"] == 401 and denied["outcome"]["result"] == "denied"
    assert denied["outcome"]["code"] == "AUTHENTICATION_REQUIRED"
    assert denied["client_id"] is None and denied["target"] == "Patient/100001"
    assert denied["patient"] == "100001" and denied["entities"] == []
    assert metadata["interaction"] == "capabilities" and metadata["patient"] is None


# --- the record line, the sink after close, the shape hashes -----------------------------------


class Lines:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        self.lines.append(line)

    def write_lines(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    msg = info = write

    def close(self) -> None:
        pass


def test_a_record_line_is_the_one_the_structlog_logger_wrote() -> None:
    """The trail used to render records through a structlog logger of its own; the line is
    unchanged, to the byte (key order included)."""
    import logging

    def logger_name(_l: Any, _m: str, event: dict[str, Any]) -> dict[str, Any]:
        event["logger"] = "gateway.audit"
        return event

    before = Lines()
    old = structlog.wrap_logger(
        before, processors=[logger_name, structlog.processors.JSONRenderer(
            serializer=orjson.dumps)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        cache_logger_on_first_use=False)
    trail = AuditTrail(os.devnull)
    trail.sink.close()
    trail.sink = now = Lines()  # type: ignore[assignment]
    record: dict[str, Any] = {
        "event": "access", "request_id": "r-1", "client_id": None, "source_ip": "203.0.113.7",
        "query": [["family", "Smïth"], ["_count", "5"]], "path": "/STU3/Patient",
        "outcome": {"status": 200, "code": None, "result": "success"},
        "backend": {"sent": [], "queries": [{"shape": "p.X in ?[1]", "shape_id": "abc"}]},
        "patient": "100001", "patient_count": 1, "entities": ["Patient/100001"],
        "odd": {"frozen": frozenset({"x"})},  # not JSON: the renderer's fallback, both ways
    }
    trail.emit([record])
    old.info(record["event"], **{k: v for k, v in record.items() if k != "event"})
    assert now.lines == before.lines
    assert list(orjson.loads(now.lines[0]))[-3:] == ["timestamp", "event", "logger"]


def test_a_closed_file_sink_raises_and_never_falls_back_to_stderr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sink = JsonLinesSink(str(tmp_path / "a.jsonl"))
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.write_lines([b'{"patient":"100001"}'])
    assert capsys.readouterr().err == ""


async def test_a_request_after_the_trail_closed_is_not_served(
        api: httpx.AsyncClient, app: Starlette, capfd: pytest.CaptureFixture[str]) -> None:
    app.state.audit.close()  # as at shutdown
    r = await api.get("/STU3/Patient/100001", headers=as_("clinician"))
    assert r.status_code == 503
    assert "100001" not in capfd.readouterr().err  # the record did not go to stderr


def test_shape_hashes_are_cached_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setattr(audit, "_SHAPE_IDS", {})
    monkeypatch.setattr(audit, "_MAX_SHAPE_IDS", 3)
    shapes = [f"p.X in ?[{n}] order(p.X)" for n in range(5)] + ["s.Y=?" * 200]
    for shape in shapes * 2:
        assert audit._shape_id(shape) == hashlib.sha256(shape.encode()).hexdigest()[:12]
        assert len(audit._SHAPE_IDS) <= 3
    assert shapes[-1] not in audit._SHAPE_IDS  # a long shape is hashed, not kept
