"""Resource limits: body size, _count, _include fan-out, per-client rates, concurrency, and XML
parsed safely (billion laughs, external entities, XInclude — in UTF-8 and UTF-16)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from starlette.applications import Starlette

from gateway.limits import TokenBuckets, client_key
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio


def _code(r: httpx.Response) -> str:
    code: str = r.json()["issue"][0]["details"]["coding"][0]["code"]
    return code


@pytest.fixture
def build(demo_sqlite_url: str, make_app: Callable[..., Starlette]
          ) -> Callable[..., Any]:
    def make(**settings: Any) -> Starlette:
        app = make_app(demo_sqlite_url, auth_mode="insecure-demo", **settings)
        install(app, {"a": user_token(client_id="client-a"), "b": user_token(client_id="client-b"),
                      "P": patient_token("100001")})
        return app

    return make


@asynccontextmanager
async def _client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


@pytest.fixture
async def api(build: Callable[..., Starlette]) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(build(max_body_bytes=2000, max_count=7, include_limit=3)) as c:
        yield c


# --- body size ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/STU3/Patient/$validate", "/STU3/Patient/_search",
                                  "/STU3/Patient", "/STU3/no-such-endpoint"])
async def test_a_declared_oversized_body_is_413_before_anything_reads_it(
    api: httpx.AsyncClient, path: str
) -> None:
    r = await api.post(path, content=b"x" * 2001,
                       headers={"Content-Type": "application/fhir+json", **as_("a")})
    assert r.status_code == 413 and _code(r) == "PAYLOAD_TOO_LARGE"


async def test_a_streamed_oversized_body_is_413(api: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b'{"resourceType": "Patient", "id": "' + b"x" * 300

    r = await api.post("/STU3/Patient/$validate", content=chunks(),
                       headers={"Content-Type": "application/fhir+json", **as_("a")})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413 and _code(r) == "PAYLOAD_TOO_LARGE"


async def test_a_body_within_the_limit_is_served(api: httpx.AsyncClient) -> None:
    body = orjson.dumps({"resourceType": "Patient", "gender": "female"})
    r = await api.post("/STU3/Patient/$validate", content=body,
                       headers={"Content-Type": "application/fhir+json", **as_("a")})
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"


# --- _count and _include fan-out ---------------------------------------------------------------


async def test_count_is_capped(api: httpx.AsyncClient) -> None:
    r = await api.get("/STU3/Encounter?_count=999999", headers=as_("a"))
    bundle = r.json()
    assert len(bundle["entry"]) == 7
    assert any(ln["relation"] == "next" for ln in bundle["link"])
    assert (await api.get("/STU3/Encounter?_count=9999999", headers=as_("a"))).status_code == 400


async def test_include_beyond_the_limit_is_reported_not_silently_cut(
    api: httpx.AsyncClient
) -> None:
    r = await api.get("/STU3/Encounter?class=IMP,SS&_count=7&_include=Encounter:patient",
                      headers=as_("a"))
    entries = r.json()["entry"]
    patients = [e for e in entries if e["resource"]["resourceType"] == "Patient"]
    outcomes = [e for e in entries if e["search"]["mode"] == "outcome"]
    assert len(patients) == 3
    [oo] = outcomes
    issue = oo["resource"]["issue"][0]
    assert issue["severity"] == "warning" and issue["code"] == "too-costly"
    assert issue["details"]["coding"][0]["code"] == "INCLUDE_LIMIT"
    assert "_include=Encounter:patient:Patient" in issue["diagnostics"]


async def test_revinclude_beyond_the_limit_is_reported(api: httpx.AsyncClient) -> None:
    r = await api.get("/STU3/Encounter?class=IMP,SS&_count=7", headers=as_("a"))
    spells = r.json()["entry"]
    consultants = {e["resource"]["participant"][0]["individual"]["reference"].split("/")[1]
                   for e in spells}
    r = await api.get(f"/STU3/Practitioner?_id={','.join(sorted(consultants))}"
                      "&_revinclude=Encounter:practitioner", headers=as_("a"))
    entries = r.json()["entry"]
    assert len([e for e in entries if e["resource"]["resourceType"] == "Encounter"]) == 3
    [oo] = [e for e in entries if e["search"]["mode"] == "outcome"]
    assert "_revinclude=Encounter:practitioner" in oo["resource"]["issue"][0]["diagnostics"]


async def test_within_the_limit_there_is_no_warning(api: httpx.AsyncClient) -> None:
    r = await api.get("/STU3/Encounter?_count=2&_include=Encounter:patient", headers=as_("a"))
    assert not [e for e in r.json()["entry"] if e["search"]["mode"] == "outcome"]


async def test_a_repeated_include_is_fetched_once(build: Callable[..., Starlette],
                                                  tmp_path: Path) -> None:
    audit_log = tmp_path / "a.jsonl"
    async with _client(build(audit_log=str(audit_log))) as api:
        # 45: within max_search_parameters (50; more is 400 TOO_MANY_PARAMETERS)
        query = "&".join(["_include=Encounter:patient"] * 45)
        r = await api.get(f"/STU3/Encounter?_count=3&{query}", headers=as_("a"))
        assert r.status_code == 200
    rec = orjson.loads(audit_log.read_bytes().splitlines()[0])
    # the search (one statement per Encounter source) and one include, not 45
    assert [q["resource_type"] for q in rec["backend"]["queries"]] == ["Encounter"] * 3 + [
        "Patient"]


# --- per-client rate limits --------------------------------------------------------------------


async def test_rate_limit_is_per_client_with_retry_after(build: Callable[..., Starlette],
                                                         tmp_path: Path) -> None:
    audit_log = tmp_path / "a.jsonl"
    async with _client(build(rate_limit_per_minute=6, rate_limit_burst=3,
                             audit_log=str(audit_log))) as api:
        for _ in range(3):
            assert (await api.get("/STU3/Practitioner/1", headers=as_("a"))).status_code == 200
        r = await api.get("/STU3/Practitioner/1", headers=as_("a"))
        assert r.status_code == 429 and _code(r) == "RATE_LIMITED"
        assert int(r.headers["Retry-After"]) >= 1
        # another client has its own bucket; probes are never limited
        assert (await api.get("/STU3/Practitioner/1", headers=as_("b"))).status_code == 200
        assert (await api.get("/_health")).status_code == 200
    last = orjson.loads(audit_log.read_bytes().splitlines()[3])
    assert last["outcome"] == {"status": 429, "code": "RATE_LIMITED", "result": "denied"}
    assert last["client_id"] == "client-a"


def test_token_bucket_refills_and_is_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=2, max_keys=3, clock=lambda: now[0])
    assert buckets.take("x") == 0 and buckets.take("x") == 0
    assert buckets.take("x") == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("x") == 0
    for key in ("a", "b", "c", "d"):
        buckets.take(key)
    assert len(buckets._buckets) == 3 and "x" not in buckets._buckets


def test_client_key_falls_back_to_the_source_address() -> None:
    assert client_key({"client": ("198.51.100.4", 1), "state": {}}) == "ip:198.51.100.4"
    scope = {"client": ("198.51.100.4", 1), "state": {"principal": user_token(client_id="c")}}
    assert client_key(scope) == "client:c"
    assert client_key({"state": {}}) == "ip:unknown"


# --- concurrency --------------------------------------------------------------------------------


async def test_in_flight_requests_are_capped(build: Callable[..., Starlette],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    app = build(max_in_flight=1)
    entered, release = anyio.Event(), anyio.Event()
    provider_type = type(app.state.registry.get("Practitioner"))
    original = provider_type._fetch

    async def slow(self: Any, query: Any) -> Any:
        entered.set()
        await release.wait()
        return await original(self, query)

    monkeypatch.setattr(provider_type, "_fetch", slow)
    async with _client(app) as api:
        results: list[httpx.Response] = []

        async def first() -> None:
            results.append(await api.get("/STU3/Practitioner/1", headers=as_("a")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await entered.wait()
            busy = await api.get("/STU3/Practitioner/2", headers=as_("b"))
            assert busy.status_code == 503 and _code(busy) == "SERVER_BUSY"
            assert busy.headers["Retry-After"] == "1"
            assert (await api.get("/_health")).status_code == 200
            release.set()
        assert results[0].status_code == 200
        monkeypatch.setattr(provider_type, "_fetch", original)
        assert (await api.get("/STU3/Practitioner/2", headers=as_("b"))).status_code == 200


@pytest.mark.parametrize(("setting", "most"), [(None, 4), (2, 2), (0, 12)])
async def test_a_clients_backend_calls_queue_at_what_the_pool_allows(
        build: Callable[..., Starlette], monkeypatch: pytest.MonkeyPatch,
        setting: int | None, most: int) -> None:
    """Unset, the per-client backend queue is one less than the smallest connection pool (the
    demo's pool_size is 5): a lone busy client's searches run 4 at a time, not 2, and another
    client's search still goes first (it does not wait behind the busy one's queue). Reads by
    id are not queued at all: they share statements, one at a time per mapping."""
    from gateway import limits

    app = build(**({} if setting is None else {"max_backend_calls_per_client": setting}))
    adapter = app.state.registry.get("Patient").sources[0].mapping.adapter
    running: dict[tuple[str | None, bool], int] = {}
    peak: dict[tuple[str | None, bool], int] = {}
    finished: list[str] = []
    original = adapter.fetch

    async def counted(prepared: Any, query: Any) -> Any:  # the real adapter, observed
        who = (limits.current_client.get(), adapter.shares(prepared, query))
        running[who] = running.get(who, 0) + 1
        peak[who] = max(peak.get(who, 0), running[who])
        try:
            await anyio.sleep(0.05)
            return await original(prepared, query)
        finally:
            running[who] -= 1

    monkeypatch.setattr(adapter, "fetch", counted)
    async with _client(app) as api, anyio.create_task_group() as tg:
        async def get(who: str, path: str) -> None:
            r = await api.get(path, headers=as_(who))
            assert r.status_code == 200, r.text
            finished.append(f"{who} {path}")

        for i in range(12):
            tg.start_soon(get, "a", f"/STU3/Patient?family=smith&gender=female&_count={i + 1}")
            tg.start_soon(get, "a", f"/STU3/Patient/{100001 + i}")
        await anyio.sleep(0.01)
        tg.start_soon(get, "b", "/STU3/Patient?family=jones&gender=male")
    assert peak[("client:client-a", False)] == most  # searches: queued per client
    assert peak[("client:client-a", True)] == 12  # reads by id: never queued
    if setting != 0:  # with a queue, b's search is not behind a's twelve
        searches = [f for f in finished if "?" in f]
        assert searches.index("b /STU3/Patient?family=jones&gender=male") < len(searches) - 1


# --- XML parsed safely --------------------------------------------------------------------------

LAUGHS = """<?xml version="1.0" encoding="{enc}"?>
<!DOCTYPE lolz [<!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<Patient xmlns="http://hl7.org/fhir"><name><family value="&lol4;"/></name></Patient>"""
XXE = """<?xml version="1.0" encoding="{enc}"?>
<!DOCTYPE p [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Patient xmlns="http://hl7.org/fhir"><name><family value="&xxe;"/></name></Patient>"""
XXE_PARAM = """<?xml version="1.0" encoding="{enc}"?>
<!DOCTYPE p [<!ENTITY % ext SYSTEM "http://127.0.0.1:9/evil.dtd"> %ext;]>
<Patient xmlns="http://hl7.org/fhir"><gender value="female"/></Patient>"""
XINCLUDE = """<?xml version="1.0" encoding="{enc}"?>
<Patient xmlns="http://hl7.org/fhir" xmlns:xi="http://www.w3.org/2001/XInclude">
<name><family value="a"/></name><xi:include href="file:///etc/passwd" parse="text"/></Patient>"""


def _encoded(template: str, enc: str) -> bytes:
    text = template.format(enc=enc)
    return text.encode("utf-16") if enc == "UTF-16" else text.encode("utf-8")


@pytest.mark.parametrize("enc", ["UTF-8", "UTF-16"])
@pytest.mark.parametrize("name", ["laughs", "xxe", "xxe-parameter", "xinclude", "lowercase"])
async def test_hostile_xml_is_refused(api: httpx.AsyncClient, name: str, enc: str) -> None:
    template = {"laughs": LAUGHS, "xxe": XXE, "xxe-parameter": XXE_PARAM, "xinclude": XINCLUDE,
                "lowercase": XXE.replace("DOCTYPE", "doctype").replace("ENTITY", "entity")}[name]
    for path in ("/STU3/Patient/$validate", "/STU3/Patient"):
        r = await api.post(path, content=_encoded(template, enc),
                           headers={"Content-Type": "application/fhir+xml", **as_("a")})
        assert r.status_code in (400, 405), (name, enc, path, r.text)
        if r.status_code == 400:
            assert _code(r) == "BAD_REQUEST"
        assert "root:" not in r.text and "lollol" not in r.text


async def test_safe_xml_is_still_read(api: httpx.AsyncClient) -> None:
    body = ('<?xml version="1.0" encoding="UTF-8"?><Patient xmlns="http://hl7.org/fhir">'
            '<name><family value="Zoë"/></name><gender value="female"/></Patient>').encode()
    r = await api.post("/STU3/Patient/$validate", content=b"\xef\xbb\xbf" + body,
                       headers={"Content-Type": "application/fhir+xml", **as_("a")})
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"
