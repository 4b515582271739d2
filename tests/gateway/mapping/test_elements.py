"""element_paths: the elements of a resource a source field or column feeds, read from the
shipped mappings' output trees."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.mapping.elements import element_paths

MAPPINGS = Path(__file__).resolve().parents[3] / "mappings"


def _output(name: str) -> dict[str, object]:
    out: dict[str, object] = yaml.safe_load((MAPPINGS / name).read_text())["output"]
    return out


@pytest.mark.parametrize(("source", "paths"), [
    ("PID-7", ["Patient.birthDate"]),
    ("PID-3", ["Patient.identifier.value"]),  # both identifiers: no index
    ("PD1-3", ["Patient.generalPractitioner.identifier.value"]),
    ("PID-29", ["Patient.deceasedDateTime", "Patient.deceasedBoolean"]),  # a function's args
    ("PID-30", ["Patient.deceasedBoolean"]),  # not PID-3's
    ("PID-11.5", ["Patient.address.postalCode"]),  # inside `each:`
    ("ZZZ-1", []),
])
def test_hl7_fields(source: str, paths: list[str]) -> None:
    assert element_paths(_output("demo-hl7v2/Patient.hl7v2.yaml"), "Patient", source) == paths


def test_sql_columns() -> None:
    out = _output("demo-pas/Patient.sql.yaml")
    assert element_paths(out, "Patient", "p.DTTM_OF_BIRTH") == ["Patient.birthDate"]
