"""``mappings explain``: the plan of a search, without running it, and never its values."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from gateway import cli
from gateway.settings import bundled_mappings_roots

HL7 = bundled_mappings_roots()[0] / "demo-hl7v2"
# distinctive values: none may appear anywhere in an explanation
SECRET_NAME, SECRET_NHS = "qzxwvutname", "9990000018"


@pytest.fixture(autouse=True)
def small_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CCG_DEMO_PATIENTS", "60")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["mappings", "explain", *argv])
    return code, capsys.readouterr().out


def test_sql_search_shows_parameters_statement_and_children_not_values(
        capsys: pytest.CaptureFixture[str]) -> None:
    search = (f"Patient?family={SECRET_NAME}&gender=female&birthdate=ge1965"
              "&_include=Patient:general-practitioner&bogus=1")
    # strict by default, as the server is: the unknown parameter is the answer
    code, out = run(capsys, search)
    assert code == 1 and out.startswith("UNKNOWN_PARAMETER: ") and "'bogus'" in out
    assert SECRET_NAME not in out
    code, out = run(capsys, "--lenient", search)
    assert code == 0, out
    assert "Patient search: Patient.sql.yaml via connection 'pas' (sql adapter)" in out
    assert "parameters used: family, gender, birthdate, _include" in out
    assert "ignored: bogus" in out
    assert "criteria: and(p.SURNAME prefix ?,p.SEXXX_CODE=?,p.DTTM_OF_BIRTH>=?)" in out
    assert 'FROM "PATIENTS"' in out and 'p."SURNAME" LIKE ?' in out
    assert "child addresses:" in out and 'FROM "ADDRESSES"' in out
    assert "_include general-practitioner" in out
    for value in (SECRET_NAME, "female", "1965", "'2'"):  # '2': female's local code
        assert value not in out.lower(), value


def test_nothing_is_run(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    # a database URL that cannot be reached: explaining does not connect
    monkeypatch.setenv("CCG_PAS_URL", "postgresql+psycopg://nobody:x@127.0.0.1:9/none")
    code, out = run(capsys, "Encounter?patient=100001&date=ge2020&_total=accurate")
    assert code == 0, out
    assert "SQL (postgresql)" in out and "%(" in out  # psycopg's own placeholders
    assert "_total=accurate: also" in out and "count(*)" in out
    assert "100001" not in out and "2020" not in out


def test_hl7_search_shows_the_message_and_qpd_fields(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--mappings", "demo-hl7v2",
                    f"Patient?family={SECRET_NAME}&gender=female")
    assert code == 0, out
    assert "(hl7v2 adapter)" in out and "QBP^Q22" in out
    assert "QPD-3: @PID.5^?~@PID.8^?" in out
    assert "child addresses: each repetition of PID-11" in out
    assert SECRET_NAME not in out.lower()
    code, out = run(capsys, "--mappings", str(HL7), "Patient?_id=D0000001")
    assert "QBP^Q21" in out and "D0000001" not in out
    code, out = run(capsys, "--mappings", "demo-hl7v2",
                    f"Patient?family:contains={SECRET_NAME}&gender=female")
    assert code == 0 and "not sent:" in out and "UNSUPPORTED_SEARCH" in out


@pytest.mark.parametrize(("search", "code"), [
    ("Foo?x=1", "UNKNOWN_RESOURCE_TYPE"),
    ("Patient?family=smith", "INSUFFICIENT_SEARCH_CRITERIA"),
    (f"Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{SECRET_NHS[:-1]}7",
     "INVALID_NHS_NUMBER"),
    ("family=smith", "BAD_REQUEST"),
])
def test_a_search_that_would_fail_says_why(capsys: pytest.CaptureFixture[str], search: str,
                                           code: str) -> None:
    status, out = run(capsys, search)
    assert status == 1 and out.startswith(f"{code}: ")
    assert SECRET_NHS[:-1] not in out


def test_cost_from_sqlite_runs_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--cost", f"Patient?family={SECRET_NAME}&gender=female")
    assert code == 0, out
    plan = out.split("SQLite's plan", 1)[1]
    assert "SCAN p" in plan or "SEARCH p" in plan
    assert SECRET_NAME not in out.lower()
    code, out = run(capsys, "--cost", "Patient?_id=100001")
    assert "SEARCH p USING INTEGER PRIMARY KEY" in out or "SEARCH p USING" in out


@pytest.mark.postgres
def test_cost_from_postgresql(capsys: pytest.CaptureFixture[str], demo_pg_url: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCG_PAS_URL", demo_pg_url)
    code, out = run(capsys, "--cost", f"Patient?family={SECRET_NAME}&gender=female")
    assert code == 0, out
    assert "SQL (postgresql)" in out
    estimate = out.split("PostgreSQL's estimate: cost ", 1)[1]
    first = estimate.splitlines()[0]
    assert "row(s) (the page asks for 21)" in first
    assert "on PATIENTS" in estimate  # the plan's nodes, by table
    assert SECRET_NAME not in out.lower()


def test_a_type_with_several_sources_has_one_plan_per_source(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "Encounter?patient=100001&date=ge2024-01-01&_sort=-date")
    assert code == 0, out
    assert out.startswith("Encounter search: 3 sources, merged in sort order")
    assert "parameters used: patient, date, _sort" in out
    sections = out.split("\nsource ")[1:]
    assert [s.split(":", 1)[0] for s in sections] == [
        "Encounter.ae.sql (ids ae-...)", "Encounter.outpatient.sql (ids op-...)",
        "Encounter.sql"]
    # each on its own table and columns, sorted by its own date column, newest first
    for section, table, sort in zip(sections, ("AE_ATTENDANCES", "OUTPATIENT_ATTENDANCES",
                                               "PROVIDER_SPELLS"),
                                    ("-e.ARRIVAL_DTTM", "-o.APPT_DTTM", "-s.ADMIT_DTTM"),
                                    strict=True):
        assert f'FROM "{table}"' in section and f"sort: {sort}," in section
        assert section.count("SQL (sqlite): one statement per page") == 1
    assert "100001" not in out and "2024" not in out


def test_a_chained_parameter_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    # same database: the target's search is a subquery of each source's statement
    # (two chained parameters into Patient: Patient's own rule applies to them)
    code, out = run(capsys, f"Encounter?patient.family={SECRET_NAME}&patient.gender=female")
    assert code == 0, out
    assert "parameters used: patient.family, patient.gender" in out
    assert ("criteria: and(s.PATNT_REFNO in p.PATNT_REFNO(p.SURNAME prefix ?),"
            "s.PATNT_REFNO in p.PATNT_REFNO(p.SEXXX_CODE=?))") in out
    assert out.count('IN (SELECT p."PATNT_REFNO"') == 6  # in every source's statement
    # over HL7 v2: the Patient search runs first, its keys go into the Encounter query
    code, out = run(capsys, "--mappings", "demo-hl7v2",
                    f"Encounter?patient.family={SECRET_NAME}&patient.gender=female")
    assert code == 0, out
    # one Patient search for both
    assert ("chain patient.family, patient.gender: first a search of Patient "
            "(Patient.hl7v2.yaml, and(PID-5.1 prefix ?,PID-8 in ?[2]))") in out, out
    assert "HL7 v2 QBP^ZV1" in out and "not sent" not in out
    assert SECRET_NAME not in out.lower()


# --- the same explanation for one request, in the debug log, for an admin -----------------------

ADMIN_KEY, PLAIN_KEY, OTHER_ROLE_KEY = "explain-admin-key", "explain-plain-key", "explain-other"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    import hashlib

    def entry(key: str, client: str, role: str | None) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return (f"  - {{client_id: {client}, sha256: '{digest}', scopes: system/*.read"
                + (f", role: {role}" if role else "") + "}\n")

    f = tmp_path / "api-keys.yaml"
    f.write_text("keys:\n" + entry(ADMIN_KEY, "ops-desk", "gateway-admin")
                 + entry(PLAIN_KEY, "ehr", None) + entry(OTHER_ROLE_KEY, "dash", "dashboard"))
    return f


@pytest.fixture
def restore_logging() -> Iterator[None]:
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.anyio
async def test_an_admin_gets_the_plan_in_the_debug_log(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], keys: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], restore_logging: None) -> None:
    app = make_app(demo_sqlite_url, auth_mode="api-key", api_keys_file=str(keys),
                   audit_log=str(tmp_path / "audit.jsonl"), log_level="debug")
    params = {"family": SECRET_NAME, "gender": "female", "birthdate": "ge1965",
              "identifier": f"https://fhir.nhs.uk/Id/nhs-number|{SECRET_NHS}"}
    capfd.readouterr()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            sent: dict[str, str] = {}
            for key in (ADMIN_KEY, PLAIN_KEY, OTHER_ROLE_KEY):
                r = await c.get("/STU3/Patient", params=params,
                                headers={"X-API-Key": key, "X-Explain": "plan"})
                assert r.status_code == 200, r.text
                sent[key] = r.headers["x-request-id"]
            # an admin without the header: no explanation either
            r = await c.get("/STU3/Patient", params=params, headers={"X-API-Key": ADMIN_KEY})
            quiet = r.headers["x-request-id"]
    out = capfd.readouterr().out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    explained = [r for r in records if r.get("event") == "search_explained"]
    assert len(explained) == 1, explained  # the admin's request, and only it
    line = explained[0]
    assert line["level"] == "debug" and line["request_id"] == sent[ADMIN_KEY]
    assert (line["client_id"], line["role"]) == ("ops-desk", "gateway-admin")
    plan = "\n".join(line["plan"])
    assert "parameters used: family, gender, birthdate, identifier" in plan
    assert 'FROM "PATIENTS"' in plan and "?" in plan  # the SQL, with placeholders
    assert "child addresses:" in plan  # the children queried per page
    assert "estimated cost: " in plan and "(budget 5000)" in plan
    assert not any(r.get("request_id") in (sent[PLAIN_KEY], sent[OTHER_ROLE_KEY], quiet)
                   and "plan" in r for r in records)
    # no value of the search anywhere in the explanation (nor in any line logged)
    for value in (SECRET_NAME, SECRET_NHS, "1965"):
        assert value not in out, value


@pytest.mark.anyio
async def test_explaining_needs_a_configured_admin_role(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], keys: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], restore_logging: None) -> None:
    """CCG_ADMIN_ROLES names who is an admin: emptied, nobody is (the header is ignored)."""
    app = make_app(demo_sqlite_url, auth_mode="api-key", api_keys_file=str(keys),
                   audit_log=str(tmp_path / "audit.jsonl"), log_level="debug", admin_roles="")
    capfd.readouterr()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            r = await c.get("/STU3/Patient", params={"family": "smith", "gender": "female"},
                            headers={"X-API-Key": ADMIN_KEY, "X-Explain": "plan"})
            assert r.status_code == 200
    assert '"search_explained"' not in capfd.readouterr().out


@pytest.mark.anyio
async def test_a_token_role_claim_makes_an_admin(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path,
        capfd: pytest.CaptureFixture[str], restore_logging: None) -> None:
    """The demo's JWT path: ``dev-token --role gateway-admin`` (the README's example)."""
    from gateway.auth.devkeys import mint_dev_token

    app = make_app(demo_sqlite_url, auth_mode="", audit_log=str(tmp_path / "audit.jsonl"),
                   log_level="debug")
    admin = mint_dev_token(tmp_path, "user/*.read", role="gateway-admin")
    plain = mint_dev_token(tmp_path, "user/*.read")
    capfd.readouterr()
    ids = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            for token in (plain, admin):
                r = await c.get("/STU3/Encounter", params={"patient": SECRET_NHS},
                                headers={"Authorization": f"Bearer {token}",
                                         "X-Explain": "plan"})
                assert r.status_code == 200, r.text
                ids.append(r.headers["x-request-id"])
    out = capfd.readouterr().out
    explained = [json.loads(line) for line in out.splitlines()
                 if '"search_explained"' in line]
    assert [e["request_id"] for e in explained] == [ids[1]]
    plan = explained[0]["plan"]
    assert plan[0].startswith("Encounter search: 3 sources")  # one part per source
    assert sum(line.startswith("estimated cost: ") for line in plan) == 3
    assert SECRET_NHS not in out
