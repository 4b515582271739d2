"""``mappings test``: golden cases beside the mappings, run without a server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway import cli
from gateway.settings import bundled_mappings_roots

MAPPINGS = bundled_mappings_roots()[0]


@pytest.fixture(autouse=True)
def small_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CCG_DEMO_PATIENTS", "60")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the SQL demo's mappings (and the code maps beside them) to break."""
    shutil.copytree(MAPPINGS / "demo-pas", tmp_path / "m" / "demo-pas")
    shutil.copytree(MAPPINGS / "codemaps", tmp_path / "m" / "codemaps")
    return tmp_path / "m" / "demo-pas"


@pytest.mark.parametrize("name", ["demo-pas", "demo-hl7v2"])
def test_the_demo_cases_pass(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mappings", "test", name]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "FAIL" not in out
    assert ("case Patient/" in out) and ("rsp-k22" in out) == (name == "demo-hl7v2")
    # the SQL demo's Encounter has three sources: each prefixed one has its own folder
    assert (("ok   case Encounter.op/2-did-not-attend.yaml" in out)
            == ("ok   case Encounter.ae/1-admitted-from-ae.yaml" in out)
            == (name == "demo-pas"))


def test_a_case_runs_on_the_source_its_folder_names(
        copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = copy / "cases"
    # an outpatient attendance's case in the folder of the inpatient source: the wrong mapping
    shutil.move(cases / "Encounter.op" / "2-did-not-attend.yaml", cases / "Encounter")
    assert cli.main(["mappings", "test", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "FAIL case Encounter/2-did-not-attend.yaml" in out
    assert "ok   case Encounter/2-died-winter.yaml" in out
    (cases / "Encounter.xx").mkdir()
    shutil.move(cases / "Encounter" / "2-did-not-attend.yaml", cases / "Encounter.xx")
    assert cli.main(["mappings", "test", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "FAIL case Encounter.xx" in out and "no mapping for Encounter.xx" in out
    assert "Encounter.ae, Encounter.op" in out  # what the folders may be called


def test_a_difference_is_reported_with_file_line_and_path(
        copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = copy / "cases" / "Patient" / "100002-no-nhs-number.yaml"
    lines = case.read_text(encoding="utf-8").splitlines()
    family = next(i for i, line in enumerate(lines) if line.strip() == "family: Jones")
    lines[family] = lines[family].replace("Jones", "JONES")
    gender = lines.index("  gender: male")
    lines[gender] = "  gender: female"
    active = lines.index("  active: true")
    lines[active] = "  active: false"
    case.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli.main(["mappings", "test", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "FAIL case Patient/100002-no-nhs-number.yaml" in out
    assert f'{case}:{family + 1}: Patient.name[0].family: expected "JONES", got "Jones"' in out
    assert f'{case}:{gender + 1}: Patient.gender: expected "female", got "male"' in out
    assert f"{case}:{active + 1}: Patient.active: expected false, got true" in out
    assert "3 passed, 1 failed" in out
    # mappings check runs the cases too, and fails on them
    assert cli.main(["mappings", "check", str(copy)]) == 1
    assert "FAIL case Patient/100002-no-nhs-number.yaml" in capsys.readouterr().out


def test_a_new_column_case(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The mappings/README recipe: an element the mapping does not make yet fails the case
    with 'leaves it out' until the mapping maps it; one it makes but the case does not
    expect fails with 'not expected'."""
    case = copy / "cases" / "Patient" / "100002-no-nhs-number.yaml"
    text = case.read_text(encoding="utf-8")
    case.write_text(text + "  multipleBirthBoolean: false\n", encoding="utf-8")
    assert cli.main(["mappings", "test", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "Patient.multipleBirthBoolean: expected false, but the mapping leaves it out" in out
    case.write_text(text.replace("  gender: male\n", ""), encoding="utf-8")
    assert cli.main(["mappings", "test", str(copy)]) == 1
    assert 'Patient.gender: not expected, but the mapping makes "male"' in capsys.readouterr().out


@pytest.mark.parametrize(("content", "message"), [
    ("input: {}\n", "'expected' is missing"),
    ("expected: {resourceType: Patient}\n", "either 'input'"),
    ("input: {}\nmessage: x\nexpected: {}\n", "either 'input'"),
    ("inputs: {}\nexpected: {}\n", "unknown key(s) inputs"),
    ("message: 'MSH|^~\\&|A'\nexpected: {}\n", "'message' is for HL7 v2 mappings"),
    ("input: [1]\nexpected: {}\n", "one source record"),
    ("input: {p.SEXXX_CODE: '2'}\nexpected: {}\n", "needs the record's key, p.PATNT_REFNO"),
    ("input: {p.PATNT_REFNO: 1, p.SEXXX_CODE: Q}\nexpected: {}\n",
     "the mapping failed on this input: UNMAPPED_SOURCE_CODE"),
    ("input: {a: 1}\n  bad: indent\n", ".yaml:2: "),
    ("input: {a: 1}\ninput: {b: 2}\nexpected: {}\n", "duplicate"),
])
def test_a_broken_case_is_one_clear_problem(copy: Path, content: str, message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for old in (copy / "cases").glob("*/*.yaml"):
        old.unlink()
    (copy / "cases" / "Patient" / "broken.yaml").write_text(content, encoding="utf-8")
    assert cli.main(["mappings", "test", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "FAIL case Patient/broken.yaml" in out and message in out, out
    assert "Traceback" not in out


def test_json_cases_a_list_for_several_resources_and_no_cases(
        copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import yaml

    case = copy / "cases" / "Patient" / "100002-no-nhs-number.yaml"
    doc = yaml.safe_load(case.read_text(encoding="utf-8"))
    case.unlink()
    (copy / "cases" / "Patient" / "as-json.json").write_text(json.dumps(doc))
    assert cli.main(["mappings", "test", str(copy)]) == 0
    assert "ok   case Patient/as-json.json" in capsys.readouterr().out
    doc["expected"] = [doc["expected"], doc["expected"]]  # one record makes one resource
    (copy / "cases" / "Patient" / "as-json.json").write_text(json.dumps(doc))
    assert cli.main(["mappings", "test", str(copy)]) == 1
    assert "[1]: expected" in capsys.readouterr().out
    shutil.rmtree(copy / "cases")
    assert cli.main(["mappings", "test", str(copy)]) == 1
    assert "no cases in" in capsys.readouterr().out
    assert cli.main(["mappings", "check", str(copy), "--golden", str(tmp_path / "none")]) == 1
