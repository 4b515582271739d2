"""The mapping-file schema: what pydantic accepts and what it refuses, with which message."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.mapping.model import (
    Connection,
    Expr,
    MappingFile,
    MappingSet,
    SearchParam,
    TokenSystem,
)
from gateway.mapping.storage import STORAGE_TYPES


def _errors(model: Any, data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str, str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [(e["loc"], e["type"], e["msg"].removeprefix("Value error, "))
            for e in info.value.errors()]


def _mapping(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resource": "Patient",
        "profile": "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Patient-1",
        "source": {"connection": "pas", "table": "PATIENTS", "alias": "p"},
        "types": {"p.PATNT_REFNO": "integer"},
        "id": {"column": "p.PATNT_REFNO"},
        "search": {
            "family": {"type": "string", "column": "p.SURNAME"},
            "name": {"type": "string", "columns": ["p.SURNAME", "p.FORENAME"]},
            "birthdate": {"type": "date", "column": "p.DTTM_OF_BIRTH"},
            "gender": {"type": "token", "column": "p.SEXXX_CODE", "codemap": "sex"},
        },
        "sort": ["family", "birthdate"],
        "output": {"gender": {"column": "p.SEXXX_CODE", "codemap": "sex"}},
    }
    base.update(overrides)
    return base


# --- expressions ------------------------------------------------------------------------------


def test_an_expression_reads_exactly_one_source() -> None:
    assert Expr.model_validate({"column": "p.SURNAME"}).source_ref == "p.SURNAME"
    assert Expr.model_validate({"field": "PID-5.1"}).source_ref == "PID-5.1"
    fn = Expr.model_validate({"function": "days_between", "args": ["a.X", "a.Y"]})
    assert fn.source_ref is None
    assert fn.args == ["a.X", "a.Y"]
    for bad in ({"column": "p.A", "field": "B"}, {"column": "p.A", "function": "f"},
                {"transform": "title_case"}):
        [(loc, _, msg)] = _errors(Expr, bad)
        assert loc == ()
        assert msg == "an expression needs exactly one of: column, field, function"


def test_a_function_result_cannot_be_transformed_or_mapped() -> None:
    [(_, _, msg)] = _errors(Expr, {"function": "days_between", "transform": "string"})
    assert msg == "a function's result cannot be transformed or code-mapped"
    [(_, _, msg)] = _errors(Expr, {"function": "days_between", "codemap": "sex"})
    assert msg == "a function's result cannot be transformed or code-mapped"


def test_part_other_than_code_needs_a_codemap() -> None:
    [(_, _, msg)] = _errors(Expr, {"column": "p.SEX", "part": "coding"})
    assert msg == "part: display/system/coding/codeable-concept needs a codemap"
    assert Expr.model_validate({"column": "p.SEX", "codemap": "sex", "part": "coding"})
    [(loc, kind, _)] = _errors(Expr, {"column": "p.SEX", "codemap": "sex", "part": "colour"})
    assert (loc, kind) == (("part",), "literal_error")


def test_an_unknown_key_in_an_expression_is_refused() -> None:
    errors = _errors(Expr, {"column": "p.SURNAME", "transfrom": "title_case"})
    assert errors == [(("transfrom",), "extra_forbidden", "Extra inputs are not permitted")]


def test_transform_may_be_a_chain() -> None:
    e = Expr.model_validate({"column": "p.ARCHV_FLAG", "transform": ["yes_no", "not"]})
    assert e.transform == ["yes_no", "not"]


# --- search parameters ------------------------------------------------------------------------


def test_search_parameter_shapes() -> None:
    assert SearchParam.model_validate({"type": "string", "column": "p.A"}).refs == ["p.A"]
    assert SearchParam.model_validate(
        {"type": "string", "columns": ["p.A", "p.B"]}).refs == ["p.A", "p.B"]
    period = SearchParam.model_validate(
        {"type": "date", "period": {"start": "s.ADMIT", "end": "s.DISCH"}})
    assert period.refs == ["s.ADMIT", "s.DISCH"]
    systems = SearchParam.model_validate({"type": "token", "systems": [
        {"system": "https://fhir.nhs.uk/Id/nhs-number", "column": "p.NHS", "check": "nhs-number"},
        {"system": "urn:local", "field": "PID-3"}]})
    assert systems.refs == ["p.NHS", "PID-3"]
    one = SearchParam.model_validate({"type": "reference", "target": "Patient", "column": "s.P"})
    assert one.reference_targets() == {"Patient": "s.P"}
    many = SearchParam.model_validate({"type": "reference", "targets": {
        "Practitioner": "r.PROCA", "Organization": "r.ORGAN"}})
    assert many.reference_targets() == {"Practitioner": "r.PROCA", "Organization": "r.ORGAN"}
    assert many.refs == ["r.PROCA", "r.ORGAN"]
    assert SearchParam.model_validate({"type": "string", "column": "p.A"}
                                      ).reference_targets() == {}


@pytest.mark.parametrize(("data", "message"), [
    ({"type": "string"}, "a search parameter needs one of: column, columns"),
    ({"type": "string", "column": "p.A", "columns": ["p.B"]},
     "a search parameter needs one of: column, columns"),
    ({"type": "reference", "column": "s.P"},
     "a reference parameter needs either target (+ column) or targets"),
    ({"type": "reference", "target": "Patient", "targets": {"Patient": "s.P"}, "column": "s.P"},
     "a reference parameter needs either target (+ column) or targets"),
    ({"type": "reference", "target": "Patient"},
     "a reference parameter with target needs a column"),
    ({"type": "token", "column": "p.A", "systems": [{"system": "urn:x", "column": "p.A"}]},
     "use either systems or column/columns (+ codemap), not both"),
    ({"type": "date", "column": "s.A", "period": {"start": "s.A", "end": "s.B"}},
     "use either period or column, not both"),
    ({"type": "string", "column": "p.A", "codemap": "sex"},
     "codemap is only for token parameters"),
])
def test_search_parameter_refusals(data: dict[str, Any], message: str) -> None:
    [(loc, _, msg)] = _errors(SearchParam, data)
    assert (loc, msg) == ((), message)


def test_an_unknown_search_parameter_type_is_refused() -> None:
    [(loc, kind, _)] = _errors(SearchParam, {"type": "number", "column": "p.A"})
    assert (loc, kind) == (("type",), "literal_error")


def test_a_quantity_parameter_reads_one_column_and_its_unit() -> None:
    q = SearchParam.model_validate({"type": "quantity", "column": "o.V",
                                    "unit": {"column": "o.U", "codemap": "ucum-unit"}})
    assert q.refs == ["o.V", "o.U"]
    [(_, _, msg)] = _errors(SearchParam, {"type": "quantity", "field": "OBX-5"})
    assert "one column" in msg
    [(_, _, msg)] = _errors(SearchParam, {"type": "string", "column": "o.V",
                                          "unit": {"column": "o.U"}})
    assert msg == "unit is only for quantity parameters"


def test_an_identifier_system_needs_a_column_or_field() -> None:
    [(_, _, msg)] = _errors(TokenSystem, {"system": "urn:x"})
    assert msg == "an identifier system needs a column or field"
    when = TokenSystem.model_validate(
        {"system": "urn:x", "column": "l.CODE", "when": {"l.TYPE": ["WARD", "CLIN"]}})
    assert when.source_ref == "l.CODE"
    assert when.when == {"l.TYPE": ["WARD", "CLIN"]}


# --- mapping files ----------------------------------------------------------------------------


def test_a_minimal_mapping_file_is_accepted() -> None:
    spec = MappingFile.model_validate(_mapping())
    assert spec.resource == "Patient"
    assert spec.id.source_ref == "p.PATNT_REFNO"
    assert spec.last_updated is None
    assert spec.search_policy is None
    assert set(spec.search) == {"family", "name", "birthdate", "gender"}


def test_missing_and_unknown_top_level_keys() -> None:
    data = _mapping(colum="p.X")
    del data["profile"]
    errors = {(loc, kind) for loc, kind, _ in _errors(MappingFile, data)}
    assert errors == {(("profile",), "missing"), (("colum",), "extra_forbidden")}


def test_every_storage_type_is_accepted_and_an_unknown_one_is_named() -> None:
    MappingFile.model_validate(_mapping(types={f"p.C{i}": t for i, t in enumerate(STORAGE_TYPES)}))
    [(loc, _, msg)] = _errors(MappingFile, _mapping(types={"p.DOB": "date:ddmmyyyy"}))
    assert loc == ()
    assert msg.startswith("types.p.DOB: unknown storage type 'date:ddmmyyyy' (one of: string,")


@pytest.mark.parametrize("key", ["resourceType", "id", "meta"])
def test_output_must_not_set_derived_elements(key: str) -> None:
    output = {"gender": {"column": "p.SEXXX_CODE"}, key: {"column": "p.X"}}
    [(loc, _, msg)] = _errors(MappingFile, _mapping(output=output))
    assert loc == ()
    assert msg == f"output.{key}: must not be set (resourceType, id and meta are derived)"


def test_search_parameters_starting_with_underscore_are_built_in() -> None:
    search = {"_lastUpdated": {"type": "date", "column": "p.MODIF"}}
    [(_, _, msg)] = _errors(MappingFile, _mapping(search=search, sort=[]))
    assert msg == "search._lastUpdated: parameters starting with '_' are built in"


@pytest.mark.parametrize("name", ["gender", "name", "nothing"])
def test_sort_names_a_declared_string_or_date_parameter_on_one_column(name: str) -> None:
    [(_, _, msg)] = _errors(MappingFile, _mapping(sort=[name]))
    assert msg == f"sort: {name!r} must be a declared string or date parameter on one column"


def test_a_period_date_parameter_is_sortable() -> None:
    search = {"date": {"type": "date", "period": {"start": "s.ADMIT", "end": "s.DISCH"}}}
    assert MappingFile.model_validate(_mapping(search=search, sort=["date"])).sort == ["date"]


def test_search_policy_defaults_and_unknown_keys() -> None:
    spec = MappingFile.model_validate(_mapping(search_policy={"minimum_parameters": 2}))
    assert spec.search_policy is not None
    assert spec.search_policy.distinct_types is False
    assert spec.search_policy.unless_any_of == []
    [(loc, kind, _)] = _errors(MappingFile, _mapping(search_policy={"minimum": 2}))
    assert (loc, kind) == (("search_policy", "minimum"), "extra_forbidden")


# --- connections ------------------------------------------------------------------------------


def test_connection_defaults() -> None:
    conn = Connection.model_validate({"adapter": "sql", "url_env": "CCG_PAS_URL"})
    assert conn.timezone == "Europe/London"
    assert (conn.pool_size, conn.timeout_seconds, conn.url, conn.default) == (5, 10.0, None, None)


def test_connection_refusals() -> None:
    errors = _errors(Connection, {"adapter": "sql", "default": "demo", "pasword": "x"})
    assert {(loc, kind) for loc, kind, _ in errors} == {
        (("default",), "literal_error"), (("pasword",), "extra_forbidden")}
    [(loc, kind, _)] = _errors(MappingSet, {"connections": {"pas": {"url": "sqlite://"}}})
    assert (loc, kind) == (("connections", "pas", "adapter"), "missing")


def test_mapping_set_defaults() -> None:
    s = MappingSet.model_validate({"connections": {"pas": {"adapter": "sql"}}})
    assert s.codemaps == "../codemaps"
    assert s.base_url is None
