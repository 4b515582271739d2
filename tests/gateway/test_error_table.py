"""The README's error and notice tables are exactly what gateway.error_table generates from
the code (the error classes, and the notices' registry)."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

from gateway import error_table
from gateway.errors import GatewayError
from gateway.notices import NOTICES, Notice, notice

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
    f.write_text(f"# x\n\n{error_table.START}\nold\n{error_table.END}\n\nbetween\n\n"
                 f"{error_table.NOTICE_START}\nold notices\n{error_table.NOTICE_END}\n\nafter\n")
    assert error_table.main(["--check", str(f)]) == 1
    assert "old" in f.read_text()
    assert error_table.main([str(f)]) == 0
    text = f.read_text()
    assert f"{error_table.END}\n\nbetween\n\n{error_table.NOTICE_START}" in text
    assert text.endswith(f"{error_table.NOTICE_END}\n\nafter\n")
    assert "| warning | `SOURCE_UNAVAILABLE` | incomplete |" in text and "\nold" not in text
    assert error_table.main(["--check", str(f)]) == 0
    f.write_text(f"# x\n\n{error_table.START}\nold\n{error_table.END}\n")  # no notice table
    assert error_table.main([str(f)]) == 2
    assert "notice table markers" in capsys.readouterr().err
    f.write_text("no markers\n")
    assert error_table.main([str(f)]) == 2
    assert "markers" in capsys.readouterr().err


def _calls(name: str) -> list[tuple[str, ast.Call]]:
    """Every call of ``name(...)`` in the gateway and adapters packages, with its place."""
    root = Path(__file__).resolve().parents[2]
    out = []
    for package in ("gateway", "adapters"):
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == name):
                    out.append((f"{path.relative_to(root)}:{node.lineno}", node))
    return out


def test_warnings_and_information_go_through_the_registry() -> None:
    """A warning or information issue built by hand (``issue("warning", ...)``) would be
    missing from the README's table: every one goes through ``notice`` with a registered
    code."""
    by_hand = [where for where, call in _calls("issue")
               if call.args and isinstance(call.args[0], ast.Constant)
               and call.args[0].value != "error"]
    assert by_hand == [], "use gateway.notices.notice (and register the code) at " + \
        ", ".join(by_hand)
    codes = {where: call.args[0].value for where, call in _calls("notice")
             if call.args and isinstance(call.args[0], ast.Constant)}
    assert {"SOURCE_UNAVAILABLE", "INCLUDE_LIMIT", "CHAIN_RESOLVED_BY_SEARCH",
            "MESSAGE_ACCEPTED", "UNKNOWN_PARAMETER"} <= set(codes.values())
    unregistered = {w: c for w, c in codes.items() if c not in NOTICES}
    assert unregistered == {}
    # a code given as a variable (record.warnings(messages, code)): its literal callers
    for where, call in _calls("warnings"):
        if len(call.args) > 1 and isinstance(call.args[1], ast.Constant):
            assert call.args[1].value in NOTICES, where


def test_a_new_notice_makes_the_readme_stale() -> None:
    text = README.read_text(encoding="utf-8")
    NOTICES["BRAND_NEW_NOTICE"] = Notice("BRAND_NEW_NOTICE", "information", "informational",
                                         "only in this test")
    try:
        regenerated = error_table.replace_table(text)
        issued = notice("BRAND_NEW_NOTICE", "said")
    finally:
        del NOTICES["BRAND_NEW_NOTICE"]
    assert regenerated != text
    assert ("| information | `BRAND_NEW_NOTICE` | informational | only in this test |"
            in regenerated)
    assert issued["severity"] == "information" and issued["code"] == "informational"
    assert issued["details"]["coding"][0]["code"] == "BRAND_NEW_NOTICE"
    with pytest.raises(KeyError):
        notice("NEVER_REGISTERED", "x")
