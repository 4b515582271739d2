"""Binary/[id]: the documents' bytes in their own media type or as a FHIR Binary, on SQLite and
PostgreSQL; authorised like a read of the DocumentReference (scopes on both, the patient
compartment), audited, and never reading outside the document root.

The expected bytes come straight from the database rows and the files (sqlite3/SQLAlchemy and
the file system), sharing no code with gateway.binary.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from fhir.resources.STU3 import get_fhir_model_class
from lxml import etree
from starlette.applications import Starlette

from gateway.demo_pas import build_database, demo_documents_dir, ensure_sqlite_demo
from tests.security.principals import as_, install, patient_token

pytestmark = pytest.mark.anyio

MIMES = {"application/pdf", "application/rtf", "text/plain", "application/hl7-v3+xml"}


def _docs_root(sqlite_url: str) -> Path:
    return demo_documents_dir(Path(sqlite_url.removeprefix("sqlite:///")))


def stored(url: str, root: Path, rid: int) -> tuple[dict[str, Any], bytes]:
    """The row and its content, read directly (the oracle)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text('SELECT * FROM "DOCUMENTS" WHERE "DOCMT_REFNO" = :r'),
                               {"r": rid}).mappings().one()
            if row["STORE_TYPE"] == "F":
                return dict(row), (root / row["FILE_PATH"]).read_bytes()
            blob = conn.execute(sa.text('SELECT "CONTENT" FROM "DOCUMENT_BLOBS" '
                                        'WHERE "DOCMT_REFNO" = :r'), {"r": rid}).scalar_one()
            return dict(row), bytes(blob)
    finally:
        engine.dispose()


def _ids(url: str, where: str) -> list[int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text(
                f'SELECT "DOCMT_REFNO" FROM "DOCUMENTS" WHERE {where} ORDER BY 1'))]
    finally:
        engine.dispose()


