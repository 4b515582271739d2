"""``mappings check`` with golden inputs, and ``mappings coverage`` (table and HTML)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gateway import cli
from gateway.profiles.golden import REPO_GOLDEN, default_golden_dir
from gateway.settings import default_mappings_dir

DEMO = default_mappings_dir()


@pytest.fixture
def small_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("CCG_DEMO_PATIENTS", "300")


def _record() -> dict[str, object]:
    """A raw PATIENTS record as the SQL adapter returns it (conformant output)."""
    return {"p.PATNT_REFNO": 1, "p.NHS_NUMBER": "9990000018", "p.NNNTS_CODE": "01",
            "p.PASID": "D1", "p.SURNAME": "SMITH", "p.FORENAME": "JANE",
            "p.SEXXX_CODE": "2", "p.DTTM_OF_BIRTH": "19650412", "p.ARCHV_FLAG": "N"}


def _golden(tmp_path: Path, **changes: object) -> Path:
    golden = tmp_path / "golden"
    (golden / "Patient").mkdir(parents=True)
    (golden / "Patient" / "good.input.json").write_text(json.dumps(_record()))
    if changes:
        (golden / "Patient" / "bad.input.json").write_text(json.dumps({**_record(), **changes}))
    return golden


def test_golden_conformant_exit_0(small_demo: None, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mappings", "check", "--golden", str(_golden(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "ok   golden Patient/good: 0 error(s), 0 warning(s)" in out
    assert "1 golden case(s) validated against their profiles: 0 error(s)" in out


def test_golden_non_conformant_exit_1(small_demo: None, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    golden = _golden(tmp_path, **{"p.NHS_NUMBER": "9990000019", "p.SURNAME": None})
    assert cli.main(["mappings", "check", "--golden", str(golden)]) == 1
    out = capsys.readouterr().out
    assert "FAIL golden Patient/bad: 2 error(s)" in out
    assert "error  Patient.identifier[0].value: an NHS number must be" in out
    assert "Patient.name[0]" in out and "family" in out
    assert "9990000019" not in out
    assert cli.main(["mappings", "check", "--golden", str(tmp_path / "missing")]) == 1


def test_default_golden_dir(tmp_path: Path) -> None:
    if REPO_GOLDEN.is_dir():
        assert default_golden_dir(DEMO) == REPO_GOLDEN
    assert default_golden_dir(tmp_path) is None
    (tmp_path / "golden").mkdir()
    assert default_golden_dir(tmp_path) == tmp_path / "golden"


def test_coverage_table_and_html(small_demo: None, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "coverage.html"
    assert cli.main(["mappings", "coverage", "--html", str(page)]) == 0
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    for name in ("Patient.sql.yaml", "Encounter.sql.yaml", "Location.sql.yaml",
                 "Organization.sql.yaml", "Practitioner.sql.yaml"):
        assert name in out
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text and "http-equiv" not in text
    assert "src=" not in text and "<link" not in text  # standalone: no external assets
    rows = {eid: filled for filled, eid in re.findall(
        r'<tr class="(yes|no)"[^>]*><td class="e">(?:&nbsp;)*([^<]+)</td>', text)}
    assert rows["Patient.identifier:nhsNumber"] == "yes"
    assert rows["Patient.identifier:nhsNumber.extension:nhsNumberVerificationStatus"] == "yes"
    assert rows["Patient.extension:ethnicCategory"] == "yes"
    assert rows["Patient.extension:religiousAffiliation"] == "no"
    assert rows["Patient.name:official"] == "yes"
    assert rows["Patient.deceased[x]"] == "yes"
    assert rows["Patient.contact"] == "no"
    assert rows["Location.identifier:odsSiteCode"] == "yes"  # through the code map
    assert rows["Encounter.hospitalization.extension:admissionMethod"] == "yes"
    assert "Patient.animal" not in rows  # prohibited by the profile
    assert "mustSupport filled: 0 of 0 (the profile flags none)" in text


@pytest.mark.parametrize("where", ["no-such-dir/coverage.html", "."])
def test_coverage_html_to_a_bad_path_is_one_line(small_demo: None, tmp_path: Path, where: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / where
    assert cli.main(["mappings", "coverage", "--html", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cannot write the HTML report to {target}: ")
