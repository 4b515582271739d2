"""Throw-away PostgreSQL server for the test suite (no docker, no mocks).

``TempPostgres`` runs ``initdb`` into a temporary directory, starts ``postgres``
on 127.0.0.1 at a free port with durability switched off (fast, disposable),
and on exit stops it (``pg_ctl stop -m immediate``) and deletes the directory.

initdb/postgres refuse to run as root. When the tests run as root (CI), the
server processes run as the unprivileged ``postgres`` system user created by
the Debian ``postgresql`` package, and the temporary directory is chowned to it.

This module deliberately imports neither pytest nor psycopg at import time, so
it can be used outside pytest too (``python tests/pg.py`` prints the bin dir).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["PostgresStartError", "TempPostgres", "find_pg_bin", "require_pg_bin"]

_REQUIRED = ("initdb", "pg_ctl", "postgres")
_SERVICE_USER = "postgres"
# Unix socket paths are limited to ~107 bytes; leave room for "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR_LEN = 80


class PostgresStartError(RuntimeError):
    """initdb or the server failed; the message carries the relevant log output."""


def _has_tools(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in _REQUIRED)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin -> (15,) / (9, 6); non-numeric sorts last.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (-1,)


def find_pg_bin() -> Path | None:
    """Directory holding initdb, pg_ctl and postgres, or None if not installed.

    Looks at ``pg_config --bindir`` first (note that on Debian libpq-dev alone
    ships a pg_config whose bindir has no server binaries, hence the check),
    then /usr/lib/postgresql/*/bin newest version first, then $PATH.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates += sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.is_dir()),
        key=_version_key,
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if _has_tools(bindir):
            return bindir
    return None


def ci_is_true() -> bool:
    """True when the environment says we run in CI: any ``CI`` value but empty, ``0``,
    ``false``, ``no`` or ``off`` (services set ``true``, ``1``, ``yes`` or their own name)."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no", "off"}


def require_pg_bin() -> Path:
    """find_pg_bin() for use inside tests/fixtures.

    Without PostgreSQL binaries: pytest.skip locally, but pytest.fail when
    ``CI=true``, so CI can never silently skip the PostgreSQL tests.
    """
    import pytest

    bindir = find_pg_bin()
    if bindir is not None:
        return bindir
    reason = (
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found via pg_config, "
        "/usr/lib/postgresql/*/bin or $PATH; install them (Debian: apt-get install postgresql)"
    )
    if ci_is_true():
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _traversable_by_others(path: Path) -> bool:
    """True if every ancestor of ``path`` has the o+x bit (so another user can reach it)."""
    return all(parent.stat().st_mode & 0o001 for parent in path.resolve().parents)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


