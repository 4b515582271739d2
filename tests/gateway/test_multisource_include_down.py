"""``_include`` and ``_revinclude`` of a multi-source type when one of its sources is on a
connection that cannot be reached: like the type's own search, the source is left out with a
SOURCE_UNAVAILABLE warning entry naming it, or, under ``Prefer: handling=strict``, its 503;
``_summary=count`` stays an error (a total without a source is wrong) that says why."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gateway.app import build_app
from tests.conftest import LiveServer, gateway_settings

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
STRICT = {"Prefer": "handling=strict"}


def gateway_with_source_down(demo_sqlite_url: str, tmp_path: Path, down: str
                             ) -> Iterator[httpx.Client]:
    """A gateway on the demo PAS whose mapping file ``down`` is on a connection of its own
    that cannot be opened (another system, unreachable)."""
    here = tmp_path / "mappings"
    shutil.copytree(MAPPINGS / "demo-pas", here / "demo-pas")
    shutil.copytree(MAPPINGS / "codemaps", here / "codemaps")
    conn = here / "demo-pas" / "connections.yaml"
    conn.write_text(conn.read_text().replace(
        "codemaps: ../codemaps",
        "  other:\n    adapter: sql\n    url_env: CCG_OTHER_URL\n    timezone: Europe/London\n"
        "codemaps: ../codemaps"))
    moved = here / "demo-pas" / down
    moved.write_text(moved.read_text().replace("connection: pas", "connection: other", 1))
    keys = tmp_path / "api-keys.yaml"
    keys.write_text("keys: [{client_id: t, sha256: '"
                    + hashlib.sha256(b"test-key").hexdigest() + "', scopes: system/*.read}]")
    gone = f"sqlite:///file:{tmp_path / 'no-such-system.sqlite'}?mode=ro&uri=true"
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path, mappings_dir=here / "demo-pas",
                                     connection_urls={"pas": demo_sqlite_url, "other": gone},
                                     auth_mode="api-key", api_keys_file=str(keys),
                                     audit_log=str(tmp_path / "audit.jsonl")))
    with LiveServer(app) as server, httpx.Client(
            base_url=server.url, headers={"X-API-Key": "test-key"}, timeout=30) as c:
        yield c


@pytest.fixture
def ae_down(demo_sqlite_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    yield from gateway_with_source_down(demo_sqlite_url, tmp_path, "Encounter.ae.sql.yaml")


@pytest.fixture
def outpatient_down(demo_sqlite_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    yield from gateway_with_source_down(demo_sqlite_url, tmp_path,
                                        "Encounter.outpatient.sql.yaml")


def _rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def _warnings(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(i["severity"], i["details"]["coding"][0]["code"], i["diagnostics"])
            for e in body["entry"] if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]


def _error(r: httpx.Response) -> tuple[int, str, str]:
    issue = r.json()["issue"][0]
    return r.status_code, issue["details"]["coding"][0]["code"], issue["diagnostics"]


def test_revinclude_leaves_the_unreachable_source_out_and_says_so(
        ae_down: httpx.Client, demo_sqlite_url: str) -> None:
    (pid,), = _rows(demo_sqlite_url,  # a patient with A&E attendances and spells
                    'SELECT a."PATNT_REFNO" FROM "AE_ATTENDANCES" a JOIN "PROVIDER_SPELLS" s '
                    'ON s."PATNT_REFNO" = a."PATNT_REFNO" LIMIT 1')
    spells = {str(r[0]) for r in _rows(
        demo_sqlite_url, 'SELECT "PRVSP_REFNO" FROM "PROVIDER_SPELLS" WHERE "PATNT_REFNO" = :p',
        p=pid)}
    url = f"/STU3/Patient?_id={pid}&_revinclude=Encounter:patient"

    strict = ae_down.get(url, headers=STRICT)
    assert strict.status_code == 503, strict.text
    assert _error(strict)[1] == "BACKEND_UNAVAILABLE"

    r = ae_down.get(url)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "match"] == [
        str(pid)]
    included = {e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "include"}
    assert spells and spells <= included  # the sources that answered, whole
    assert not any(i.startswith("ae-") for i in included)
    assert _warnings(body) == [(
        "warning", "SOURCE_UNAVAILABLE",
        "Encounter source 'Encounter.ae.sql' did not answer (BACKEND_UNAVAILABLE); "
        "_revinclude=Encounter:patient lacks its records")]

    # the type's own search: the same rule (partial page, or the 503 under strict)
    own = ae_down.get(f"/STU3/Encounter?patient={pid}&_count=500")
    assert own.status_code == 200, own.text
    assert {e["resource"]["id"] for e in own.json()["entry"]
            if e["search"]["mode"] == "match"} == included

    # a count cannot leave a source out: an error, saying which source and why
    for headers in ({}, STRICT):
        count = ae_down.get(f"/STU3/Encounter?patient={pid}&_summary=count", headers=headers)
        status, code, text = _error(count)
        assert (status, code) == (503, "BACKEND_UNAVAILABLE"), count.text
        assert text.startswith("Encounter source 'Encounter.ae.sql' did not answer, and a "
                               "total cannot be given without its records: "), text


def test_include_leaves_the_unreachable_source_out_and_says_so(
        outpatient_down: httpx.Client, demo_sqlite_url: str) -> None:
    rows = _rows(demo_sqlite_url,  # a patient with results taken in clinic and on a ward
                 'SELECT h."PATNT_REFNO" FROM "RESULT_REPORTS" h GROUP BY h."PATNT_REFNO" '
                 'HAVING COUNT(h."OPATT_REFNO") > 0 AND COUNT(h."PRVSP_REFNO") > 0 '
                 'ORDER BY h."PATNT_REFNO" LIMIT 1')
    (pid,), = rows
    url = f"/STU3/Observation?patient={pid}&_include=Observation:context&_count=500"

    strict = outpatient_down.get(url, headers=STRICT)
    assert strict.status_code == 503, strict.text
    assert _error(strict)[1] == "BACKEND_UNAVAILABLE"

    r = outpatient_down.get(url)
    assert r.status_code == 200, r.text
    body = r.json()
    matches = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "match"]
    contexts = {m["context"]["reference"] for m in matches if "context" in m}
    assert any(c.startswith("Encounter/op-") for c in contexts)
    on_ward = {c for c in contexts if not c.startswith("Encounter/op-")}
    assert on_ward
    included = {f'{e["resource"]["resourceType"]}/{e["resource"]["id"]}'
                for e in body["entry"] if e["search"]["mode"] == "include"}
    assert included == on_ward  # every spell referred to, no clinic attendance
    assert _warnings(body) == [(
        "warning", "SOURCE_UNAVAILABLE",
        "Encounter source 'Encounter.outpatient.sql' did not answer (BACKEND_UNAVAILABLE); "
        "_include=Observation:context:Encounter lacks its records")]
