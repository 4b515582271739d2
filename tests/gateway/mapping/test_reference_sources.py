"""Declaring which source of its target type a reference points at (``id_prefix``,
``sources:``): checked at load, every problem as ``file:line: key: message``; and the output
and reverse mapping of such a reference."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from adapters import dropped
from adapters.registry import create
from gateway.mapping import compile as mcompile
from gateway.mapping.compile import SEVERAL_REFERENCES, CompileContext, compile_output
from gateway.mapping.loader import load_directory
from gateway.mapping.model import Expr, SearchParam
from gateway.mapping.reverse import ReverseContext, ReverseError, compile_reverse
from gateway.mapping.storage import make_storage
from tests.gateway.mapping.test_loader import CODEMAPS, DEMO, edit, line_with, one_problem

LONDON = ZoneInfo("Europe/London")
OBS_SOURCES = "      - {column: h.OPATT_REFNO, id_prefix: op-} # outpatient attendances"


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A writable copy of the demo mappings with their code maps next to them."""
    shutil.copytree(DEMO, tmp_path / "demo-pas")
    shutil.copytree(CODEMAPS, tmp_path / "codemaps")
    return tmp_path / "demo-pas"


def test_the_demo_declares_prefixed_references(demo_sqlite_url: str) -> None:
    loaded = load_directory(DEMO, create, urls={"pas": demo_sqlite_url})
    obs = next(m for m in loaded.mappings if m.resource_type == "Observation")
    assert [tuple(c) for c in obs.spec.search["context"].reference_columns()] == [
        ("Encounter", "h.PRVSP_REFNO", ""), ("Encounter", "h.OPATT_REFNO", "op-")]
    assert ("context.reference.sources[1].id_prefix", "Encounter", "op-") in obs.prefixed


def test_an_unknown_prefix_in_a_search_parameter(demo_copy: Path) -> None:
    f = demo_copy / "Observation.sql.yaml"
    edit(f, OBS_SOURCES, OBS_SOURCES.replace("op-", "opd-"))
    assert one_problem(demo_copy) == (
        "Observation.sql.yaml", line_with(f, "h.OPATT_REFNO, id_prefix: opd-"),
        "search.context.sources[1].id_prefix: Encounter has no source with id_prefix 'opd-' "
        "(its sources: Encounter.sql.yaml (no prefix), Encounter.ae.sql.yaml (ae-), "
        "Encounter.outpatient.sql.yaml (op-))")


def test_an_unknown_prefix_in_the_output(demo_copy: Path) -> None:
    f = demo_copy / "Procedure.sql.yaml"
    edit(f, "  context: {reference: {column: x.PRVSP_REFNO, ref: Encounter}}",
         "  context: {reference: {column: x.PRVSP_REFNO, ref: Encounter, id_prefix: xx-}}")
    assert one_problem(demo_copy) == (
        "Procedure.sql.yaml", line_with(f, "id_prefix: xx-"),
        "output.context.reference.id_prefix: Encounter has no source with id_prefix 'xx-' "
        "(its sources: Encounter.sql.yaml (no prefix), Encounter.ae.sql.yaml (ae-), "
        "Encounter.outpatient.sql.yaml (op-))")


def test_a_prefix_on_a_type_not_mapped(demo_copy: Path) -> None:
    (demo_copy / "Location.sql.yaml").unlink()
    f = demo_copy / "Encounter.ae.sql.yaml"
    edit(f, "  location: {type: reference, target: Location, column: e.LOCTN_REFNO, "
            "description: The emergency department}",
         "  location: {type: reference, target: Location, column: e.LOCTN_REFNO, "
         "id_prefix: ed-, description: The emergency department}")
    assert one_problem(demo_copy) == (
        "Encounter.ae.sql.yaml", line_with(f, "id_prefix: ed-"),
        "search.location.id_prefix: Location is not mapped in this directory, so id_prefix "
        "'ed-' names no source")


