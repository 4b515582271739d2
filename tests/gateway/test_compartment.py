"""Patient-compartment enforcement: a patient/ token sees its own patient's data and nothing else.

Every escape route is tried with a token for patient P against the demo PAS (SQLite and
PostgreSQL): another patient by id, by search, via _include/_revinclude, via a tampered or
replayed paging link, via a search with no patient filter, via Encounter?patient=<other>,
POST _search, $validate and conditional create. Expected sets come from the tables directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
import structlog.testing
from starlette.applications import Starlette

from adapters.base import And, Compare, Count, In, Nothing, Query, SortKey, Text, Write
from gateway import compartment
from gateway.compartment import Restriction, restrict
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio


# --- the demo data: two patients with spells ---------------------------------------------------


def _spells(url: str) -> dict[int, set[str]]:
    """Each patient's Encounter ids, from all three sources (spells; op- and ae- prefixed)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [(str(e), p) for e, p in conn.execute(sa.text(
                'SELECT "PRVSP_REFNO", "PATNT_REFNO" FROM "PROVIDER_SPELLS"'))]
            rows += [(f"op-{e}", p) for e, p in conn.execute(sa.text(
                'SELECT "OPATT_REFNO", "PATNT_REFNO" FROM "OUTPATIENT_ATTENDANCES"'))]
            rows += [(f"ae-{e}", p) for e, p in conn.execute(sa.text(
                'SELECT "AEATT_REFNO", "PATNT_REFNO" FROM "AE_ATTENDANCES" '
                "WHERE \"DEL_FLAG\" = 'N'"))]
    finally:
        engine.dispose()
    out: dict[int, set[str]] = {}
    for spell, patient in rows:
        out.setdefault(patient, set()).add(spell)
    return out


@pytest.fixture(scope="module")
def people(demo_url: str) -> dict[str, Any]:
    spells = _spells(demo_url)
    ranked = sorted(spells, key=lambda p: (-len(spells[p]), p))
    p, q = ranked[0], ranked[1]
    assert len(spells[p]) >= 3 and spells[q]
    return {"P": str(p), "Q": str(q), "p_spells": {str(s) for s in spells[p]},
            "q_spells": {str(s) for s in spells[q]}}


@pytest.fixture
async def api(demo_url: str, make_app: Callable[..., Starlette], people: dict[str, Any]
              ) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(demo_url, auth_mode="insecure-demo")
    install(app, {
        "P": patient_token(people["P"]),
        "Q": patient_token(people["Q"]),
        "clinician": user_token(),
        "no-claim": patient_token(None),
        "mixed": patient_token(people["P"], "patient/*.read user/Practitioner.read"),
    })
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def _ids(bundle: dict[str, Any], rtype: str | None = None) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])
            if e["search"]["mode"] != "outcome"
            and (rtype is None or e["resource"]["resourceType"] == rtype)}


def _code(r: httpx.Response) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    code: str = body["issue"][0]["details"]["coding"][0]["code"]
    return code


def _belongs(bundle: dict[str, Any], patient: str) -> None:
    """Every patient-data entry of a bundle is the patient's own."""
    for e in bundle.get("entry", []):
        res = e["resource"]
        if res["resourceType"] == "Patient":
            assert res["id"] == patient
        elif res["resourceType"] == "Encounter":
            assert res["subject"]["reference"] == f"Patient/{patient}"


def _next(bundle: dict[str, Any]) -> str | None:
    return next((ln["url"] for ln in bundle["link"] if ln["relation"] == "next"), None)


# --- reads --------------------------------------------------------------------------------------


async def test_own_patient_is_read_another_is_404(api: httpx.AsyncClient,
                                                  people: dict[str, Any]) -> None:
    r = await api.get(f"/STU3/Patient/{people['P']}", headers=as_("P"))
    assert r.status_code == 200 and r.json()["id"] == people["P"]
    r = await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("P"))
    assert r.status_code == 404 and _code(r) == "RESOURCE_NOT_FOUND"
    # indistinguishable from an id that does not exist at all
    missing = await api.get("/STU3/Patient/999999999", headers=as_("P"))
    assert missing.status_code == 404 and missing.json() == r.json()
    # an unrestricted token still reads both
    assert (await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("clinician"))
            ).status_code == 200


