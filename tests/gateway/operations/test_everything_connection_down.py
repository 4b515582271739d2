"""`$everything` when a whole connection is down — another system, unreachable — not just a
table gone: the sections on it are said to be missing (SOURCE_UNAVAILABLE), the record still
comes; under ``Prefer: handling=strict`` the answer is that connection's 503."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx
import sqlalchemy as sa

from gateway.app import build_app
from tests.conftest import LiveServer, gateway_settings

MAPPINGS = Path(__file__).resolve().parents[3] / "mappings"


def test_a_section_on_an_unreachable_connection_is_said_not_a_503(
        demo_sqlite_url: str, tmp_path: Path) -> None:
    here = tmp_path / "mappings"
    shutil.copytree(MAPPINGS / "demo-pas", here / "demo-pas")
    shutil.copytree(MAPPINGS / "codemaps", here / "codemaps")
    conn = here / "demo-pas" / "connections.yaml"
    conn.write_text(conn.read_text().replace(
        "codemaps: ../codemaps",
        "  ed:\n    adapter: sql\n    url_env: CCG_ED_URL\n    timezone: Europe/London\n"
        "codemaps: ../codemaps"))
    ae = here / "demo-pas" / "Encounter.ae.sql.yaml"  # the A&E system: a database of its own
    ae.write_text(ae.read_text().replace("connection: pas", "connection: ed", 1))
    keys = tmp_path / "api-keys.yaml"
    keys.write_text("keys: [{client_id: t, sha256: '"
                    + hashlib.sha256(b"test-key").hexdigest() + "', scopes: system/*.read}]")
    gone = f"sqlite:///file:{tmp_path / 'no-such-ed.sqlite'}?mode=ro&uri=true"  # cannot open
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path, mappings_dir=here / "demo-pas",
                                     connection_urls={"pas": demo_sqlite_url, "ed": gone},
                                     auth_mode="api-key", api_keys_file=str(keys),
                                     audit_log=str(tmp_path / "audit.jsonl")))
    engine = sa.create_engine(demo_sqlite_url)
    try:
        with engine.connect() as c:
            pid, = c.execute(sa.text(  # a patient with A&E attendances and spells
                'SELECT a."PATNT_REFNO" FROM "AE_ATTENDANCES" a JOIN "PROVIDER_SPELLS" s '
                'ON s."PATNT_REFNO" = a."PATNT_REFNO" LIMIT 1')).one()
            spells = {str(r[0]) for r in c.execute(sa.text(
                'SELECT "PRVSP_REFNO" FROM "PROVIDER_SPELLS" WHERE "PATNT_REFNO" = :p'),
                {"p": pid})}
    finally:
        engine.dispose()
    url = f"/STU3/Patient/{pid}/$everything?_count=500"
    with LiveServer(app) as server, httpx.Client(
            base_url=server.url, headers={"X-API-Key": "test-key"}, timeout=30) as c:
        strict = c.get(url, headers={"Prefer": "handling=strict"})
        assert strict.status_code == 503, strict.text
        assert strict.json()["issue"][0]["details"]["coding"][0]["code"] == (
            "BACKEND_UNAVAILABLE")
        r = c.get(url)
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    issues = [i for e in entries if e["search"]["mode"] == "outcome"
              for i in e["resource"]["issue"]]
    assert [(i["severity"], i["details"]["coding"][0]["code"], i["diagnostics"])
            for i in issues] == [("warning", "SOURCE_UNAVAILABLE", "Encounter source "
                                  "'Encounter.ae.sql' did not answer (BACKEND_UNAVAILABLE); "
                                  "a later page asks it again")]
    served = {e["resource"]["id"] for e in entries if e["search"]["mode"] == "match"
              and e["resource"]["resourceType"] == "Encounter"}
    assert spells <= served  # the other sources of Encounter, whole
    assert not any(i.startswith("ae-") for i in served)
    assert str(pid) in {e["resource"]["id"] for e in entries
                        if e["resource"]["resourceType"] == "Patient"}
