"""Throw-away Redis server for the test suite (no docker, no mocks), like tests/pg.py.

``TempRedis`` starts ``redis-server`` on 127.0.0.1 at a free port with persistence off, in a
temporary directory, and stops it on exit. Without the binary the tests are skipped locally
but FAIL when ``CI=true`` (``.ci/run`` installs it), so CI can never silently skip them.

Stdlib only at import time: ``python tests/redis_server.py`` prints the binary or exits 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["TempRedis", "find_redis_server", "require_redis_server"]


def find_redis_server() -> Path | None:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for candidate in (Path("/usr/bin/redis-server"), Path("/usr/local/bin/redis-server")):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_redis_server() -> Path:
    """find_redis_server() for tests: skip locally, fail under ``CI=true``."""
    import pytest

    found = find_redis_server()
    if found is not None:
        return found
    reason = "redis-server not found on $PATH; install it (Debian: apt-get install redis-server)"
    if os.environ.get("CI", "").strip().lower() in {"true", "1"}:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TempRedis:
    def __init__(self, binary: Path | None = None, startup_timeout: float = 20.0) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise RuntimeError("redis-server not found")
        self.binary = found
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> TempRedis:
        self.dir = Path(tempfile.mkdtemp(prefix="ccredis-"))
        for attempt in range(3):
            self.port = free_port()
            self._proc = subprocess.Popen(
                [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                 "--protected-mode", "yes", "--loglevel", "warning",
                 "--logfile", str(self.dir / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            out = self._reap()
            if attempt == 2 or "in use" not in out:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {out[-2000:]}")
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        assert self._proc is not None and self.port is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return True
            time.sleep(0.05)
        return False

    def _reap(self) -> str:
        proc, self._proc = self._proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        assert self.dir is not None
        log = self.dir / "redis.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TempRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - CI probe
    import sys

    found = find_redis_server()
    print(found if found else "redis-server not found")
    sys.exit(0 if found else 1)
