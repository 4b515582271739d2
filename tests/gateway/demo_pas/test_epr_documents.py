"""The demo document store: deterministic, leaves every other row alone, both stores and all
four formats present, and each document is what its row says (size, SHA-1, a file that a PDF
parser, an XML parser and an RTF reader accept)."""

from __future__ import annotations

import functools
import hashlib
import io
import pathlib
import re
import sqlite3
from collections import Counter
from typing import Any

import pytest
import yaml
from lxml import etree
from pypdf import PdfReader

import gateway.demo_pas.generate as gen
from gateway.demo_pas import demo_documents_dir, ensure_sqlite_demo, epr_clinical, epr_documents

SEED = 20261123
REPO = pathlib.Path(__file__).parents[3]
CODEMAPS = REPO / "mappings" / "codemaps"
DOC_TABLES = {t.name for t in epr_documents.TABLES}
Rows = dict[str, list[dict[str, Any]]]


def _rows(batches: Any) -> Rows:
    out: Rows = {}
    for batch in batches:
        out.setdefault(batch.table.name, []).extend(batch.rows)
    return out


@functools.cache
def _built(patients: int, seed: int, chunk: int = 5000) -> Rows:
    return _rows(epr_documents.extend(
        epr_clinical.extend(gen.generate(patients, seed, chunk), seed), seed))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("docs") / "demo.sqlite"
    ensure_sqlite_demo(path, patients=600, progress=False)
    return path


def test_other_tables_are_exactly_as_before() -> None:
    before = _rows(epr_clinical.extend(gen.generate(300, SEED), SEED))
    after = _built(300, SEED)
    assert {k: v for k, v in after.items() if k not in DOC_TABLES} == before
    assert set(after) >= DOC_TABLES


def test_rows_do_not_depend_on_chunk_size_and_follow_the_seed() -> None:
    assert _built(150, 7, 7) == _built(150, 7, 5000)
    assert _built(150, 7)["DOCUMENTS"] != _built(150, 8)["DOCUMENTS"]


def test_a_few_thousand_documents_at_the_default_scale() -> None:
    # ~0.33 per patient: 10,000 patients (the default demo) give a few thousand documents.
    n = len(_built(1500, SEED)["DOCUMENTS"])
    assert 350 <= n <= 700, n


def test_both_stores_all_formats_and_the_fixture_patient() -> None:
    docs = _built(1500, SEED)["DOCUMENTS"]
    assert Counter(d["STORE_TYPE"] for d in docs).keys() == {"F", "B"}
    assert set(Counter(d["MIME_TYPE"] for d in docs)) == set(epr_documents.EXTENSIONS)
    mine = [d for d in docs if d["PATNT_REFNO"] == 100001]
    assert {(d["MIME_TYPE"], d["STORE_TYPE"]) for d in mine} >= {
        (m, s) for m in epr_documents.EXTENSIONS for s in "FB"}
    assert {d["DOC_STATUS"] for d in mine} >= {"S", "A", "E", "P"}
    blobs = {b["DOCMT_REFNO"] for b in _built(1500, SEED)["DOCUMENT_BLOBS"]}
    assert blobs == {d["DOCMT_REFNO"] for d in docs if d["STORE_TYPE"] == "B"}
    assert all(d["FILE_PATH"] for d in docs if d["STORE_TYPE"] == "F")
    # Nobody's documents belong to an archived duplicate (100005) or another patient's spell.
    assert not [d for d in docs if d["PATNT_REFNO"] == 100005]


def test_every_local_code_is_in_the_code_maps() -> None:
    docs = _built(1500, SEED)["DOCUMENTS"]
    for name, column in (("document-type", "DOCTY_CODE"), ("document-type-snomed", "DOCTY_CODE"),
                         ("document-reference-status", "DOC_STATUS"),
                         ("document-doc-status", "DOC_STATUS")):
        listed = yaml.safe_load((CODEMAPS / f"{name}.yaml").read_text())["map"]
        assert {d[column] for d in docs} <= set(listed), name


def test_spells_are_the_patients_own() -> None:
    rows = _built(1500, SEED)
    owner = {s["PRVSP_REFNO"]: s["PATNT_REFNO"] for s in rows["PROVIDER_SPELLS"]}
    for d in rows["DOCUMENTS"]:
        if d["PRVSP_REFNO"] is not None:
            assert owner[d["PRVSP_REFNO"]] == d["PATNT_REFNO"]
        assert d["CREATED_DTTM"] >= (d["SERVICE_END_DTTM"] or "")


def _content(built: pathlib.Path, db: sqlite3.Connection, row: sqlite3.Row) -> bytes:
    if row["STORE_TYPE"] == "F":
        return (demo_documents_dir(built) / row["FILE_PATH"]).read_bytes()
    blob = db.execute('SELECT CONTENT FROM DOCUMENT_BLOBS WHERE DOCMT_REFNO = ?',
                      (row["DOCMT_REFNO"],)).fetchone()
    return bytes(blob[0])


def test_each_document_is_what_its_row_says(built: pathlib.Path) -> None:
    db = sqlite3.connect(built)
    db.row_factory = sqlite3.Row
    rows = db.execute("SELECT * FROM DOCUMENTS").fetchall()
    assert rows
    seen: Counter[str] = Counter()
    for row in rows:
        content = _content(built, db, row)
        assert len(content) == row["CONTENT_SIZE"]
        assert hashlib.sha1(content).hexdigest() == row["CONTENT_SHA1"]
        mime = row["MIME_TYPE"]
        seen[mime] += 1
        if mime == epr_documents.PDF:
            page = PdfReader(io.BytesIO(content), strict=True).pages[0]
            assert row["DOC_TITLE"] in page.extract_text()
        elif mime == epr_documents.CDA:
            root = etree.fromstring(content)
            assert root.tag == "{urn:hl7-org:v3}ClinicalDocument"
            assert root.findtext("{urn:hl7-org:v3}title") == row["DOC_TITLE"]
        elif mime == epr_documents.RTF:
            text = content.decode("ascii")
            assert text.startswith("{\\rtf1") and text.count("{") == text.count("}")
            assert row["DOC_TITLE"] in re.sub(r"\\par\n", "\n", text)
        else:
            assert content.decode("utf-8").startswith(row["DOC_TITLE"] + "\r\n")
    db.close()
    assert set(seen) == set(epr_documents.EXTENSIONS)
    files = {p.relative_to(demo_documents_dir(built)).as_posix()
             for p in demo_documents_dir(built).rglob("*") if p.is_file()}
    assert files == {r["FILE_PATH"] for r in rows if r["STORE_TYPE"] == "F"}


def test_writers_escape_what_their_syntax_reserves() -> None:
    awkward = ["a (bracketed) \\ back-slash", "{braces} and £ and Zoë"]
    reader = PdfReader(io.BytesIO(epr_documents.pdf(awkward)), strict=True)
    assert "a (bracketed) \\ back-slash" in reader.pages[0].extract_text()
    rtf = epr_documents.rtf(awkward).decode("ascii")
    assert "\\{braces\\}" in rtf and "\\u163?" in rtf and "Zo\\u235?" in rtf