class TempPostgres:
    """A disposable PostgreSQL server; use as a context manager.

    >>> with TempPostgres() as pg:
    ...     url = pg.create_database("app")   # postgresql+psycopg://postgres@127.0.0.1:PORT/app
    """

    def __init__(
        self,
        bindir: Path | None = None,
        *,
        startup_timeout: float = 60.0,
        user: str = _SERVICE_USER,
    ) -> None:
        found = bindir or find_pg_bin()
        if found is None:
            raise PostgresStartError(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; "
                "install them, e.g. `apt-get install postgresql`"
            )
        self.bindir: Path = found
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.base_dir: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(user)
            except KeyError:
                raise PostgresStartError(
                    f"running as root, but there is no {user!r} system user to run "
                    "initdb/postgres as (PostgreSQL refuses to run as root); the Debian "
                    "`postgresql` package creates it"
                ) from None

    # -- paths ---------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "postgres.log"

    # -- public API ----------------------------------------------------------
    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default ``postgres`` database."""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (quoted identifier); returns its SQLAlchemy URL."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            # keeps the URL free of characters that would need escaping
            raise ValueError(f"unsupported database name for tests: {name!r}")
        import psycopg
        from psycopg import sql

        with psycopg.connect(**self._conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def start(self) -> TempPostgres:
        if self._proc is not None:
            raise RuntimeError("already started")
        t0 = time.monotonic()
        try:
            self.base_dir = self._make_base_dir()
            self.socket_dir.mkdir(mode=0o700)
            if self._run_as is not None:
                for path in (self.base_dir, self.socket_dir):
                    os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
            self._initdb()
            # The free port can be grabbed by someone else before postgres binds it.
            for attempt in range(3):
                self.port = _free_port()
                try:
                    self._start_server()
                    break
                except PostgresStartError as exc:
                    if attempt == 2 or "already in use" not in str(exc):
                        raise
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the server (immediate mode) and delete the temp dir. Idempotent."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                if proc.poll() is None and (self.data_dir / "postmaster.pid").exists():
                    with contextlib.suppress(subprocess.SubprocessError, OSError):
                        self._run(
                            [
                                self._tool("pg_ctl"),
                                "stop",
                                "-D",
                                str(self.data_dir),
                                "-m",
                                "immediate",
                                "-w",
                                "-t",
                                "30",
                            ],
                            timeout=40,
                        )
                elif proc.poll() is None:  # never got as far as writing its pid file
                    proc.kill()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
        finally:
            if self._log_fh is not None:
                self._log_fh.close()
                self._log_fh = None
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------
    def _tool(self, name: str) -> str:
        return str(self.bindir / name)

    def _conninfo(self, dbname: str = "postgres") -> dict[str, Any]:
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": "postgres",
            "dbname": dbname,
            "connect_timeout": 5,
        }

    def _make_base_dir(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix="ccpg-"))
        too_long = len(str(base / "sock")) > _MAX_SOCKET_DIR_LEN
        if too_long or (self._run_as is not None and not _traversable_by_others(base)):
            # $TMPDIR is too deep for a unix socket path, or (as root) not reachable
            # by the postgres user: fall back to /tmp, which is always both.
            base.rmdir()
            base = Path(tempfile.mkdtemp(prefix="ccpg-", dir="/tmp"))
        return base

    def _env(self) -> dict[str, str]:
        # No stray PG* settings from the caller; C locale so initdb/postgres never
        # trip over a LANG naming a locale that is not generated on the machine.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", LANGUAGE="C")
        if self._run_as is not None:
            env.update(
                HOME=str(self.base_dir), USER=self._run_as.pw_name, LOGNAME=self._run_as.pw_name
            )
        return env

    def _popen_kwargs(self) -> Mapping[str, Any]:
        kwargs: dict[str, Any] = {
            "env": self._env(),
            "cwd": self.base_dir,
            "stdin": subprocess.DEVNULL,
        }
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        return kwargs

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            **self._popen_kwargs(),
        )

    def _initdb(self) -> None:
        args = [
            self._tool("initdb"),
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        try:
            self._run(args, timeout=120)
        except subprocess.CalledProcessError as exc:
            raise PostgresStartError(
                f"initdb failed (exit {exc.returncode}):\n{exc.stdout}\n{exc.stderr}"
            ) from None

    def _start_server(self) -> None:
        assert self.port is not None
        if self._log_fh is not None:  # left over from a failed attempt
            self._log_fh.close()
        log_fh = self._log_fh = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        args = [
            self._tool("postgres"),
            "-D",
            str(self.data_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        self._proc = subprocess.Popen(
            args, stdout=log_fh, stderr=subprocess.STDOUT, **self._popen_kwargs()
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None  # already reaped
                raise PostgresStartError(
                    f"postgres exited with code {code} during startup "
                    f"(port {self.port}); log tail:\n{_tail(self.log_file)}"
                )
            try:
                psycopg.connect(**self._conninfo()).close()
                return
            except psycopg.OperationalError as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise PostgresStartError(
                    f"postgres did not accept connections on 127.0.0.1:{self.port} within "
                    f"{self.startup_timeout:.0f}s (last error: {last_error}); "
                    f"log tail:\n{_tail(self.log_file)}"
                )
            time.sleep(0.05)


if __name__ == "__main__":  # pragma: no cover - manual use / CI probes
    import sys

    found = find_pg_bin()
    print(found if found else "PostgreSQL server binaries not found", file=sys.stdout)
    sys.exit(0 if found else 1)
