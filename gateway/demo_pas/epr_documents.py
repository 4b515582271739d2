"""The demo PAS's document store: an EDMS-style table of letters and discharge summaries.

``DOCUMENTS`` holds the metadata as the trust's electronic document management system keeps
it (a local document type code, ``YYYYMMDDHHMM`` strings, a status letter, the author as a
clinician key, the spell it belongs to, MIME type, size and SHA-1 of the content). The content
itself lives in one of two places, as in real EDMS estates that migrated half-way:

* ``STORE_TYPE = 'F'``: a file under the document root, ``FILE_PATH`` relative to it
  (written when the demo is built, beside the demo database: ``<demo file>.documents/``);
* ``STORE_TYPE = 'B'``: a BLOB in ``DOCUMENT_BLOBS.CONTENT``.

Formats: PDF, RTF, plain text and CDA R2 XML, all small and byte-for-byte deterministic.
The PDF and RTF writers are hand-rolled: a one-page PDF with Helvetica text is a few fixed
objects and an xref table, and the usual library (reportlab) stamps creation dates and random
document ids into every file, which the deterministic demo would have to undo. CDA is built
with ElementTree, never as text.

Rows come from their own random stream (seeded from the build seed), so every row of the
existing tables stays as it was. Fixture patient 100001 has one document of every MIME type in
each store, plus an amended letter that supersedes an earlier one and one entered in error.
"""

from __future__ import annotations

import hashlib
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import CHAR, Column, Index, Integer, LargeBinary, String, Table

from gateway.demo_pas import schema
from gateway.demo_pas.generate import REFERENCE_DATE, Batch
from gateway.demo_pas.schema import metadata

Row = dict[str, Any]

_STREAM = 0x444F4353  # "DOCS": a stream of its own

documents = Table(
    "DOCUMENTS",
    metadata,
    Column("DOCMT_REFNO", Integer, primary_key=True, autoincrement=False),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("PRVSP_REFNO", Integer),  # the spell a discharge summary is about
    Column("DOCTY_CODE", String(6), nullable=False),  # local document type
    Column("DOC_TITLE", String(120), nullable=False),
    Column("DOC_STATUS", String(1), nullable=False),  # F final, P draft, A amended,
    #                                                   S superseded, E entered in error
    Column("AUTHOR_REFNO", Integer),  # CLINICIANS.PROCA_REFNO
    Column("SPECT_CODE", String(5)),
    Column("CREATED_DTTM", String(12), nullable=False),
    Column("SERVICE_START_DTTM", String(12)),  # what the document is about: the spell,
    Column("SERVICE_END_DTTM", String(12)),  # or the clinic appointment
    Column("FILED_TS", String(19), nullable=False),  # when it entered the EDMS
    Column("MIME_TYPE", String(60), nullable=False),
    Column("CONTENT_SIZE", Integer, nullable=False),
    Column("CONTENT_SHA1", String(40), nullable=False),
    Column("STORE_TYPE", CHAR(1), nullable=False),  # F file, B blob
    Column("FILE_PATH", String(200)),  # relative to the document root
    Column("DELETED_FLAG", CHAR(1), nullable=False),
    Column("MODIF_DTTM", String(19), nullable=False),
    Index("IX_DOCUMENTS_PATNT", "PATNT_REFNO"),
    Index("IX_DOCUMENTS_CREATED", "CREATED_DTTM"),
)

document_blobs = Table(
    "DOCUMENT_BLOBS",
    metadata,
    Column("DOCMT_REFNO", Integer, primary_key=True, autoincrement=False),
    Column("CONTENT", LargeBinary, nullable=False),
)

TABLES = (documents, document_blobs)

# (local code, title, weight of each MIME type)
DOC_TYPES: dict[str, str] = {
    "DS": "Inpatient discharge summary",
    "OPL": "Outpatient clinic letter",
    "OPN": "Operation note",
    "CONS": "Consultation report",
    "REF": "Referral letter",  # not in the trust's SNOMED CT map
}
PDF, RTF, TEXT, CDA = "application/pdf", "application/rtf", "text/plain", "application/hl7-v3+xml"
EXTENSIONS = {PDF: "pdf", RTF: "rtf", TEXT: "txt", CDA: "xml"}
_MIME_BY_TYPE: dict[str, tuple[tuple[str, float], ...]] = {
    "DS": ((CDA, 4), (PDF, 3.5), (RTF, 2.5)),
    "OPL": ((PDF, 5), (RTF, 3), (TEXT, 2)),
    "OPN": ((PDF, 5), (TEXT, 5)),
    "CONS": ((PDF, 5), (RTF, 3), (TEXT, 2)),
    "REF": ((PDF, 6), (TEXT, 4)),
}

