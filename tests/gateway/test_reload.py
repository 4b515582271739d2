"""Safe reload of the mappings: check fully, swap atomically, keep the old on a bad directory,
requests in flight finish on their own mappings, paging links survive or fail with a 400.

In-process (the same app, real SQLite) for the details, then a real ``careconnect-gateway
serve`` process sent SIGHUP, over real HTTP — and over HL7 v2 with the PAS simulator holding
a reply back while the mappings change under the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.settings import bundled_mappings_roots

pytestmark = pytest.mark.anyio
MAPPINGS = bundled_mappings_roots()[0]
KEY = "reload-test-key"
HEADERS = {"X-API-Key": KEY}
FEMALE_SMITHS = {"family": "smith", "gender": "female", "_count": "2"}
TITLE = "      family: {column: p.SURNAME, transform: title_case}"
UPPER = "      family: {column: p.SURNAME, transform: upper}"


def keys_file(tmp: Path) -> Path:
    f = tmp / "api-keys.yaml"
    f.write_text("keys: [{client_id: t, sha256: '" + hashlib.sha256(KEY.encode()).hexdigest()
                 + "', scopes: system/*.read}]")
    return f


def copy_mappings(tmp: Path, *names: str, cases: bool = False) -> Path:
    """A copy to edit; without the demo's cases (they pin the values the tests change)."""
    for name in (*names, "codemaps"):
        shutil.copytree(MAPPINGS / name, tmp / "m" / name)
        if not cases:
            shutil.rmtree(tmp / "m" / name / "cases", ignore_errors=True)
    return tmp / "m" / names[0]


def edit(path: Path, old: str, new: str) -> int:
    """Replace one line; its line number."""
    lines = path.read_text(encoding="utf-8").split("\n")
    at = lines.index(old)
    lines[at] = new
    path.write_text("\n".join(lines), encoding="utf-8")
    return at + 1


def families(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["name"][0]["family"] for e in bundle.get("entry", [])
            if e["resource"]["resourceType"] == "Patient"]


def next_link(bundle: dict[str, Any]) -> str:
    return next(link["url"] for link in bundle["link"] if link["relation"] == "next")


# --- in-process ---------------------------------------------------------------------------------


@pytest.fixture
async def served(demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path
                 ) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette, Path]]:
    directory = copy_mappings(tmp_path, "demo-pas")
    app = make_app(demo_sqlite_url, mappings_dir=directory, auth_mode="api-key",
                   api_keys_file=str(keys_file(tmp_path)),
                   audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     headers=HEADERS) as client:
            yield client, app, directory


async def test_a_good_reload_swaps_and_a_bad_one_keeps_the_old(
        served: tuple[httpx.AsyncClient, Starlette, Path]) -> None:
    client, app, directory = served
    live = app.state.mappings
    first = (await client.get("/STU3/Patient", params=FEMALE_SMITHS)).json()
    assert families(first) == ["Smith", "Smith"]
    link = next_link(first)

    patient = directory / "Patient.sql.yaml"
    edit(patient, TITLE, UPPER)
    result = await live.reload()
    assert result.ok and result.generation == 2 and not result.problems
    assert families((await client.get("/STU3/Patient", params=FEMALE_SMITHS)).json()) == [
        "SMITH", "SMITH"]
    # a paging link from before the reload: the same search, the same sort: it still works
    page = await client.get(link.replace("http://gw", ""))
    assert page.status_code == 200 and families(page.json()) == ["SMITH", "SMITH"]

    # a bad directory: every problem with file:line, and nothing changes
    line = edit(patient, UPPER, "      family: {column: p.SURNAME, transform: shout}")
    codemap = directory.parent / "codemaps" / "sex.yaml"
    codemap.write_text(codemap.read_text().replace("unmapped: error", "unmapped: maybe"))
    result = await live.reload()
    assert not result.ok and result.generation == 2
    assert any(p.startswith(f"{patient}:{line}: ") and "shout" in p for p in result.problems)
    assert any(p.startswith(f"{codemap}:") for p in result.problems)
    assert families((await client.get("/STU3/Patient", params=FEMALE_SMITHS)).json()) == [
        "SMITH", "SMITH"]
    assert live.current.number == 2


