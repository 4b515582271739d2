"""``python -m gateway`` is the ``careconnect-gateway`` command (gateway/__main__.py)."""

from __future__ import annotations

import subprocess
import sys

from gateway.cli import _version


def test_python_m_gateway_runs_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert _version() in done.stdout
    bad = subprocess.run([sys.executable, "-m", "gateway", "no-such-command"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "no-such-command" in bad.stderr