async def test_another_patients_encounter_is_404(api: httpx.AsyncClient,
                                                 people: dict[str, Any]) -> None:
    mine = sorted(people["p_spells"])[0]
    theirs = sorted(people["q_spells"])[0]
    r = await api.get(f"/STU3/Encounter/{mine}", headers=as_("P"))
    assert r.status_code == 200
    assert r.json()["subject"]["reference"] == f"Patient/{people['P']}"
    r = await api.get(f"/STU3/Encounter/{theirs}", headers=as_("P"))
    assert r.status_code == 404 and _code(r) == "RESOURCE_NOT_FOUND"
    r = await api.get(f"/STU3/Patient/{people['Q']}/$validate", headers=as_("P"))
    assert r.status_code == 404


# --- searches -----------------------------------------------------------------------------------


async def test_search_without_a_patient_filter_returns_only_the_tokens_patient(
    api: httpx.AsyncClient, people: dict[str, Any]
) -> None:
    r = await api.get("/STU3/Encounter?_count=500", headers=as_("P"))
    assert r.status_code == 200
    bundle = r.json()
    assert _ids(bundle) == people["p_spells"]
    _belongs(bundle, people["P"])
    r = await api.get("/STU3/Encounter?_summary=count", headers=as_("P"))
    assert r.json()["total"] == len(people["p_spells"])
    r = await api.get("/STU3/Encounter?_count=0&_total=accurate", headers=as_("P"))
    assert r.json()["total"] == len(people["p_spells"])
    # the clinician sees everyone's
    r = await api.get("/STU3/Encounter?_summary=count", headers=as_("clinician"))
    assert r.json()["total"] > len(people["p_spells"])


@pytest.mark.parametrize("query", [
    "patient={Q}", "subject={Q}", "patient=Patient/{Q}", "subject:Patient={Q}",
    "_id={q_spell}", "patient={Q}&_id={q_spell}", "patient:missing=true",
])
async def test_encounters_of_another_patient_are_never_found(
    api: httpx.AsyncClient, people: dict[str, Any], query: str
) -> None:
    url = "/STU3/Encounter?" + query.format(Q=people["Q"], q_spell=sorted(people["q_spells"])[0])
    r = await api.get(url, headers=as_("P"))
    assert r.status_code == 200, r.text
    assert _ids(r.json()) == set()
    form = dict(httpx.QueryParams(url.split("?", 1)[1]))
    r = await api.post("/STU3/Encounter/_search", data=form, headers=as_("P"))
    assert r.status_code == 200 and _ids(r.json()) == set()


async def test_or_with_another_patient_keeps_only_the_tokens_patient(
    api: httpx.AsyncClient, people: dict[str, Any]
) -> None:
    for query in (f"patient={people['P']},{people['Q']}", f"patient={people['Q']},{people['P']}",
                  f"patient={people['P']}&patient={people['P']}"):
        r = await api.get(f"/STU3/Encounter?{query}&_count=500", headers=as_("P"))
        assert r.status_code == 200 and _ids(r.json()) == people["p_spells"], query


async def test_patient_searches_find_only_the_token_patient(
    api: httpx.AsyncClient, people: dict[str, Any]
) -> None:
    q = (await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("clinician"))).json()
    p = (await api.get(f"/STU3/Patient/{people['P']}", headers=as_("clinician"))).json()
    nhs_q = next(i["value"] for i in q["identifier"] if "nhs-number" in i["system"])
    for query in (f"_id={people['Q']}", f"identifier={nhs_q}",
                  f"identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs_q}",
                  f"family={q['name'][0]['family']}&gender={q['gender']}",
                  f"_id={people['P']},{people['Q']}"):
        r = await api.get(f"/STU3/Patient?{query}", headers=as_("P"))
        assert r.status_code == 200, (query, r.text)
        assert _ids(r.json()) <= {people["P"]}, query
        _belongs(r.json(), people["P"])
    r = await api.get(f"/STU3/Patient?family={p['name'][0]['family']}&gender={p['gender']}",
                      headers=as_("P"))
    assert _ids(r.json()) == {people["P"]}
    r = await api.get("/STU3/Patient?birthdate=ge1800&gender=male,female,other,unknown",
                      headers=as_("P"))
    assert _ids(r.json()) == {people["P"]}