async def test_the_operations_are_reloaded_with_the_providers(
        served: tuple[httpx.AsyncClient, Starlette, Path]) -> None:
    """operations/*.yaml are part of the generation: swapped with the providers they are
    checked against, or not at all."""
    client, app, directory = served
    live = app.state.mappings
    op_file = directory / "operations" / "structured-record.yaml"
    path = "/STU3/OperationDefinition/structured-record"
    assert (await client.get(path)).json()["name"] == "Structured record of a patient"
    old_ops = live.operations
    # a second operation, and a new title for the first
    second = op_file.read_text(encoding="utf-8").replace("name: structured-record",
                                                          "name: recent-stays")
    (directory / "operations" / "recent-stays.yaml").write_text(second, encoding="utf-8")
    edit(op_file, "title: Structured record of a patient", "title: Recent care")
    result = await live.reload()
    assert result.ok, result.problems
    assert live.operations is not old_ops and live.current.operations is live.operations
    assert (await client.get(path)).json()["name"] == "Recent care"
    served_ops = {o["name"] for o in
                  (await client.get("/STU3/metadata")).json()["rest"][0]["operation"]}
    assert {"structured-record", "recent-stays"} <= served_ops
    r = await client.get("/STU3/Patient/100001/$recent-stays", params={"recentEncounters": "1"})
    assert r.status_code == 200, r.text
    assert r.json()["resourceType"] == "Bundle"
    # a section sorting by a key Encounter cannot sort by: the whole reload is refused
    text = op_file.read_text(encoding="utf-8").replace("sort: -date", "sort: -no-such-key", 1)
    op_file.write_text(text, encoding="utf-8")
    line = next(i for i, x in enumerate(text.split("\n"), 1) if "-no-such-key" in x)
    # ... and a mapping change made in the same edit is not half-applied
    edit(directory / "Patient.sql.yaml", TITLE, UPPER)
    result = await live.reload()
    assert not result.ok and result.generation == 2
    assert any(p.startswith(f"{op_file}:{line}:") for p in result.problems), result.problems
    assert (await client.get(path)).json()["name"] == "Recent care"
    assert families((await client.get("/STU3/Patient", params=FEMALE_SMITHS)).json()) == [
        "Smith", "Smith"]


async def test_documents_are_reloaded_with_the_providers(
        served: tuple[httpx.AsyncClient, Starlette, Path]) -> None:
    """documents/*.yaml are part of the generation too: $document changes with a reload, and
    a bad declaration refuses the whole reload."""
    client, app, directory = served
    live = app.state.mappings
    doc_file = directory / "documents" / "patient-summary.yaml"
    path = "/STU3/Patient/100001/$document"

    def title(bundle: dict[str, Any]) -> str:
        return str(bundle["entry"][0]["resource"]["title"])

    r = await client.get(path)
    assert r.status_code == 200, r.text
    before = title(r.json())
    text = doc_file.read_text(encoding="utf-8")
    old_title = next(x for x in text.split("\n") if x.startswith("title: "))
    edit(doc_file, old_title, "title: Summary after a reload")
    result = await live.reload()
    assert result.ok, result.problems
    after = (await client.get(path)).json()
    assert title(after) == "Summary after a reload" != before
    # a section over a type nobody serves: refused with file:line, the reloaded one serves on
    text = doc_file.read_text(encoding="utf-8")
    line = next(i for i, x in enumerate(text.split("\n"), 1)
                if x.strip().startswith("resource: "))
    lines = text.split("\n")
    lines[line - 1] = lines[line - 1].split("resource:")[0] + "resource: NoSuchType"
    doc_file.write_text("\n".join(lines), encoding="utf-8")
    result = await live.reload()
    assert not result.ok and result.generation == 2
    assert any(p.startswith(f"{doc_file}:{line}:") for p in result.problems), result.problems
    assert title((await client.get(path)).json()) == "Summary after a reload"


async def test_a_failing_case_stops_the_reload(
        served: tuple[httpx.AsyncClient, Starlette, Path]) -> None:
    client, app, directory = served
    shutil.copytree(MAPPINGS / "demo-pas" / "cases", directory / "cases")
    edit(directory / "Patient.sql.yaml", TITLE, UPPER)  # the cases expect "Jones"
    result = await app.state.mappings.reload()
    assert not result.ok
    assert any("Patient.name[0].family: expected \"Jones\", got \"JONES\"" in p
               for p in result.problems)
    assert families((await client.get("/STU3/Patient", params=FEMALE_SMITHS)).json()) == [
        "Smith", "Smith"]


