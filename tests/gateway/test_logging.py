"""gateway.logging.configure: JSON lines on stdout, level filtering, context, reconfiguration."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from gateway import logging as gateway_logging


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """configure() binds the current sys.stdout (capfd's here): put the old set-up back."""
    saved = structlog.get_config()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved)


def lines(capfd: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    out, err = capfd.readouterr()
    assert err == ""  # everything goes to stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_one_json_line_per_event(capfd: pytest.CaptureFixture[str]) -> None:
    gateway_logging.configure("info")
    log = structlog.get_logger("gateway.test")
    log.info("hello", count=3, names=["a", "b"], when=dt.date(2026, 1, 2))
    log.warning("careful", ratio=0.5)
    first, second = lines(capfd)
    assert first["event"] == "hello"
    assert first["level"] == "info"
    assert (first["count"], first["names"], first["when"]) == (3, ["a", "b"], "2026-01-02")
    stamp = dt.datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert first["timestamp"].endswith("Z")
    assert abs(dt.datetime.now(dt.UTC) - stamp) < dt.timedelta(minutes=1)
    assert (second["event"], second["level"], second["ratio"]) == ("careful", "warning", 0.5)


@pytest.mark.parametrize(("level", "emitted"), [
    ("debug", ["debug", "info", "warning", "error"]),
    ("info", ["info", "warning", "error"]),
    ("INFO", ["info", "warning", "error"]),
    ("warning", ["warning", "error"]),
    ("Warning", ["warning", "error"]),
    ("error", ["error"]),
    ("no-such-level", ["info", "warning", "error"]),  # an unknown level falls back to info
])
def test_level_filtering(capfd: pytest.CaptureFixture[str], level: str,
                         emitted: list[str]) -> None:
    gateway_logging.configure(level)
    log = structlog.get_logger("gateway.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line["level"] for line in lines(capfd)] == emitted


def test_context_variables_are_merged(capfd: pytest.CaptureFixture[str]) -> None:
    gateway_logging.configure("info")
    log = structlog.get_logger("gateway.test")
    structlog.contextvars.bind_contextvars(request_id="req-1")
    log.info("inside")
    structlog.contextvars.unbind_contextvars("request_id")
    log.info("outside")
    inside, outside = lines(capfd)
    assert inside["request_id"] == "req-1"
    assert "request_id" not in outside


def test_reconfiguring_applies_to_loggers_already_used(capfd: pytest.CaptureFixture[str]) -> None:
    # Module-level loggers (gateway.middleware.log, ...) are used long before a second app is
    # built in the same process; its configure() must still take effect for them.
    from gateway.middleware import log as request_log

    gateway_logging.configure("info")
    request_log.info("first")
    gateway_logging.configure("error")
    request_log.info("suppressed")
    request_log.error("second")
    gateway_logging.configure("debug")
    request_log.debug("third")
    assert [line["event"] for line in lines(capfd)] == ["first", "second", "third"]


def test_build_app_configures_its_level(capfd: pytest.CaptureFixture[str],
                                        demo_sqlite_url: str, tmp_path: Any) -> None:
    from gateway.app import build_app
    from tests.conftest import gateway_settings

    build_app(gateway_settings(demo_sqlite_url, tmp_path, log_level="warning",
                               paging_secret=""))
    warned = lines(capfd)
    assert [line["event"] for line in warned] == ["paging_secret_generated"]
    assert warned[0]["level"] == "warning"
    build_app(gateway_settings(demo_sqlite_url, tmp_path, log_level="error", paging_secret=""))
    assert lines(capfd) == []