@pytest.fixture
async def api(demo_url: str, demo_sqlite_url: str, make_app: Callable[..., Starlette],
              tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # The PostgreSQL demo names the same files: its rows were generated from the same seed.
    app = make_app(demo_url, document_dir=_docs_root(demo_sqlite_url),
                   audit_log=str(tmp_path / "audit.jsonl"), binary_fhir_max_bytes=1500)
    install(app, {
        "P": patient_token("100001"),
        "Q": patient_token("100003"),
        "no-binary": patient_token("100001", "patient/DocumentReference.read"),
        "no-docref": patient_token("100001", "patient/Binary.read"),
    })
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def _code(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    code: str = body["issue"][0]["details"]["coding"][0]["code"]
    return code


async def test_every_fixture_document_in_its_own_media_type(
        api: httpx.AsyncClient, demo_url: str, demo_sqlite_url: str) -> None:
    ids = _ids(demo_url, '"PATNT_REFNO" = 100001 AND "DELETED_FLAG" = \'N\'')
    seen = set()
    for rid in ids:
        row, content = stored(demo_url, _docs_root(demo_sqlite_url), rid)
        doc = (await api.get(f"/STU3/DocumentReference/{rid}")).json()
        attachment = doc["content"][0]["attachment"]
        assert attachment["url"] == f"Binary/{rid}"
        r = await api.get(f"/STU3/{attachment['url']}")  # no Accept: the document itself
        assert r.status_code == 200
        assert r.headers["content-type"].split(";")[0] == row["MIME_TYPE"]
        assert r.content == content
        assert int(r.headers["content-length"]) == len(content) == attachment["size"]
        assert base64.b64decode(attachment["hash"]) == hashlib.sha1(content).digest()
        assert r.headers["last-modified"] and r.headers["etag"].startswith('"')
        for accept in ("*/*", row["MIME_TYPE"], row["MIME_TYPE"].split("/")[0] + "/*",
                       f"image/png;q=0.9, {row['MIME_TYPE']}"):
            again = await api.get(f"/STU3/Binary/{rid}", headers={"Accept": accept})
            assert again.status_code == 200 and again.content == content, accept
        cached = await api.get(f"/STU3/Binary/{rid}",
                               headers={"If-None-Match": r.headers["etag"]})
        assert cached.status_code == 304 and cached.content == b""
        seen.add((row["MIME_TYPE"], row["STORE_TYPE"]))
    assert seen == {(m, s) for m in MIMES for s in "FB"}  # every format from both stores


async def test_as_a_fhir_binary_when_fhir_is_asked_for(api: httpx.AsyncClient, demo_url: str,
                                                      demo_sqlite_url: str) -> None:
    rid = _ids(demo_url, '"PATNT_REFNO" = 100001 AND "CONTENT_SIZE" <= 1500')[0]
    row, content = stored(demo_url, _docs_root(demo_sqlite_url), rid)
    for params, headers in (({"_format": "json"}, {}),
                            ({}, {"Accept": "application/fhir+json"}),
                            ({}, {"Accept": "application/json+fhir"}),
                            # _format wins over Accept (explore page, query 4)
                            ({"_format": "json"}, {"Accept": "application/pdf"})):
        r = await api.get(f"/STU3/Binary/{rid}", params=params, headers=headers)
        assert r.status_code == 200, (params, headers, r.text)
        body = r.json()
        get_fhir_model_class("Binary").model_validate(body)
        assert body["resourceType"] == "Binary" and body["id"] == str(rid)
        assert body["contentType"] == row["MIME_TYPE"]
        assert base64.b64decode(body["content"]) == content
        assert body["securityContext"] == {"reference": f"DocumentReference/{rid}"}
    for params, headers in (({"_format": "xml"}, {}),
                            ({}, {"Accept": "application/fhir+xml"})):
        r = await api.get(f"/STU3/Binary/{rid}", params=params, headers=headers)
        assert r.status_code == 200 and "xml" in r.headers["content-type"]
        root = etree.fromstring(r.content)
        assert root.tag == "{http://hl7.org/fhir}Binary"
        value = root.find("{http://hl7.org/fhir}content").get("value")
        assert base64.b64decode(value) == content


async def test_what_cannot_be_served_is_a_clear_4xx(api: httpx.AsyncClient,
                                                    demo_url: str) -> None:
    big = _ids(demo_url, '"PATNT_REFNO" = 100001 AND "CONTENT_SIZE" > 1500')[0]
    r = await api.get(f"/STU3/Binary/{big}", params={"_format": "json"})
    assert r.status_code == 406 and _code(r) == "BINARY_TOO_LARGE"
    assert (await api.get(f"/STU3/Binary/{big}")).status_code == 200  # natively: any size
    r = await api.get(f"/STU3/Binary/{big}", headers={"Accept": "image/png"})
    assert r.status_code == 406 and _code(r) == "NOT_ACCEPTABLE"
    r = await api.get("/STU3/Binary/99999999")
    assert r.status_code == 404 and _code(r) == "RESOURCE_NOT_FOUND"
    r = await api.put(f"/STU3/Binary/{big}", content=b"x")
    assert r.status_code == 405 and _code(r) == "METHOD_NOT_ALLOWED"


async def test_scopes_and_the_patient_compartment(api: httpx.AsyncClient, demo_url: str) -> None:
    own = _ids(demo_url, '"PATNT_REFNO" = 100001 AND "DELETED_FLAG" = \'N\'')[0]
    other = _ids(demo_url, '"PATNT_REFNO" <> 100001 AND "DELETED_FLAG" = \'N\'')[0]
    assert (await api.get(f"/STU3/Binary/{own}", headers=as_("P"))).status_code == 200
    # Another patient's document: not found, exactly as for a read of it (nothing disclosed).
    for name in ("P", "Q"):
        target = other if name == "P" else own
        r = await api.get(f"/STU3/Binary/{target}", headers=as_(name))
        assert r.status_code == 404 and _code(r) == "RESOURCE_NOT_FOUND", name
        assert b"%PDF" not in r.content
        r = await api.get(f"/STU3/Binary/{target}", params={"_format": "json"},
                          headers=as_(name))
        assert r.status_code == 404
    # Both scopes are needed: on Binary and on the DocumentReference it is the content of.
    for name in ("no-binary", "no-docref"):
        r = await api.get(f"/STU3/Binary/{own}", headers=as_(name))
        assert r.status_code == 403 and _code(r) == "ACCESS_DENIED", name


async def test_reads_are_audited_with_the_patient(api: httpx.AsyncClient, demo_url: str,
                                                  tmp_path: Path) -> None:
    own = _ids(demo_url, '"PATNT_REFNO" = 100001 AND "DELETED_FLAG" = \'N\'')[0]
    other = _ids(demo_url, '"PATNT_REFNO" <> 100001 AND "DELETED_FLAG" = \'N\'')[0]
    assert (await api.get(f"/STU3/Binary/{own}", headers=as_("P"))).status_code == 200
    assert (await api.get(f"/STU3/Binary/{own}", params={"_format": "json"})).status_code in (
        200, 406)
    assert (await api.get(f"/STU3/Binary/{other}", headers=as_("P"))).status_code == 404
    assert (await api.get(f"/STU3/Binary/{own}", headers=as_("no-binary"))).status_code == 403
    records = [orjson.loads(line) for line in
               (tmp_path / "audit.jsonl").read_bytes().splitlines() if line]
    assert len(records) == 4
    streamed, fhir, refused, denied = records
    for rec in records:
        assert rec["interaction"] == "read" and rec["resource_type"] == "Binary"
    assert streamed["outcome"] == {"status": 200, "code": None, "result": "success"}
    assert streamed["patient"] == "100001" and streamed["context_patient"] == "100001"
    assert sorted(streamed["entities"]) == [f"Binary/{own}", f"DocumentReference/{own}"]
    assert fhir["patient"] == "100001"
    assert refused["outcome"]["status"] == 404 and refused["entities"] == []
    assert refused["patient"] == "100001"  # the token's compartment: who asked, for whom
    assert denied["outcome"]["result"] == "denied"
    assert denied["outcome"]["code"] == "ACCESS_DENIED"


# --- a private store: BLOBs of several chunks, and locations that must not be followed --------


def _private(url: str, root: Path) -> None:
    build_database(url, patients=30, documents_dir=root)


def _set(url: str, rid: int, **values: Any) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            doc = {k: v for k, v in values.items() if k != "CONTENT"}
            if doc:
                sets = ", ".join(f'"{k}" = :{k}' for k in doc)
                conn.execute(sa.text(f'UPDATE "DOCUMENTS" SET {sets} WHERE "DOCMT_REFNO" = :r'),
                             {**doc, "r": rid})
            if "CONTENT" in values:
                conn.execute(sa.text('UPDATE "DOCUMENT_BLOBS" SET "CONTENT" = :c '
                                     'WHERE "DOCMT_REFNO" = :r'),
                             {"c": values["CONTENT"], "r": rid})
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def private_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    root = tmp_path / "documents"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'private.sqlite'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.create_database(f"binary_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}")
    _private(url, root)
    return url, root


async def _client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


async def test_a_blob_of_many_chunks(private_store: tuple[str, Path],
                                     make_app: Callable[..., Starlette]) -> None:
    url, root = private_store
    rid = _ids(url, '"STORE_TYPE" = \'B\' AND "DELETED_FLAG" = \'N\'')[0]
    content = os.urandom(3 * 256 * 1024 + 17)  # three whole chunks and a tail
    _set(url, rid, CONTENT=content, CONTENT_SIZE=len(content),
         CONTENT_SHA1=hashlib.sha1(content).hexdigest(), MIME_TYPE="application/pdf")
    async for api in _client(make_app(url, document_dir=root)):
        r = await api.get(f"/STU3/Binary/{rid}")
        assert r.status_code == 200 and r.content == content
        assert r.headers["content-length"] == str(len(content))


async def test_locations_outside_the_document_root_are_never_read(
        private_store: tuple[str, Path], make_app: Callable[..., Starlette],
        tmp_path: Path) -> None:
    url, root = private_store
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not a document")
    (root / "escape").symlink_to(secret)
    files = _ids(url, '"STORE_TYPE" = \'F\' AND "DELETED_FLAG" = \'N\'')
    cases = {files[0]: "../secret.txt", files[1]: str(secret), files[2]: "escape",
             files[3]: "0000/../../secret.txt"}
    for rid, location in cases.items():
        _set(url, rid, FILE_PATH=location)
    missing = files[4]
    (root / stored(url, root, missing)[0]["FILE_PATH"]).unlink()
    async for api in _client(make_app(url, document_dir=root)):
        for rid in cases:
            r = await api.get(f"/STU3/Binary/{rid}")
            assert r.status_code == 502 and _code(r) == "DOCUMENT_CONTENT_UNAVAILABLE", rid
            assert b"not a document" not in r.content and b"secret" not in r.content
        r = await api.get(f"/STU3/Binary/{missing}")
        assert r.status_code == 502 and _code(r) == "DOCUMENT_CONTENT_UNAVAILABLE"
        # the DocumentReference itself is still served: only the content is unavailable
        assert (await api.get(f"/STU3/DocumentReference/{missing}")).status_code == 200


async def test_the_demo_finds_its_documents_beside_the_database(
        tmp_path: Path, make_app: Callable[..., Starlette]) -> None:
    path = ensure_sqlite_demo(tmp_path / "demo" / "d.sqlite", patients=30, progress=False)
    url = f"sqlite:///{path}"
    rid = _ids(url, '"STORE_TYPE" = \'F\' AND "DELETED_FLAG" = \'N\'')[0]
    async for api in _client(make_app(url)):  # no document_dir: <file>.documents
        r = await api.get(f"/STU3/Binary/{rid}")
        assert r.status_code == 200
        assert r.content == stored(url, demo_documents_dir(path), rid)[1]
    shutil.rmtree(demo_documents_dir(path))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_streamed_document_is_not_released_unaudited(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    """The audit layer does not buffer a streamed body, but still refuses it when the record
    cannot be written: 503 and not one byte of the document."""
    rid = _ids(demo_sqlite_url, '"PATNT_REFNO" = 100001 AND "MIME_TYPE" = \'application/pdf\'')[0]
    async for api in _client(make_app(demo_sqlite_url, audit_log="/dev/full")):
        r = await api.get(f"/STU3/Binary/{rid}")
        assert r.status_code == 503 and _code(r) == "AUDIT_UNAVAILABLE"
        assert b"%PDF" not in r.content