_REF = REFERENCE_DATE.strftime("%Y%m%d") + "2359"


def document_path(refno: int, mime: str) -> str:
    """Where a file-stored document lives under the document root."""
    return f"{refno // 1000:04d}/{refno:08d}.{EXTENSIONS[mime]}"


# --- content writers ------------------------------------------------------------------------


def _pdf_text(s: str) -> bytes:
    safe = s.encode("latin-1", "replace").replace(b"\\", b"\\\\")
    return b"(" + safe.replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def pdf(lines: list[str]) -> bytes:
    """A one-page PDF 1.4 (A4, Helvetica 11pt), each line of text on its own line."""
    ops = [b"BT /F1 11 Tf 14 TL 56 780 Td"]
    ops += [_pdf_text(line) + b" '" for line in lines]
    ops.append(b"ET")
    stream = b"\n".join(ops)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += (b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
            % (len(objects) + 1, xref))
    return bytes(out)


def rtf(lines: list[str]) -> bytes:
    """An RTF 1 document, one paragraph per line (non-ASCII as \\uN escapes)."""
    def esc(s: str) -> str:
        out = []
        for ch in s:
            if ch in "\\{}":
                out.append("\\" + ch)
            elif ord(ch) > 127:
                out.append(f"\\u{ord(ch) if ord(ch) < 32768 else ord(ch) - 65536}?")
            else:
                out.append(ch)
        return "".join(out)

    body = "".join(f"{esc(line)}\\par\n" for line in lines)
    return ("{\\rtf1\\ansi\\deff0{\\fonttbl{\\f0\\fswiss Helvetica;}}\n\\f0\\fs22\n"
            + body + "}\n").encode("ascii")