async def test_a_link_whose_sort_changed_is_a_400(
        served: tuple[httpx.AsyncClient, Starlette, Path]) -> None:
    client, app, directory = served
    query = {**FEMALE_SMITHS, "_sort": "birthdate"}
    link = next_link((await client.get("/STU3/Patient", params=query)).json())
    edit(directory / "Patient.sql.yaml",
         "  birthdate: {type: date, column: p.DTTM_OF_BIRTH, description: Date of birth}",
         "  birthdate: {type: date, column: p.MODIF_DTTM, description: Date of birth}")
    assert (await app.state.mappings.reload()).ok
    r = await client.get(link.replace("http://gw", ""))
    assert r.status_code == 400, r.text
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "INVALID_PAGE_TOKEN"
    # the search itself, asked again, works under the new mappings
    assert (await client.get("/STU3/Patient", params=query)).status_code == 200


async def test_old_adapters_are_closed_once_drained(
        served: tuple[httpx.AsyncClient, Starlette, Path]) -> None:
    _, app, _ = served
    live = app.state.mappings
    old = live.current
    held = live.enter()  # a request in flight on generation 1
    assert (await live.reload()).ok
    assert old.retired and not old.closed and held is old
    assert live.registry is live.current.registry  # new requests: the new generation
    await live.leave(held)
    assert old.closed


# --- a real server: SIGHUP ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def executable() -> list[str]:
    script = Path(sys.executable).with_name("careconnect-gateway")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gateway.cli"]


