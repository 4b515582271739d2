"""gateway.logging.configure: JSON lines on stdout, level filtering, context, reconfiguration."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from typing import Any

import orjson
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


# --- the request line's shortcut (gateway.logging.info) ----------------------------------------


def without_timestamp(line: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in line.items() if k != "timestamp"]


def test_the_shortcut_writes_the_line_structlog_writes(capfd: pytest.CaptureFixture[str]) -> None:
    gateway_logging.configure("info")
    log = structlog.get_logger("gateway.request")
    fields = {"method": "GET", "route": "/STU3/{type}/{id}", "status": 200,
              "duration_ms": 1.25, "adapter_ms": 0.5}
    token = gateway_logging.current_request_id.set("req-9")
    structlog.contextvars.bind_contextvars(tenant="t1")
    try:
        log.info("request", **fields)
        gateway_logging.info(log, "request", dict(fields))
    finally:
        gateway_logging.current_request_id.reset(token)
    via_structlog, shortcut = lines(capfd)
    assert without_timestamp(shortcut) == without_timestamp(via_structlog)  # keys in order
    assert list(shortcut)[-4:] == ["request_id", "tenant", "level", "timestamp"]
    assert shortcut["request_id"] == "req-9" and shortcut["level"] == "info"
    assert shortcut["timestamp"].endswith("Z")
    gateway_logging.info(log, "request", dict(fields))  # outside a request: no request id
    (outside,) = lines(capfd)
    assert "request_id" not in outside


def test_the_shortcut_follows_the_level_and_reconfiguration(
        capfd: pytest.CaptureFixture[str]) -> None:
    log = structlog.get_logger("gateway.request")
    gateway_logging.configure("warning")
    gateway_logging.info(log, "request", {"status": 200})
    assert lines(capfd) == []
    gateway_logging.configure("info")
    with structlog.testing.capture_logs() as captured:  # edits the processors in place
        gateway_logging.info(log, "request", {"status": 201})
    assert [(e["event"], e["status"]) for e in captured] == [("request", 201)]
    assert lines(capfd) == []
    structlog.configure(processors=[structlog.processors.JSONRenderer(serializer=orjson.dumps)])
    gateway_logging.info(log, "request", {"status": 202})
    assert lines(capfd) == [{"status": 202, "event": "request"}]


@pytest.mark.parametrize("ns", [
    1_700_000_000_000_000_000,  # a whole second: no fraction, as datetime.isoformat()
    1_700_000_000_000_000_999,  # under a microsecond: floored, as datetime.now()
    1_700_000_000_123_456_789,
    1_700_000_059_999_999_999,
    1_700_000_060_000_001_000,
])
def test_timestamps_are_datetime_isoformat_to_the_byte(
        monkeypatch: pytest.MonkeyPatch, ns: int) -> None:
    from gateway.audit import AuditTrail

    monkeypatch.setattr(gateway_logging.time, "time_ns", lambda: ns)
    when = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)
    stamp = gateway_logging._timestamp(None, "info", {})["timestamp"]
    assert stamp == when.isoformat().replace("+00:00", "Z")  # structlog's TimeStamper
    record: dict[str, Any] = {"event": "access"}
    trail = AuditTrail(os.devnull)
    trail.emit([record])
    trail.close()
    assert record["timestamp"] == when.isoformat(timespec="milliseconds")  # as it always was


def test_the_json_renderer_is_structlogs() -> None:
    class Custom:
        def __structlog__(self) -> str:
            return "custom!"

    event = {"event": "x", "when": dt.date(2026, 1, 2), "odd": {1, 2}, "obj": Custom(),
             "text": "Smïth", "n": 1.5, "none": None, "nested": {"a": [1, "b"]}}
    reference = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    assert gateway_logging.render_json(None, "info", dict(event)) == reference(
        None, "info", dict(event))


def test_lines_follow_stdout_when_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configured, then stdout replaced and the old one closed (a test's capture ending, a
    redirect): the lines go to the stdout of the moment, the request line too, and nothing
    raises from a closed stream (a request line lost that way is the mid-upload 499 line of
    tests/gateway/test_availability.py)."""
    import io
    import sys

    old = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdout", old)
    gateway_logging.configure("info")
    new = io.TextIOWrapper(io.BytesIO(), write_through=True)
    monkeypatch.setattr(sys, "stdout", new)
    old.close()
    log = structlog.get_logger("gateway.test")
    log.info("after")
    gateway_logging.info(log, "request", {"status": 499})
    out = [json.loads(line) for line in new.buffer.getvalue().splitlines()]
    assert [(x["event"], x.get("status")) for x in out] == [("after", None), ("request", 499)]
