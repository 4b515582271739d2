"""Fixtures for the ADT feed tests: the mapper over the demo HL7 v2 mappings, a store,
an independent MLLP sender (raw sockets, no code shared with adapters/hl7v2/mllp.py) and a
real HTTP receiver for rest-hook notifications."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.adt.config import AdtSettings, Endpoint
from gateway.adt.events import Mapper
from gateway.adt.runtime import build_mapper
from gateway.adt.store import AdtStore
from gateway.settings import Settings
from tests.pg import TempPostgres

REPO = Path(__file__).resolve().parents[3]
GOLDEN = REPO / "tests" / "golden" / "adt"
ITK = REPO.parent / "shared" / "hl7v2-samples" / "uk-itk-adt"


def er7_bytes(path: Path) -> bytes:
    """A sample as sent on the wire: segments separated by CR."""
    return path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def adt_settings(tmp: Path, **over: Any) -> AdtSettings:
    values: dict[str, Any] = {
        "store_url": f"sqlite:///{tmp / 'adt.sqlite'}",
        "allowed_endpoints": (Endpoint.parse("http://127.0.0.1:*"),),
        "backoff_seconds": 0.05, "backoff_max_seconds": 0.2, "max_attempts": 4,
        "delivery_timeout": 5.0,
    }
    values.update(over)
    return AdtSettings(**values)


@pytest.fixture(scope="session")
def hl7_settings(demo_sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("adt-data"), progress=False,
                    log_level="warning",
                    connection_urls={"pas": demo_sqlite_url, "pas-hl7": "mllp://127.0.0.1:9"})


@pytest.fixture(scope="session")
def mapper(hl7_settings: Settings) -> Mapper:
    return build_mapper(hl7_settings, AdtSettings())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AdtStore]:
    s = AdtStore(f"sqlite:///{tmp_path / 'adt.sqlite'}")
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AdtStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'adt.sqlite'}"
    else:
        pg: TempPostgres = request.getfixturevalue("postgres_server")
        url = pg.create_database(f"adt_{tmp_path.name[-12:].lower().replace('-', '_')}")
    s = AdtStore(url)
    yield s
    s.close()



# --- an MLLP sender that shares no code with the gateway's MLLP module ----------------------

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


class Sender:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, payload: bytes, *, expect_reply: bool = True) -> bytes | None:
        self.sock.sendall(SB + payload + EB + CR)
        if not expect_reply:
            return None
        while EB not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the ACK")
            self.buf += chunk
        start = self.buf.index(SB) + 1
        end = self.buf.index(EB)
        reply, self.buf = self.buf[start:end], self.buf[end + 2:]
        return reply

    def close(self) -> None:
        self.sock.close()


def msa(reply: bytes) -> list[str]:
    for seg in reply.split(b"\r"):
        if seg.startswith(b"MSA|"):
            return seg.decode().split("|")
    raise AssertionError("no MSA in the reply")


def err_code(reply: bytes) -> str | None:
    for seg in reply.split(b"\r"):
        if seg.startswith(b"ERR|"):
            # v2.4: ERR-1.4 = code&text&HL70357
            return seg.decode().split("|")[1].split("^")[3].split("&")[0]
    return None


def adt_message(control: str, pas: str, event: str = "A08", *, visit: str = "V1",
                family: str = "TESTER", extra_msh: str = "", processing: str = "P") -> bytes:
    """A small ITK-shaped ADT for patient ``pas`` (its PAS number, PID-3 type PI)."""
    msh = (f"MSH|^~\\&|PAS|RCB|ROUTE|ROUTE|20240101120000||ADT^{event}^ADT_A01|{control}|"
           f"{processing}|2.4{extra_msh}")
    segs = [msh, "EVN||20240101120000",
            f"PID|1||{pas}^^^RCB^PI||{family}^ANNE^^^MS||19700101|F",
            "PV1|1|I|WARD1^^^RX1" + "|" * 16 + f"{visit}^^^RX1^VN"]
    return "\r".join(segs).encode() + b"\r"


# --- a real HTTP receiver for rest-hook notifications -----------------------------------------


@dataclass
class Received:
    notification_id: str
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class Receiver:
    port: int = 0
    got: list[Received] = field(default_factory=list)
    fail_next: int = 0
    """Answer 503 to this many requests before accepting."""
    status: int = 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def wait_for(self, n: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    return list(self.got)
            time.sleep(0.02)
        raise AssertionError(f"received {len(self.got)} notifications, wanted {n}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            if len(raw) < length:  # the sender died mid-body (killed): nothing was delivered
                self.close_connection = True
                return
            with state.lock:
                if state.fail_next > 0:
                    state.fail_next -= 1
                    code = 503
                else:
                    code = state.status
                    if 200 <= code < 300:
                        state.got.append(Received(self.headers.get("x-notification-id", ""),
                                                  {k.lower(): v for k, v in self.headers.items()},
                                                  json.loads(raw) if raw else None))
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