class Server:
    def __init__(self, tmp: Path, mappings: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = tmp / "serve.out"
        self.err = tmp / "serve.err"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
        environ.update({"CCG_AUTH_MODE": "api-key", "CCG_API_KEYS_FILE": str(keys_file(tmp)),
                        "CCG_AUDIT_LOG": str(tmp / "audit.jsonl"), "CCG_DATA_DIR": str(tmp / "d"),
                        "CCG_DEMO_PATIENTS": "300", "CCG_PAGING_SECRET": "reload-test"}, **env)
        with self.out.open("wb") as o, self.err.open("wb") as e:
            self.proc = subprocess.Popen(
                [*executable(), "serve", "--port", str(self.port), "--mappings", str(mappings),
                 *args],
                stdout=o, stderr=e, env=environ, cwd=tmp)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.err.read_text()
            try:
                if httpx.get(self.url + "/_health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not come up"
            time.sleep(0.1)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.out.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == name:
                    out.append(record)
        return out

    def hup_and_wait(self, event: str, count: int) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while len(self.events(event)) < count:
            assert self.proc.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, f"no {event} after SIGHUP"
            time.sleep(0.05)
        return self.events(event)[count - 1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server_dir(tmp_path: Path) -> Iterator[tuple[Path, list[Server]]]:
    started: list[Server] = []
    yield copy_mappings(tmp_path, "demo-pas"), started
    for s in started:
        s.stop()


def test_sighup_reloads_a_real_server(server_dir: tuple[Path, list[Server]],
                                      tmp_path: Path) -> None:
    directory, started = server_dir
    server = Server(tmp_path, directory)
    started.append(server)
    assert server.events("started")[0]["reload_on_sighup"] is True
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=15) as c:
        first = c.get("/STU3/Patient", params=FEMALE_SMITHS).json()
        assert families(first) == ["Smith", "Smith"]
        link = next_link(first)

        patient = directory / "Patient.sql.yaml"
        edit(patient, TITLE, UPPER)
        done = server.hup_and_wait("mappings_reloaded", 1)
        assert done["generation"] == 2 and "Patient" in done["resources"]
        assert families(c.get("/STU3/Patient", params=FEMALE_SMITHS).json()) == ["SMITH", "SMITH"]
        assert c.get(link).status_code == 200  # a link from before the reload

        line = edit(patient, UPPER, "      family: {column: p.SURNAME, transform: shout}")
        refused = server.hup_and_wait("mappings_reload_refused", 1)
        assert refused["level"] == "error" and refused["generation"] == 2
        assert any(p.startswith(f"{patient}:{line}: ") for p in refused["problems"])
        # still serving, on the mappings before the bad edit
        assert families(c.get("/STU3/Patient", params=FEMALE_SMITHS).json()) == ["SMITH", "SMITH"]
        assert server.proc.poll() is None


def test_sighup_reloads_every_worker(server_dir: tuple[Path, list[Server]],
                                     tmp_path: Path) -> None:
    """``serve --workers 2``: SIGHUP to the parent reaches both workers; each re-reads, checks
    and swaps in place (no worker restarted), and a bad edit keeps both on the old mappings."""
    directory, started = server_dir
    server = Server(tmp_path, directory, "--workers", "2")
    started.append(server)

    def pids(event: str) -> set[int]:
        return {e["pid"] for e in server.events(event)}

    def served_families(n: int = 16) -> set[tuple[str, ...]]:
        # fresh connections: the kernel spreads them over both workers
        return {tuple(families(httpx.get(server.url + "/STU3/Patient", params=FEMALE_SMITHS,
                                         headers=HEADERS, timeout=15).json()))
                for _ in range(n)}

    deadline = time.monotonic() + 60
    while len(pids("started")) < 2:  # both workers up (the health check saw only one)
        assert time.monotonic() < deadline and server.proc.poll() is None
        time.sleep(0.1)
    workers = pids("started")
    assert served_families() == {("Smith", "Smith")}

    patient = directory / "Patient.sql.yaml"
    edit(patient, TITLE, UPPER)
    server.hup_and_wait("mappings_reloaded", 2)
    reloaded = server.events("mappings_reloaded")
    assert {e["pid"] for e in reloaded} == workers  # each worker, in place: the same pids
    assert all(e["generation"] == 2 for e in reloaded)
    assert served_families() == {("SMITH", "SMITH")}

    line = edit(patient, UPPER, "      family: {column: p.SURNAME, transform: shout}")
    server.hup_and_wait("mappings_reload_refused", 2)
    refused = server.events("mappings_reload_refused")
    assert {e["pid"] for e in refused} == workers
    assert all(any(p.startswith(f"{patient}:{line}: ") for p in e["problems"]) for e in refused)
    assert served_families() == {("SMITH", "SMITH")}  # both still on the good mappings
    assert pids("started") == workers and server.proc.poll() is None


async def test_a_request_in_flight_finishes_on_its_mappings(tmp_path: Path) -> None:
    """Over HL7 v2: the simulator holds a reply back; the mappings change and are reloaded
    meanwhile; the held request answers with the old mapping, the next with the new."""
    from gateway.demo_pas import ensure_sqlite_demo
    from gateway.demo_pas.hl7v2 import PasSimulator

    db = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(db, patients=300, progress=False)
    directory = copy_mappings(tmp_path, "demo-hl7v2", "demo-pas")
    patient = directory / "Patient.hl7v2.yaml"
    async with PasSimulator(f"sqlite:///{db}") as sim:
        server = await asyncio.to_thread(
            Server, tmp_path, directory, CCG_PAS_URL=f"sqlite:///{db}",
            CCG_PAS_HL7_URL=f"mllp://127.0.0.1:{sim.port}")
        try:
            async with httpx.AsyncClient(base_url=server.url, headers=HEADERS,
                                         timeout=30) as c:
                before = len(sim.received)
                sim.faults.delay_seconds, sim.faults.delay_count = 2.0, 1
                # the search's reply is held; its _include is read after the reload
                held = asyncio.create_task(c.get("/STU3/Encounter", params={
                    "patient": "D0000001", "_include": "Encounter:patient"}))
                while len(sim.received) == before:  # the query is at the PAS, held there
                    await asyncio.sleep(0.02)
                edit(patient, "      family: {field: PID-5.1, transform: title_case}",
                     "      family: {field: PID-5.1, transform: upper}")
                done = await asyncio.to_thread(server.hup_and_wait, "mappings_reloaded", 1)
                assert done["draining"] == 1  # the held request, still on generation 1
                fresh = await c.get("/STU3/Patient/D0000001")
                assert fresh.json()["name"][0]["family"] == "SMITH"  # the new mapping
                old = await held
                assert old.status_code == 200, old.text
                entries = old.json()["entry"]
                assert any(e["resource"]["resourceType"] == "Encounter" for e in entries)
                # the included Patient was built on the mapping the request began on
                assert families(old.json()) == ["Smith"]
        finally:
            await asyncio.to_thread(server.stop)