def test_a_prefixed_reference_to_patient(demo_copy: Path) -> None:
    # a second Patient source, and a reference to it: the compartment could not follow it
    src = (demo_copy / "Patient.sql.yaml").read_text(encoding="utf-8")
    (demo_copy / "Patient.second.sql.yaml").write_text(
        src.replace("resource: Patient\n", "resource: Patient\nid_prefix: s2-\n"),
        encoding="utf-8")
    f = demo_copy / "Flag.sql.yaml"
    text = f.read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("  patient: {type: reference"))
    edit(f, line, line.replace("target: Patient,", "target: Patient, id_prefix: s2-,"))
    assert one_problem(demo_copy) == (
        "Flag.sql.yaml", line_with(f, "id_prefix: s2-"),
        "search.patient.id_prefix: a reference to Patient must hold the keys of its source "
        "without an id_prefix (the patient compartment compares them as they are)")


@pytest.mark.parametrize(("node", "message"), [
    ({"column": "h.X", "id_prefix": "op-"},
     "id_prefix names a source of the referenced type; it goes with ref"),
    ({"sources": [{"column": "h.X"}]}, "sources: lists the columns of a reference; it goes "
                                       "with ref"),
    ({"ref": "Encounter", "column": "h.Y", "sources": [{"column": "h.X"}]},
     "a reference with sources takes only ref (each source names its column and id_prefix)"),
    ({"ref": "Encounter", "sources": []}, "sources: lists at least one column"),
    ({"ref": "Encounter", "sources": [{"column": "h.X", "id_prefix": "op"}]},
     "String should match pattern"),
])
def test_output_shapes_refused(node: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Expr.model_validate(node)


@pytest.mark.parametrize(("param", "message"), [
    ({"type": "token", "column": "x.A", "id_prefix": "op-"},
     "id_prefix and sources are for reference parameters with target"),
    ({"type": "reference", "targets": {"Encounter": "x.A"}, "id_prefix": "op-"},
     "id_prefix and sources are for reference parameters with target"),
    ({"type": "reference", "target": "Encounter", "column": "x.A",
      "sources": [{"column": "x.B"}]}, "use either sources or column"),
    ({"type": "reference", "target": "Encounter", "sources": []},
     "sources: lists at least one column"),
])
def test_search_shapes_refused(param: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SearchParam.model_validate(param)


def _build(generate: bool) -> Any:
    text = make_storage("string", LONDON)
    storage = {"h.S": make_storage("integer", LONDON), "h.O": make_storage("integer", LONDON)}
    ctx = CompileContext(codemaps={}, storage=lambda r: storage.get(r, text))
    old = mcompile.GENERATE
    mcompile.GENERATE = generate
    try:
        return compile_output({"context": {"reference": {"ref": "Encounter", "sources": [
            {"column": "h.S"}, {"column": "h.O", "id_prefix": "op-"}]}},
            "subject": {"reference": {"column": "h.P", "ref": "Patient"}},
            "basedOn": [{"reference": {"column": "h.A", "ref": "Encounter",
                                       "id_prefix": "ae-"}}]}, ctx)
    finally:
        mcompile.GENERATE = old


@pytest.mark.parametrize("generate", [True, False])
def test_the_first_source_with_a_value_is_served(generate: bool) -> None:
    build = _build(generate)
    assert build({"h.S": 5, "h.O": None, "h.P": "1"})["context"] == {"reference": "Encounter/5"}
    assert build({"h.S": None, "h.O": 5, "h.A": 9}) == {
        "context": {"reference": "Encounter/op-5"}, "basedOn": [{"reference": "Encounter/ae-9"}]}
    assert "context" not in build({"h.P": "1"})
    before = dropped.snapshot().get(("context.reference", SEVERAL_REFERENCES), 0)
    # both filled: a data fault, counted (never silent); the first listed is served
    assert build({"h.S": 5, "h.O": 6})["context"] == {"reference": "Encounter/5"}
    assert dropped.snapshot()[("context.reference", SEVERAL_REFERENCES)] == before + 1


def test_the_reverse_mapping_stores_each_reference_in_its_sources_column() -> None:
    storage = make_storage("integer", LONDON)
    read = compile_reverse({"context": {"reference": {"ref": "Encounter", "sources": [
        {"column": "h.S"}, {"column": "h.O", "id_prefix": "op-"}]}}},
        ReverseContext({}, lambda _r: storage, LONDON), "Observation")
    assert read({"context": {"reference": "Encounter/op-5"}}) == {"h.O": 5}
    assert read({"context": {"reference": "Encounter/5"}}) == {"h.S": 5}
    with pytest.raises(ReverseError):
        read({"context": {"reference": "Patient/5"}})