# --- _include / _revinclude ---------------------------------------------------------------------


async def test_includes_stay_in_the_compartment(api: httpx.AsyncClient,
                                                people: dict[str, Any]) -> None:
    r = await api.get("/STU3/Encounter?_include=Encounter:patient&_include=Encounter:subject"
                      "&_include=Encounter:practitioner&_count=500", headers=as_("P"))
    assert r.status_code == 200
    bundle = r.json()
    assert _ids(bundle, "Patient") == {people["P"]}
    assert _ids(bundle, "Encounter") == people["p_spells"]
    assert _ids(bundle, "Practitioner")  # not patient data: included as the scope allows
    _belongs(bundle, people["P"])


async def test_revincludes_stay_in_the_compartment(api: httpx.AsyncClient,
                                                   people: dict[str, Any]) -> None:
    r = await api.get(f"/STU3/Patient?_id={people['P']},{people['Q']}"
                      "&_revinclude=Encounter:patient&_revinclude=Encounter:subject",
                      headers=as_("P"))
    bundle = r.json()
    assert _ids(bundle, "Patient") == {people["P"]}
    assert _ids(bundle, "Encounter") == people["p_spells"]
    # from a type outside the compartment: the consultant of Q's spell revincludes only P's
    for eid in sorted(people["q_spells"]):  # one with a clinician (A&E ones may have none)
        theirs = (await api.get(f"/STU3/Encounter/{eid}", headers=as_("clinician"))).json()
        if "participant" in theirs:
            break
    consultant = theirs["participant"][0]["individual"]["reference"].split("/")[1]
    r = await api.get(f"/STU3/Practitioner?_id={consultant}"
                      "&_revinclude=Encounter:practitioner", headers=as_("P"))
    assert r.status_code == 200
    assert _ids(r.json(), "Encounter") <= people["p_spells"]
    _belongs(r.json(), people["P"])
    every = await api.get(f"/STU3/Practitioner?_id={consultant}"
                          "&_revinclude=Encounter:practitioner", headers=as_("clinician"))
    assert _ids(every.json(), "Encounter") - people["p_spells"]  # there was something to leak


# --- paging links -------------------------------------------------------------------------------


async def test_paging_links_walk_only_the_compartment(api: httpx.AsyncClient,
                                                      people: dict[str, Any]) -> None:
    url: str | None = "/STU3/Encounter?_count=1"
    seen: set[str] = set()
    while url:
        r = await api.get(url, headers=as_("P"))
        assert r.status_code == 200
        seen |= _ids(r.json())
        _belongs(r.json(), people["P"])
        url = _next(r.json())
    assert seen == people["p_spells"]


async def test_a_paging_link_cannot_be_replayed_by_another_token(
    api: httpx.AsyncClient, people: dict[str, Any]
) -> None:
    first = (await api.get("/STU3/Encounter?_count=1", headers=as_("P"))).json()
    link = _next(first)
    assert link
    for other in ("Q", "clinician"):
        r = await api.get(link, headers=as_(other))
        assert r.status_code == 400 and _code(r) == "INVALID_PAGE_TOKEN", other
    # and the other way: a clinician's link replayed by a patient token
    wide = (await api.get("/STU3/Encounter?_count=1", headers=as_("clinician"))).json()
    r = await api.get(_next(wide) or "", headers=as_("P"))
    assert r.status_code == 400 and _code(r) == "INVALID_PAGE_TOKEN"
    # a tampered link
    token = httpx.URL(link).params["_page"]
    middle = len(token) // 2
    flipped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1:]
    r = await api.get(str(httpx.URL(link).copy_set_param("_page", flipped)), headers=as_("P"))
    assert r.status_code == 400 and _code(r) == "INVALID_PAGE_TOKEN"
    # the link with its search parameters edited to another patient
    edited = link.replace("_count=1", f"_count=1&patient={people['Q']}")
    r = await api.get(edited, headers=as_("P"))
    assert r.status_code == 400 and _code(r) == "INVALID_PAGE_TOKEN"