def text(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


_CDA_NS = "urn:hl7-org:v3"


def cda(doc: Row, lines: list[str]) -> bytes:
    """A minimal CDA R2 ClinicalDocument with the letter as a narrative section."""
    ET.register_namespace("", _CDA_NS)

    def el(parent: ET.Element | None, tag: str, **attrs: str) -> ET.Element:
        q = f"{{{_CDA_NS}}}{tag}"
        return ET.Element(q, attrs) if parent is None else ET.SubElement(parent, q, attrs)

    root = el(None, "ClinicalDocument")
    el(root, "typeId", root="2.16.840.1.113883.1.3", extension="POCD_HD000040")
    el(root, "id", root="2.16.840.1.113883.2.1.3.2.4.18.45",
       extension=f"DEMO-DOC-{doc['DOCMT_REFNO']}")
    el(root, "code", code="18842-5", codeSystem="2.16.840.1.113883.6.1",
       displayName="Discharge summary")
    el(root, "title").text = doc["DOC_TITLE"]
    el(root, "effectiveTime", value=doc["CREATED_DTTM"])
    el(root, "confidentialityCode", code="N", codeSystem="2.16.840.1.113883.5.25")
    role = el(el(root, "recordTarget"), "patientRole")
    el(role, "id", root="2.16.840.1.113883.2.1.3.2.4.18.46", extension=str(doc["PATNT_REFNO"]))
    author = el(root, "author")
    el(author, "time", value=doc["CREATED_DTTM"])
    el(el(author, "assignedAuthor"), "id", root="2.16.840.1.113883.2.1.3.2.4.18.47",
       extension=str(doc["AUTHOR_REFNO"]))
    custodian = el(el(el(root, "custodian"), "assignedCustodian"),
                   "representedCustodianOrganization")
    el(custodian, "id", root="2.16.840.1.113883.2.1.3.2.4.18.48", extension="DEMO")
    section = el(el(el(el(root, "component"), "structuredBody"), "component"), "section")
    el(section, "title").text = doc["DOC_TITLE"]
    narrative = el(section, "text")
    for line in lines:
        el(narrative, "paragraph").text = line
    out: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return out


# --- the generator ---------------------------------------------------------------------------

_PHRASES = (
    "Thank you for referring this patient, who was seen today.",
    "Observations were stable throughout and the patient is mobilising independently.",
    "Medication was reviewed and reconciled; changes are listed on the attached summary.",
    "Bloods on the day were within normal limits.",
    "Follow-up has been arranged in clinic in six weeks.",
    "The GP is asked to review blood pressure in two weeks.",
    "The procedure was uncomplicated; estimated blood loss was minimal.",
    "Safety-netting advice was given and the patient was happy with the plan.",
)


def _fmt(dttm: str) -> str:
    return f"{dttm[6:8]}/{dttm[4:6]}/{dttm[0:4]} {dttm[8:10]}:{dttm[10:12]}"


def _iso(dttm: str, second: int) -> str:
    return (f"{dttm[0:4]}-{dttm[4:6]}-{dttm[6:8]} {dttm[8:10]}:{dttm[10:12]}:"
            f"{second % 60:02d}")


@dataclass
class _Patient:
    refno: int
    archived: bool
    spells: list[Row] = field(default_factory=list)
    clinics: list[Row] = field(default_factory=list)


class DocumentGenerator:
    """Document rows (and files) for the patients the main generator produces."""

    def __init__(self, seed: int, documents_dir: Path | None) -> None:
        self.rng = random.Random(seed ^ _STREAM)
        self.dir = documents_dir
        self.next_doc = 1
        self.consultants: list[tuple[int, str]] = []

    def extend(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        pending: dict[int, _Patient] = {}
        done = 0
        for batch in batches:
            if batch.patients_done != done and pending:
                yield from self._rows_for(pending, done)
                pending = {}
            done = batch.patients_done
            yield batch
            if batch.table is schema.clinicians:
                self.consultants += [(r["PROCA_REFNO"], r["MAIN_SPECT_CODE"] or "300")
                                     for r in batch.rows if r["PRTYP_CODE"] == "CONS"]
            elif batch.table is schema.patients:
                for row in batch.rows:
                    pending[row["PATNT_REFNO"]] = _Patient(row["PATNT_REFNO"],
                                                           row["ARCHV_FLAG"] == "Y")
            elif batch.table is schema.provider_spells:
                for row in batch.rows:
                    pending[row["PATNT_REFNO"]].spells.append(row)
            elif batch.table is schema.outpatient_attendances:
                for row in batch.rows:
                    if row["ATTND_CODE"] in ("5", "6") and row["PATNT_REFNO"] in pending:
                        pending[row["PATNT_REFNO"]].clinics.append(row)
        if pending:
            yield from self._rows_for(pending, done)

    def _rows_for(self, patients: dict[int, _Patient], done: int) -> Iterator[Batch]:
        docs: list[Row] = []
        blobs: list[Row] = []
        for refno in sorted(patients):
            p = patients[refno]
            if p.archived:
                continue
            if refno == 100001:
                self._fixture(p, docs, blobs)
            else:
                self._patient(p, docs, blobs)
        if docs:
            yield Batch(documents, docs, done)
        if blobs:
            yield Batch(document_blobs, blobs, done)

    def _patient(self, p: _Patient, docs: list[Row], blobs: list[Row]) -> None:
        r = self.rng.random
        for spell in p.spells:
            if spell["SPELL_STATUS"] == "D" and spell["DISCH_DTTM"] and r() < 0.5:
                self._document(p, "DS", spell, docs, blobs)
                if r() < 0.1:
                    self._document(p, "OPN", spell, docs, blobs)
        for clinic in p.clinics:
            if r() < 0.08:
                self._document(p, "OPL", clinic, docs, blobs)
        if r() < 0.01:
            self._document(p, "REF" if r() < 0.5 else "CONS", None, docs, blobs)

    def _fixture(self, p: _Patient, docs: list[Row], blobs: list[Row]) -> None:
        """100001: every MIME type in both stores, a superseded/amended pair, one in error."""
        spell = p.spells[0] if p.spells else None
        clinic = p.clinics[0] if p.clinics else None
        for store in ("F", "B"):
            self._document(p, "DS", spell, docs, blobs, mime=CDA, store=store)
            self._document(p, "OPL", clinic, docs, blobs, mime=PDF, store=store)
            self._document(p, "CONS", clinic, docs, blobs, mime=RTF, store=store)
            self._document(p, "OPN", spell, docs, blobs, mime=TEXT, store=store)
        self._document(p, "OPL", clinic, docs, blobs, mime=PDF, store="F", status="S")
        self._document(p, "OPL", clinic, docs, blobs, mime=PDF, store="B", status="A")
        self._document(p, "REF", None, docs, blobs, mime=TEXT, store="F", status="E")
        self._document(p, "DS", spell, docs, blobs, mime=PDF, store="B", status="P")

    def _document(self, p: _Patient, kind: str, event: Row | None, docs: list[Row],
                  blobs: list[Row], *, mime: str | None = None, store: str | None = None,
                  status: str | None = None) -> None:
        r = self.rng.random
        refno = self.next_doc
        self.next_doc += 1
        if mime is None:
            choices = _MIME_BY_TYPE[kind]
            x = r() * sum(w for _, w in choices)
            for mime, w in choices:  # noqa: B007 (the loop variable is the pick)
                x -= w
                if x < 0:
                    break
        assert mime is not None
        store = store or ("F" if r() < 0.6 else "B")
        if status is None:
            x = r()
            status = "F" if x < 0.93 else "P" if x < 0.96 else "A" if x < 0.99 else "E"
        spell = event if event is not None and "PRVSP_REFNO" in event else None
        if event is not None and spell is not None:
            start, end = event["ADMIT_DTTM"], event["DISCH_DTTM"] or event["ADMIT_DTTM"]
            author, spec = event["PROCA_REFNO"], event["MAIN_SPECT_CODE"]
        elif event is not None:
            start = end = event["APPT_DTTM"]
            author, spec = event["PROCA_REFNO"], event["MAIN_SPECT_CODE"]
        else:
            author, spec = self.rng.choice(self.consultants)
            start = end = None
        if author is None:
            author, spec = self.rng.choice(self.consultants)
        base = end or f"{2015 + int(r() * 10)}{1 + int(r() * 12):02d}{1 + int(r() * 28):02d}1000"
        created = min(_REF, base[:8] + f"{9 + int(r() * 8):02d}{int(r() * 60):02d}")
        if created < (end or ""):
            created = end or created
        title = DOC_TYPES[kind]
        doc: Row = {
            "DOCMT_REFNO": refno, "PATNT_REFNO": p.refno,
            "PRVSP_REFNO": spell["PRVSP_REFNO"] if spell else None, "DOCTY_CODE": kind,
            "DOC_TITLE": title, "DOC_STATUS": status, "AUTHOR_REFNO": author,
            "SPECT_CODE": spec, "CREATED_DTTM": created,
            "SERVICE_START_DTTM": start, "SERVICE_END_DTTM": end,
            "FILED_TS": _iso(created, int(r() * 60)), "MIME_TYPE": mime,
            "STORE_TYPE": store, "DELETED_FLAG": "Y" if r() < 0.01 else "N",
        }
        lines = [title, f"Hospital number: {p.refno}", f"Written: {_fmt(created)}"]
        if start:
            lines.append(f"Seen: {_fmt(start)}" + (f" to {_fmt(end)}" if end != start else ""))
        lines += [self.rng.choice(_PHRASES) for _ in range(2 + int(r() * 4))]
        lines.append("Yours sincerely, Consultant (demo)")
        content = (pdf(lines) if mime == PDF else rtf(lines) if mime == RTF
                   else cda(doc, lines) if mime == CDA else text(lines))
        doc["CONTENT_SIZE"] = len(content)
        doc["CONTENT_SHA1"] = hashlib.sha1(content).hexdigest()
        doc["MODIF_DTTM"] = doc["FILED_TS"]
        if store == "F":
            doc["FILE_PATH"] = document_path(refno, mime)
            if self.dir is not None:
                path = self.dir / doc["FILE_PATH"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
        else:
            doc["FILE_PATH"] = None
            blobs.append({"DOCMT_REFNO": refno, "CONTENT": content})
        docs.append(doc)


def extend(batches: Iterator[Batch], seed: int, documents_dir: Path | None = None
           ) -> Iterator[Batch]:
    """The demo PAS batches with the document store's rows added; file-stored documents are
    written under ``documents_dir`` (not at all when it is None: rows only)."""
    return DocumentGenerator(seed, documents_dir).extend(batches)
