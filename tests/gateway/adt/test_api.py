"""Subscription through the FHIR API (real uvicorn, real tokens from the dev key): scopes,
audit, checks on create; merges answered at read time; the CapabilityStatement."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.adt.store import AdtStore, Incoming
from gateway.app import build_app
from gateway.auth.devkeys import mint_dev_token
from tests.conftest import LiveServer, gateway_settings
from tests.gateway.adt.conftest import GOLDEN, Receiver, Sender, er7_bytes, msa

PAS = "https://fhir.demo-trust.nhs.uk/Id/pas-number"


@pytest.fixture
def gateway(demo_sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[LiveServer, Path]]:
    monkeypatch.setenv("CCG_ADT_MODE", "api")
    monkeypatch.setenv("CCG_ADT_STORE_URL", f"sqlite:///{tmp_path / 'adt.sqlite'}")
    monkeypatch.setenv("CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS", "http://127.0.0.1:*")
    settings = gateway_settings(demo_sqlite_url, tmp_path, auth_mode="",
                                audit_log=str(tmp_path / "audit.log"))
    with LiveServer(build_app(settings)) as server:
        yield server, tmp_path


def token(tmp: Path, scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_dev_token(tmp, scope)}",
            "Content-Type": "application/fhir+json"}


def sub(endpoint: str = "http://127.0.0.1:9/hook", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Subscription", "status": "requested",
                            "reason": "ward notifications",
                            "criteria": "Encounter?patient=D0000001",
                            "channel": {"type": "rest-hook", "endpoint": endpoint,
                                        "payload": "application/fhir+json"}}
    body.update(over)
    return body


def code(resp: httpx.Response) -> str:
    return str(resp.json()["issue"][0]["details"]["coding"][0]["code"])


def test_create_read_search_delete(gateway: tuple[LiveServer, Path]) -> None:
    server, tmp = gateway
    base = f"{server.url}/STU3"
    h = token(tmp, "user/Subscription.*")
    r = httpx.post(f"{base}/Subscription", content=json.dumps(sub()), headers=h)
    assert r.status_code == 201, r.text
    created = r.json()
    sid = created["id"]
    assert created["status"] == "active"
    assert r.headers["location"].endswith(f"/STU3/Subscription/{sid}")
    r = httpx.get(f"{base}/Subscription/{sid}", headers=h)
    assert r.status_code == 200 and r.json()["criteria"] == "Encounter?patient=D0000001"
    r = httpx.get(f"{base}/Subscription?status=active", headers=h)
    assert r.json()["total"] == 1 and r.json()["entry"][0]["resource"]["id"] == sid
    assert httpx.delete(f"{base}/Subscription/{sid}", headers=h).status_code == 204
    r = httpx.get(f"{base}/Subscription/{sid}", headers=h)
    assert r.status_code == 404 and code(r) == "RESOURCE_NOT_FOUND"
    audit = (tmp / "audit.log").read_text()
    records = [json.loads(line) for line in audit.splitlines() if line.strip()]
    seen = {(a["interaction"], a["resource_type"], a["outcome"]["status"]) for a in records}
    assert {("create", "Subscription", 201), ("read", "Subscription", 200),
            ("search-type", "Subscription", 200), ("delete", "Subscription", 204)} <= seen


@pytest.mark.parametrize(("scope", "method", "status"), [
    ("user/Patient.read", "POST", 403),
    ("user/Subscription.read", "POST", 403),
    ("user/Subscription.rs", "GET", 200),
    ("user/Subscription.c", "GET", 403),
])
def test_scopes(gateway: tuple[LiveServer, Path], scope: str, method: str,
                status: int) -> None:
    server, tmp = gateway
    h = token(tmp, scope)
    url = f"{server.url}/STU3/Subscription"
    r = (httpx.post(url, content=json.dumps(sub()), headers=h) if method == "POST"
         else httpx.get(url, headers=h))
    assert r.status_code == status
    if status == 403:
        assert code(r) == "ACCESS_DENIED"
    assert httpx.get(url).status_code == 401


@pytest.mark.parametrize("body", [
    sub(endpoint="http://10.0.0.5/hook"),                      # outside the allow-list
    sub(endpoint="https://127.0.0.1/hook"),
    sub(criteria="Observation?patient=1"),                     # not a type the feed maps
    sub(criteria="Patient?family=smith"),                      # not a parameter it can test
    sub(channel={"type": "websocket"}),
    sub(channel={"type": "rest-hook", "endpoint": "http://127.0.0.1:9/h",
                 "payload": "application/xml"}),
    sub(status="off"),
    {"resourceType": "Patient"},
    {k: v for k, v in sub().items() if k != "reason"},          # STU3: reason is required
])
def test_bad_subscriptions_are_refused(gateway: tuple[LiveServer, Path], body: dict[str, Any]
                                   ) -> None:
    server, tmp = gateway
    r = httpx.post(f"{server.url}/STU3/Subscription", content=json.dumps(body),
                   headers=token(tmp, "user/Subscription.*"))
    # STU3 structure errors are the gateway's 422 INVALID_RESOURCE, the rest 400
    structural = body.get("resourceType") == "Subscription" and "reason" not in body
    assert r.status_code == (422 if structural else 400), r.text
    assert r.json()["resourceType"] == "OperationOutcome"


def test_capability_statement_lists_subscription(gateway: tuple[LiveServer, Path]) -> None:
    server, _ = gateway
    cs = httpx.get(f"{server.url}/STU3/metadata").json()
    res = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert {i["code"] for i in res["Subscription"]["interaction"]} == {
        "create", "read", "search-type", "update", "delete"}
    assert res["Subscription"]["versioning"] == "versioned-update"


def test_no_subscription_when_the_feed_is_off(demo_sqlite_url: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCG_ADT_MODE", raising=False)
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path))
    with LiveServer(app) as server:
        cs = httpx.get(f"{server.url}/STU3/metadata").json()
        assert "Subscription" not in {r["type"] for r in cs["rest"][0]["resource"]}
        r = httpx.get(f"{server.url}/STU3/Subscription",
                      headers=token(tmp_path, "user/*.*"))
        assert r.status_code == 404


def test_merged_patient_answers_replaced_by(gateway: tuple[LiveServer, Path]) -> None:
    server, tmp = gateway
    store = AdtStore(f"sqlite:///{tmp / 'adt.sqlite'}")
    try:
        # the PAS merged D0000002 into D0000001 (an A40): recorded by the listener's store
        store.record(Incoming("PAS^RCB", "M1", "d", "A40", "D0000001",
                              [{"resourceType": "Patient", "id": "D0000001"}],
                              retired="D0000002"))
    finally:
        store.close()
    h = token(tmp, "user/Patient.rs")
    base = f"{server.url}/STU3"
    r = httpx.get(f"{base}/Patient/D0000002", headers=h)
    assert r.status_code == 200
    body = r.json()
    assert body["active"] is False
    assert body["link"] == [{"other": {"reference": "Patient/D0000001"}, "type": "replaced-by"}]
    # a search by the retired PAS number finds the survivor
    r = httpx.get(f"{base}/Patient", params={"identifier": f"{PAS}|D0000002"}, headers=h)
    found = [e["resource"] for e in r.json().get("entry", [])]
    assert [i["value"] for p in found for i in p["identifier"] if i["system"] == PAS] == [
        "D0000001"]
    # without read permission the merge is not disclosed
    r = httpx.get(f"{base}/Patient/D0000002", headers=token(tmp, "user/Encounter.rs"))
    assert r.status_code == 403


def test_serve_runs_the_listener_when_configured(demo_sqlite_url: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 receiver: Receiver) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CCG_ADT_MODE", "serve")
    monkeypatch.setenv("CCG_ADT_LISTEN", f"127.0.0.1:{port}")
    monkeypatch.setenv("CCG_ADT_STORE_URL", f"sqlite:///{tmp_path / 'adt.sqlite'}")
    monkeypatch.setenv("CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS", "http://127.0.0.1:*")
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path, auth_mode=""))
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/STU3/Subscription",
                       headers=token(tmp_path, "user/Subscription.*"),
                       content=json.dumps(sub(endpoint=receiver.url,
                                              criteria="Patient?identifier="
                                              "https://fhir.nhs.uk/Id/nhs-number|3333333333")))
        assert r.status_code == 201
        sender = Sender(port)
        try:
            reply = sender.send(er7_bytes(GOLDEN / "itk-a28.hl7"))
        finally:
            sender.close()
        assert reply is not None and msa(reply)[1] == "AA"
        (got,) = receiver.wait_for(1)
    assert got.body is not None
    assert got.body["entry"][0]["resource"]["id"] == "R1234567"
    assert got.headers["x-adt-event"] == "A28"


def test_subscriptions_per_client_are_bounded(gateway: tuple[LiveServer, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    server, tmp = gateway
    h = token(tmp, "user/Subscription.*")
    url = f"{server.url}/STU3/Subscription"
    statuses = [httpx.post(url, content=json.dumps(sub()), headers=h).status_code
                for _ in range(51)]
    assert statuses == [201] * 50 + [422], statuses
    r = httpx.post(url, content=json.dumps(sub()), headers=h)
    assert code(r) == "SUBSCRIPTION_LIMIT"


def test_a_subscription_past_its_end_is_off_and_not_fed(tmp_path: Path) -> None:
    import time

    from gateway.adt.api import checked, end_of
    from tests.gateway.adt.conftest import adt_settings

    store = AdtStore(f"sqlite:///{tmp_path / 'a.sqlite'}")
    try:
        res = checked(sub(end="2999-01-01T00:00:00Z", criteria="Patient"), adt_settings(tmp_path))
        store.add_subscription(res["id"], res, "c", time.time() + 0.3)
        assert end_of(res) is not None
        rec = store.record(Incoming("P^R", "X1", "d", "A08", "D1",
                                    [{"resourceType": "Patient", "id": "D1"}]))
        assert rec.notifications == 1
        time.sleep(0.6)  # past its end (and past the half-second subscription cache)
        rec = store.record(Incoming("P^R", "X2", "d", "A08", "D1",
                                    [{"resourceType": "Patient", "id": "D1"}]))
        assert rec.notifications == 0
        got = store.get_subscription(res["id"])
        assert got is not None and got["status"] == "off"
    finally:
        store.close()


def test_the_survivor_gains_replaces_links(gateway: tuple[LiveServer, Path]) -> None:
    server, tmp = gateway
    base = f"{server.url}/STU3"
    h = token(tmp, "user/Patient.rs")
    first, other = (httpx.get(f"{base}/Patient", params={"identifier": f"{PAS}|{pas}"},
                              headers=h).json()["entry"][0]["resource"]["id"]
                    for pas in ("D0000001", "D0000003"))
    r = httpx.get(f"{base}/Patient/{first}", headers=h)
    before, before_etag = r.json(), r.headers["etag"]
    assert httpx.get(f"{base}/Patient/{first}", headers={**h, "If-None-Match": before_etag}
                     ).status_code == 304
    store = AdtStore(f"sqlite:///{tmp / 'adt.sqlite'}")
    try:  # two merges into the demo Patient ``first`` (A40, then A34)
        for n, retired in enumerate(("OLD-1", "OLD-2")):
            store.record(Incoming("PAS^RCB", f"MS{n}", "d", "A40" if n == 0 else "A34", first,
                                  [{"resourceType": "Patient", "id": first}], retired=retired))
    finally:
        store.close()
    r = httpx.get(f"{base}/Patient/{first}", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [ln for ln in body["link"] if ln["type"] == "replaces"] == [
        {"other": {"reference": "Patient/OLD-1"}, "type": "replaces"},
        {"other": {"reference": "Patient/OLD-2"}, "type": "replaces"}]
    # nothing else changed, and the retired ids still answer replaced-by
    assert {k: v for k, v in body.items() if k != "link"} == \
        {k: v for k, v in before.items() if k != "link"}
    assert int(r.headers["content-length"]) == len(r.content)
    for retired in ("OLD-1", "OLD-2"):
        assert httpx.get(f"{base}/Patient/{retired}", headers=h).json()["link"] == [
            {"other": {"reference": f"Patient/{first}"}, "type": "replaced-by"}]
    # in XML as asked, and the same through HEAD
    r = httpx.get(f"{base}/Patient/{first}", params={"_format": "xml"}, headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith(
        "application/fhir+xml")
    assert r.text.count('<type value="replaces"/>') == 2 and "Patient/OLD-2" in r.text
    r = httpx.head(f"{base}/Patient/{first}", headers=h)
    assert r.status_code == 200 and r.content == b""
    # a cached copy from before the merge is not "not modified"; one from after it is
    old_tag = before_etag
    assert httpx.get(f"{base}/Patient/{first}", headers={**h, "If-None-Match": old_tag}
                     ).status_code == 200
    tag = httpx.get(f"{base}/Patient/{first}", headers=h).headers["etag"]
    assert tag != old_tag
    r = httpx.get(f"{base}/Patient/{first}", headers={**h, "If-None-Match": tag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == tag
    # a Patient nothing was merged into is untouched; a refusal passes through unchanged
    assert "replaces" not in httpx.get(f"{base}/Patient/{other}", headers=h).text
    r = httpx.get(f"{base}/Patient/{first}", headers=token(tmp, "user/Encounter.rs"))
    assert r.status_code == 403 and "OLD-1" not in r.text


SECRET = "Bearer s3cret-hook-token"


def test_channel_headers_are_never_read_back(gateway: tuple[LiveServer, Path]) -> None:
    server, tmp = gateway
    base = f"{server.url}/STU3"
    h = token(tmp, "user/Subscription.*")
    body = sub(channel={"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook",
                        "header": [f"Authorization: {SECRET}", "X-Ward: 7"]})
    created = httpx.post(f"{base}/Subscription", content=json.dumps(body), headers=h)
    assert created.status_code == 201 and created.headers["etag"] == 'W/"1"'
    sid = created.json()["id"]
    answers = [created, httpx.get(f"{base}/Subscription/{sid}", headers=h),
               httpx.get(f"{base}/Subscription", headers=h),
               httpx.get(f"{base}/Subscription/{sid}", params={"_format": "xml"}, headers=h)]
    for r in answers:
        assert r.status_code in (200, 201) and "s3cret" not in r.text and "Ward: 7" not in r.text
    read = answers[1].json()
    assert read["channel"]["header"] == ["Authorization", "X-Ward"]
    assert {"system": "http://hl7.org/fhir/v3/ObservationValue", "code": "REDACTED",
            "display": "redacted"} in read["meta"]["security"]
    assert answers[2].json()["entry"][0]["resource"]["channel"]["header"] == [
        "Authorization", "X-Ward"]
    # the store (and so delivery) still has the values
    store = AdtStore(f"sqlite:///{tmp / 'adt.sqlite'}")
    try:
        raw = store.stored_subscription(sid)
    finally:
        store.close()
    assert raw is not None and SECRET.encode() in raw
    # a header without a value is refused at create (it could only be a redacted read-back)
    r = httpx.post(f"{base}/Subscription", headers=h, content=json.dumps(
        sub(channel={"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook",
                     "header": ["Authorization"]})))
    assert r.status_code == 400


def test_update_is_versioned_and_rechecked(gateway: tuple[LiveServer, Path]) -> None:
    server, tmp = gateway
    base = f"{server.url}/STU3"
    h = token(tmp, "user/Subscription.*")
    body = sub(channel={"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook",
                        "header": [f"Authorization: {SECRET}", "X-Ward: 7"]})
    sid = httpx.post(f"{base}/Subscription", content=json.dumps(body), headers=h).json()["id"]
    url = f"{base}/Subscription/{sid}"
    # read-modify-write: the redacted read sent back keeps the header values
    current = httpx.get(url, headers=h).json()
    current["criteria"] = f"Patient?identifier={PAS}|D0000001"
    current["status"] = "off"
    r = httpx.put(url, content=json.dumps(current), headers={**h, "If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"2"' and r.json()["meta"]["versionId"] == "2"
    got = httpx.get(url, headers=h).json()
    assert (got["status"], got["criteria"]) == ("off", f"Patient?identifier={PAS}|D0000001")
    assert httpx.get(f"{base}/Subscription", params={"status": "off"},
                     headers=h).json()["total"] == 1
    store = AdtStore(f"sqlite:///{tmp / 'adt.sqlite'}")
    try:
        raw = store.stored_subscription(sid)
    finally:
        store.close()
    assert raw is not None and SECRET.encode() in raw and b"X-Ward: 7" in raw
    # a stale version, in If-Match or in meta.versionId, is 412 and changes nothing
    got["status"] = "active"
    for headers, version in (({"If-Match": 'W/"1"'}, None), ({}, "1")):
        attempt = json.loads(json.dumps(got))
        if version:
            attempt["meta"]["versionId"] = version
        r = httpx.put(url, content=json.dumps(attempt), headers={**h, **headers})
        assert r.status_code == 412 and code(r) == "VERSION_CONFLICT", r.text
    # re-checked as at create: each refusal leaves version 2 as it was
    bad: list[dict[str, Any]] = [
        {**got, "criteria": "Patient?family=smith"},
        {**got, "criteria": "Observation?patient=1"},
        {**got, "status": "error"},
        {**got, "channel": {**got["channel"], "endpoint": "http://10.0.0.5/hook"}},
        {**got, "channel": {**got["channel"], "header": ["X-Unknown"]}},
        {**got, "end": "2001-01-01T00:00:00Z"},
    ]
    for b in bad:
        r = httpx.put(url, content=json.dumps(b), headers={**h, "If-Match": 'W/"2"'})
        assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome", b
    # a channel or header list of another JSON type: INVALID_RESOURCE, not a 500 (TypeError)
    for wrong in ({**got, "channel": 7}, {**got, "channel": ["rest-hook"]},
                  {**got, "channel": {**got["channel"], "header": -1}},
                  {**got, "channel": {**got["channel"], "header": {"X-Ward": "7"}}}):
        r = httpx.put(url, content=json.dumps(wrong), headers={**h, "If-Match": 'W/"2"'})
        assert (r.status_code, code(r)) == (422, "INVALID_RESOURCE"), (wrong, r.text)
    r = httpx.put(url, content=json.dumps({**got, "id": "other"}), headers=h)
    assert r.status_code == 400
    r = httpx.put(f"{base}/Subscription/no-such-sub",
                  content=json.dumps({**got, "id": "no-such-sub"}), headers=h)
    assert r.status_code == 404
    assert httpx.get(url, headers=h).headers["etag"] == 'W/"2"'
    # active again; a new header value replaces, a header left out is removed
    got["channel"]["header"] = ["Authorization: Bearer rotated"]
    r = httpx.put(url, content=json.dumps(got), headers={**h, "If-Match": 'W/"2"'})
    assert r.status_code == 200 and r.json()["status"] == "active"
    store = AdtStore(f"sqlite:///{tmp / 'adt.sqlite'}")
    try:
        raw = store.stored_subscription(sid)
    finally:
        store.close()
    assert raw is not None and b"Bearer rotated" in raw and b"s3cret" not in raw \
        and b"X-Ward" not in raw
    # the update scope is its own; audited like everything else
    r = httpx.put(url, content=json.dumps(got), headers=token(tmp, "user/Subscription.crs"))
    assert r.status_code == 403 and code(r) == "ACCESS_DENIED"
    records = [json.loads(line) for line in (tmp / "audit.log").read_text().splitlines()
               if line.strip()]
    seen = {(a["interaction"], a["resource_type"], a["outcome"]["status"]) for a in records}
    assert {("update", "Subscription", 200), ("update", "Subscription", 412),
            ("update", "Subscription", 403)} <= seen


def test_off_stops_notifications_and_active_resumes(tmp_path: Path, any_store: AdtStore
                                                     ) -> None:
    from gateway.adt.api import checked, checked_update
    from tests.gateway.adt.conftest import adt_settings

    settings = adt_settings(tmp_path)
    store = any_store  # SQLite and PostgreSQL (the update is a compare-and-swap on bytes)

    def ev(n: int) -> Incoming:
        return Incoming("P^R", f"OFF{n}", "d", "A08", "D1",
                        [{"resourceType": "Patient", "id": "D1"}])

    def update(status: str) -> None:
        raw = store.stored_subscription(res["id"])
        assert raw is not None
        current = json.loads(raw)
        new = checked_update({**current, "status": status}, current, settings)
        assert store.update_subscription(res["id"], new, raw, None)
        assert not store.update_subscription(res["id"], new, raw, None)  # stale: refused

    try:
        res = checked(sub(criteria="Patient"), settings)
        store.add_subscription(res["id"], res, "c")
        assert store.record(ev(1)).notifications == 1
        update("off")
        assert store.outbox_counts() == {"cancelled": 1}
        assert store.due(time.time() + 1) == []
        assert store.record(ev(2)).notifications == 0
        # a notification in flight when it was turned off does not turn it back on
        store.failed(1, res["id"], "HTTP 503", None)
        assert json.loads(store.stored_subscription(res["id"]) or b"{}")["status"] == "off"
        update("requested")
        seq = store.record(ev(3)).seq
        assert store.record(ev(3)).notifications == 0  # a resend: recorded once
        assert [d.seq for d in store.due(time.time() + 1)] == [seq]
    finally:
        store.close()