# --- tokens that cannot be confined; types that need no confining -------------------------------


async def test_a_patient_token_without_a_patient_claim_is_refused(
    api: httpx.AsyncClient, people: dict[str, Any]
) -> None:
    for url in ("/STU3/Encounter", f"/STU3/Patient/{people['P']}", "/STU3/Encounter/1",
                f"/STU3/Patient?_id={people['P']}"):
        r = await api.get(url, headers=as_("no-claim"))
        assert r.status_code == 403 and _code(r) == "COMPARTMENT_FORBIDDEN", url
    # not patient data: allowed with the scope that names it
    r = await api.get("/STU3/Practitioner?_count=2", headers=as_("no-claim"))
    assert r.status_code == 200 and len(_ids(r.json())) == 2


async def test_non_compartment_types_are_read_normally(api: httpx.AsyncClient) -> None:
    for rtype in ("Practitioner", "Organization", "Location"):
        r = await api.get(f"/STU3/{rtype}?_count=3", headers=as_("P"))
        assert r.status_code == 200 and _ids(r.json()), rtype
        one = sorted(_ids(r.json()))[0]
        assert (await api.get(f"/STU3/{rtype}/{one}", headers=as_("P"))).status_code == 200


async def test_a_mixed_token_is_confined_too(api: httpx.AsyncClient,
                                             people: dict[str, Any]) -> None:
    r = await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("mixed"))
    assert r.status_code == 404
    r = await api.get("/STU3/Encounter?_count=500", headers=as_("mixed"))
    assert _ids(r.json()) == people["p_spells"]


# --- the response re-check: a broken query predicate fails closed ------------------------------


async def test_a_resource_outside_the_compartment_fails_the_request(
    api: httpx.AsyncClient, people: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Simulate a backend / mapping that ignores the compartment predicate.
    monkeypatch.setattr(compartment, "restrict_query", lambda provider, query: query)
    with structlog.testing.capture_logs() as logs:
        r = await api.get(f"/STU3/Encounter?patient={people['Q']}", headers=as_("P"))
        assert r.status_code == 500 and _code(r) == "COMPARTMENT_VIOLATION"
        assert people["Q"] not in r.text
        r = await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("P"))
        assert r.status_code == 500 and _code(r) == "COMPARTMENT_VIOLATION"
        r = await api.get(f"/STU3/Patient?_id={people['P']}&_revinclude=Encounter:patient",
                          headers=as_("P"))
        assert r.status_code == 200  # the patient's own data still passes the check
    warnings = [e for e in logs if e["event"] == "compartment_violation"]
    assert len(warnings) == 2
    assert all(e["log_level"] == "warning" for e in warnings)
    assert people["Q"] not in repr(warnings)  # the application log names no patient


# --- the criterion itself -----------------------------------------------------------------------


def test_restrict_folds_what_the_query_already_says() -> None:
    key = Compare("p.ID", "=", 7)
    assert restrict(None, key) == key
    assert restrict(In("p.ID", (7,)), key) == key  # a read stays a key lookup
    assert restrict(In("p.ID", (6, 7)), key) == key
    assert restrict(In("p.ID", (6,)), key) == Nothing()
    assert restrict(Compare("p.ID", "=", 6), key) == Nothing()
    text = Text("p.NAME", "prefix", "smi")
    assert restrict(text, key) == And((text, key))
    assert restrict(And((text, key)), key) == And((text, key))
    assert restrict(And((key, Compare("p.ID", "=", 8))), key) == Nothing()
    assert restrict(Nothing(), key) == Nothing()
    assert restrict(text, Nothing()) == Nothing()


