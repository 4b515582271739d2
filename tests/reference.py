"""The reference material in ../shared, and the rule for tests that need it or rewrite files.

A test that needs ../shared skips when it is missing — except under CI (``tests.pg.ci_is_true``,
the same rule as the PostgreSQL tests), where it fails: CI must never pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

from tests.pg import ci_is_true

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared").resolve()


def unavailable(reason: str) -> NoReturn:
    """Skip locally; fail under CI."""
    if ci_is_true():
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


def require_shared(path: Path = SHARED) -> Path:
    """``path`` (a file or directory under ../shared), or skip / fail as above."""
    if not path.exists():
        unavailable(f"reference material not found at {path} (check out ../shared beside the "
                    "repository; see README.md, Development)")
    return path


def shared_files(folder: Path, pattern: str = "*") -> list[Path]:
    """Files for ``pytest.mark.parametrize``. When ``folder`` is missing, the folder itself is
    the one parameter, so the test runs and ``require_shared`` skips or fails it — instead of
    pytest quietly skipping an empty parameter set."""
    if not folder.is_dir():
        return [folder]
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def update_golden() -> bool:
    """``CCG_UPDATE_GOLDEN=1``: rewrite expected files. Refused under CI, where a rewrite would
    make the comparison pass by definition."""
    if os.environ.get("CCG_UPDATE_GOLDEN", "").strip() not in ("", "0"):
        if ci_is_true():
            pytest.fail("CCG_UPDATE_GOLDEN is set under CI: expected files are never rewritten "
                        "by CI", pytrace=False)
        return True
    return False
