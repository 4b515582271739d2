"""A real headless Chromium for tests of HTML pages, driven over the DevTools protocol.

``find_chromium()`` looks for Debian's ``chromium`` (or Chrome) on $PATH; stdlib only at
import time, so ``.ci/run`` can run this file to decide whether to install it. Inside tests,
``require_chromium()`` skips locally and fails under CI (tests/pg.py's rule), like the
PostgreSQL tests.

The protocol client is the ``websockets`` package (already installed with uvicorn[standard]):
a few synchronous calls — navigate, evaluate JavaScript, capture a screenshot — are all the
tests need, so no browser-automation framework (and no second browser download) is added.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    import pytest

    from tests.pg import ci_is_true

    found = find_chromium()
    if found:
        return found
    reason = ("no headless browser found (chromium, google-chrome) on $PATH; install it "
              "(Debian: apt-get install chromium)")
    if ci_is_true():
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


class Browser:
    """One headless Chromium process with one page."""

    def __init__(self, binary: str, profile_dir: Path, width: int = 1280,
                 height: int = 900) -> None:
        self.width, self.height = width, height
        args = [binary, "--headless=new", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                f"--user-data-dir={profile_dir}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root otherwise
        # stderr to a file, not a pipe: unread, a pipe would fill and stall the browser
        self.log = profile_dir / "chromium.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=log)
        self._ids = itertools.count(1)
        self._stack = contextlib.ExitStack()
        self._events: list[dict[str, Any]] = []
        try:
            port = self._port()
            self.ws = self._connect(port)
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", text)
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-500:] if self.log.exists() else ""
        raise RuntimeError(f"chromium did not start its DevTools endpoint: {tail}")

    def _connect(self, port: int) -> Any:
        import urllib.request

        from websockets.sync.client import connect

        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # entered as a context manager (websockets requires it); left in close()
        return self._stack.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=15))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._events.append(message)

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method:
                    return self._events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {method} event")
            self._events.append(json.loads(self.ws.recv(timeout=remaining)))

    def open(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = True) -> bytes:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        self._stack.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":  # .ci/run: print the browser found, or exit 1
    import sys

    found = find_chromium()
    if found is None:
        sys.exit(1)
    print(found)