async def test_links_come_from_the_mapping(demo_url: str, make_app: Callable[..., Starlette]
                                           ) -> None:
    app = make_app(demo_url, auth_mode="insecure-demo")
    registry = app.state.registry
    links = {(p.resource_type, p.id_prefix): compartment.link(p) for p in registry.sources()}
    assert links["Patient", ""].kind == "self" and links["Patient", ""].refs == ("p.PATNT_REFNO",)
    # Encounter's three sources: each linked by its own patient column
    for prefix, ref in (("", "s.PATNT_REFNO"), ("op-", "o.PATNT_REFNO"), ("ae-", "e.PATNT_REFNO")):
        assert links["Encounter", prefix].kind == "reference"
        assert links["Encounter", prefix].refs == (ref,)
        assert links["Encounter", prefix].paths == (("subject", "reference"),)
    links = {rtype: link for (rtype, _), link in links.items()}
    for rtype in ("Practitioner", "Organization", "Location"):
        assert links[rtype].kind == "none", rtype


async def test_queries_and_writes_are_confined_at_the_provider(
    demo_url: str, make_app: Callable[..., Starlette], people: dict[str, Any]
) -> None:
    """The choke points themselves, with the request context set by hand."""
    app = make_app(demo_url, auth_mode="insecure-demo")
    registry = app.state.registry
    encounter = next(s for s in registry.get("Encounter").sources if not s.id_prefix)
    patient = registry.get("Patient")
    scope: dict[str, Any] = {"type": "http", "state": {"principal": patient_token(people["P"])}}
    token = compartment._scope.set(scope)
    try:
        assert compartment.current() == Restriction(people["P"])
        q = compartment.restrict_query(encounter, Query(None, (SortKey("s.PRVSP_REFNO"),), 5))
        assert q.criteria == Compare("s.PATNT_REFNO", "=", int(people["P"]))
        c = compartment.restrict_count(patient, Count(In("p.PATNT_REFNO", (1, 2))))
        assert c.criteria == Nothing()
        own = {"s.PATNT_REFNO": int(people["P"])}
        compartment.check_write(encounter, Write("create", own))
        with pytest.raises(compartment.CompartmentForbidden):
            compartment.check_write(encounter, Write("create", {"s.PATNT_REFNO": int(people["Q"])}))
        with pytest.raises(compartment.CompartmentForbidden):
            compartment.check_write(encounter, Write("create", {}))
        with pytest.raises(compartment.CompartmentForbidden):
            compartment.check_write(patient, Write("create", {"p.SURNAME": "X"}))
        with pytest.raises(compartment.CompartmentForbidden):
            compartment.check_write(patient, Write("update", {}, id=people["Q"]))
        compartment.check_write(patient, Write("update", {}, id=people["P"]))
        compartment.check_write(registry.get("Practitioner"), Write("create", {}))
    finally:
        compartment._scope.reset(token)
    assert compartment.current() is None


def test_values_at_a_path_against_an_independent_walk() -> None:
    """compartment._values (its plain descent through dicts and its walk through lists)
    against a recursive oracle, on every shape a path can meet."""
    from gateway.compartment import _values

    def oracle(node: Any, path: tuple[str, ...]) -> list[Any]:
        if not path:
            return [node]
        if isinstance(node, list):
            return [v for item in node for v in oracle(item, path)]
        if isinstance(node, dict) and path[0] in node:
            return oracle(node[path[0]], path[1:])
        return []

    resource = {
        "subject": {"reference": "Patient/1"},
        "participant": [{"individual": {"reference": "Practitioner/2"}},
                        {"type": "x"}, "junk",
                        {"individual": [{"reference": "Practitioner/3"},
                                        {"reference": None}]}],
        "context": {"reference": ["Encounter/4", "Encounter/5"]},
        "text": "not a dict",
        "empty": {},
    }
    paths = [("subject", "reference"), ("participant", "individual", "reference"),
             ("context", "reference"), ("text", "reference"), ("empty", "reference"),
             ("missing", "reference"), ("subject",), ("participant", "type")]
    for path in paths:
        assert _values(resource, path) == oracle(resource, path), path
    assert _values(resource, ("subject", "reference")) == ["Patient/1"]
    assert _values(resource, ("participant", "individual", "reference")) == [
        "Practitioner/2", "Practitioner/3", None]
