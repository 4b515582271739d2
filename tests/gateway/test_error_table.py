"""The README's error table is exactly what gateway.error_table generates from the code."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from gateway import error_table
from gateway.errors import GatewayError

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_error_table_matches_the_error_classes() -> None:
    text = README.read_text(encoding="utf-8")
    assert error_table.replace_table(text) == text, (
        "README.md's error table is out of date: run python -m gateway.error_table README.md")


def test_every_error_class_is_a_row() -> None:
    table = error_table.render()
    codes = {r.code for r in error_table.rows()}
    # the ones a newcomer once missed, from four different modules
    assert {"INVALID_RESOURCE", "UNSUPPORTED_SEARCH", "BACKEND_REJECTED", "MULTIPLE_MATCHES",
            "AUTHORIZATION_SERVER_UNAVAILABLE", "AUDIT_UNAVAILABLE", "SERVER_BUSY",
            "COMPARTMENT_FORBIDDEN"} <= codes
    for r in error_table.rows():
        assert f"| {r.status} | `{r.code}` |" in table
        assert r.when, f"{r.code}: say when it happens (WHEN or a class docstring)"


def test_a_new_error_class_makes_the_readme_stale() -> None:
    text = README.read_text(encoding="utf-8")

    class BrandNew(GatewayError):  # registered as a subclass while it lives
        """A brand-new failure."""

        status = 418
        error_code = "BRAND_NEW_TEST_ONLY"

    regenerated = error_table.replace_table(text)
    assert regenerated != text
    assert "| 418 | `BRAND_NEW_TEST_ONLY` | exception | A brand-new failure |" in regenerated
    del BrandNew
    gc.collect()  # gone from GatewayError.__subclasses__() for the other tests


def test_check_and_rewrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "README.md"
    f.write_text(f"# x\n\n{error_table.START}\nold\n{error_table.END}\n\nafter\n")
    assert error_table.main(["--check", str(f)]) == 1
    assert "old" in f.read_text()
    assert error_table.main([str(f)]) == 0
    assert f.read_text().endswith(f"{error_table.END}\n\nafter\n")
    assert error_table.main(["--check", str(f)]) == 0
    f.write_text("no markers\n")
    assert error_table.main([str(f)]) == 2
    assert "markers" in capsys.readouterr().err
