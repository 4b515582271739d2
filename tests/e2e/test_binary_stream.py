"""A document far larger than the gateway worker may hold in memory, streamed over real HTTP.

The gateway runs as its own process (``careconnect-gateway serve`` under uvicorn) on a demo
whose document row points at a 384 MiB file. Once it is up, its address space is capped
(RLIMIT_AS) at what it uses idle plus 192 MiB, so holding the document even once would fail,
let alone twice; the test also reads the worker's peak resident set (VmHWM) afterwards. The
client reads the body in pieces and checks every byte against the SHA-1 computed while the test
wrote the file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from pypdf import PdfReader

from gateway.demo_pas import demo_documents_dir, ensure_sqlite_demo

MiB = 1024 * 1024
SIZE = 384 * MiB
HEADROOM = 192 * MiB

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc and sets RLIMIT_AS of a running process")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _status(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory figure in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _write_big(path: Path) -> str:
    digest = hashlib.sha1()
    block = bytearray(os.urandom(MiB))
    with path.open("wb") as f:
        for i in range(SIZE // MiB):
            block[:8] = i.to_bytes(8, "big")  # no two blocks alike
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def test_a_document_larger_than_the_worker_may_hold_is_streamed(tmp_path: Path) -> None:
    db = ensure_sqlite_demo(tmp_path / "demo.sqlite", patients=30, progress=False)
    root = demo_documents_dir(db)
    sha1 = _write_big(root / "big.bin")
    url = f"sqlite:///{db}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        rid, small = [r[0] for r in conn.execute(sa.text(
            """SELECT "DOCMT_REFNO" FROM "DOCUMENTS" WHERE "STORE_TYPE" = 'F'
               AND "DELETED_FLAG" = 'N' ORDER BY 1"""))][:2]
        conn.execute(sa.text(
            """UPDATE "DOCUMENTS" SET "FILE_PATH" = 'big.bin', "CONTENT_SIZE" = :n,
               "CONTENT_SHA1" = :h, "MIME_TYPE" = 'application/pdf'
               WHERE "DOCMT_REFNO" = :r"""), {"n": SIZE, "h": sha1, "r": rid})
    engine.dispose()
    assert rid

    port = _free_port()
    env = {**os.environ, "CCG_PAS_URL": url, "CCG_DOCUMENT_DIR": str(root),
           "CCG_DATA_DIR": str(tmp_path / "data"), "CCG_AUTH_MODE": "insecure-demo",
           "CCG_HOST": "127.0.0.1", "CCG_PORT": str(port), "CCG_PAGING_SECRET": "t",
           "CCG_AUDIT_LOG": str(tmp_path / "audit.jsonl"), "CCG_LOG_LEVEL": "warning",
           "CCG_PROGRESS": "false"}
    server = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            try:
                if httpx.get(f"{base}/_health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)
        # Warm up the path once (thread pool, code paths), then cap the address space.
        assert httpx.get(f"{base}/STU3/Binary/{small}", timeout=10).status_code == 200
        idle_rss = _status(server.pid, "VmRSS")
        limit = _status(server.pid, "VmSize") + HEADROOM
        _soft, hard = resource.prlimit(server.pid, resource.RLIMIT_AS)
        resource.prlimit(server.pid, resource.RLIMIT_AS, (limit, hard))
        assert SIZE > HEADROOM  # the worker cannot hold the document once, let alone twice

        received = 0
        digest = hashlib.sha1()
        with httpx.stream("GET", f"{base}/STU3/Binary/{rid}", timeout=60) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/pdf"
            assert int(r.headers["content-length"]) == SIZE
            for chunk in r.iter_raw():
                digest.update(chunk)
                received += len(chunk)
        assert received == SIZE and digest.hexdigest() == sha1
        peak = _status(server.pid, "VmHWM")
        assert peak - idle_rss < HEADROOM, (idle_rss, peak)
        # Still serving, and the FHIR form is refused with a clear 4xx rather than attempted.
        r = httpx.get(f"{base}/STU3/Binary/{rid}", params={"_format": "json"}, timeout=10)
        assert r.status_code == 406
        assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "BINARY_TOO_LARGE"
        print(f"\nstreamed {SIZE // MiB} MiB; worker RSS idle {idle_rss // MiB} MiB, "
              f"peak {peak // MiB} MiB; address space capped at idle + {HEADROOM // MiB} MiB")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr:
            server.stderr.close()
    records = [orjson.loads(line) for line in
               (tmp_path / "audit.jsonl").read_bytes().splitlines() if line]
    streamed = [r for r in records if r["path"] == f"/STU3/Binary/{rid}"
                and r["outcome"]["status"] == 200]
    assert len(streamed) == 1 and f"DocumentReference/{rid}" in streamed[0]["entities"]


def test_the_readme_journey_for_a_pdf(live_server: Any) -> None:
    """Search the documents, follow the attachment url, get a PDF a PDF reader opens."""
    base = f"{live_server.url}/STU3"
    bundle = httpx.get(f"{base}/DocumentReference", params={
        "patient": "100001", "type": "http://snomed.info/sct|823681000000100"}).json()
    pdfs = [e["resource"]["content"][0]["attachment"] for e in bundle["entry"]
            if e["resource"]["content"][0]["attachment"]["contentType"] == "application/pdf"]
    assert pdfs
    for attachment in pdfs:
        r = httpx.get(f"{base}/{attachment['url']}", headers={"Accept": "application/pdf"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
        assert len(r.content) == attachment["size"]
        assert base64.b64decode(attachment["hash"]) == hashlib.sha1(r.content).digest()
        page = PdfReader(io.BytesIO(r.content)).pages[0]
        assert "Outpatient clinic letter" in page.extract_text()
