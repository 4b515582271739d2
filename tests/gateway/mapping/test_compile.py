"""The output compiler's rules, and the reviewed functions a mapping may call.

* a mapping with column/field/function is an expression; any other scalar is a literal;
* an element whose expressions are all empty is omitted, literals and all;
* lists are lists; ``each: <child>`` repeats an item per child row, parent values visible.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from adapters.base import Layout
from gateway.mapping.codemaps import CodeMap, Target
from gateway.mapping.compile import (
    CompileContext,
    CompileError,
    compile_expr,
    compile_node,
    compile_output,
    compile_tree,
    finish_output,
)
from gateway.mapping.functions import (
    FUNCTIONS,
    days_between,
    deceased_flag,
    minutes_between,
    sha1_hex_to_base64,
    visit_status,
)
from gateway.mapping.model import Expr
from gateway.mapping.storage import Storage, make_storage

LONDON = ZoneInfo("Europe/London")
TYPES = {
    "p.ID": "integer",
    "p.DOB": "date:yyyymmdd",
    "s.ADMIT": "datetime:yyyymmddhhmm",
    "s.DISCH": "datetime:yyyymmddhhmm",
    "a.START": "datetime:yyyymmddhhmm",
}


@pytest.fixture(autouse=True, params=["generated", "closures", "positions"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every rule holds for the generated function and for the closures it inlines, and for
    the generated function reading tuple records (an adapter's Layout) by position."""
    monkeypatch.setattr("gateway.mapping.compile.GENERATE", request.param != "closures")
    return str(request.param)


def context(**codemaps: CodeMap) -> CompileContext:
    storages = {ref: make_storage(kind, LONDON) for ref, kind in TYPES.items()}
    text = make_storage("string", LONDON)

    def storage(ref: str) -> Storage:
        return storages.get(ref, text)

    use = CodeMap("address-use", "http://hl7.org/fhir/address-use", "omit",
                  {"HOME": Target("home", "Home"), "TEMP": Target("temp", "Temporary")})
    return CompileContext(codemaps={"address-use": use, **codemaps}, storage=storage)


@pytest.fixture(autouse=True)
def _mode(strategy: str) -> None:
    global MODE
    MODE = strategy


MODE = "generated"


def build(output: dict[str, Any], ctx: CompileContext | None = None
          ) -> Any:
    ctx = ctx or context()
    if MODE != "positions":
        return compile_output(output, ctx)
    tree = compile_tree(output, ctx)

    def by_position(rec: dict[str, Any]) -> Any:
        # the record as an adapter with a layout would give it: every reference the
        # mapping reads has a place (a child's own columns in the child, the rest on top)
        children = {k[1:]: sorted({f for row in rows for f in row})
                    for k, rows in rec.items() if k.startswith("@")}
        for name in ctx.children:
            children.setdefault(name, [])
        in_children = {f for fields in children.values() for f in fields}
        top = {k for k in rec if not k.startswith("@")} | ctx.refs
        top |= {r for refs in ctx.children.values() for r in refs} - in_children
        layout = Layout(tuple(sorted(top)),
                        tuple((n, tuple(f)) for n, f in sorted(children.items())))
        return finish_output(tree, layout)(layout.as_row(rec))

    return by_position


# --- literals and expressions -----------------------------------------------------------------


def test_literals_and_expressions() -> None:
    fn = build({"gender": {"column": "p.SEX"}, "active": True, "language": "en-GB"})
    assert fn({"p.SEX": "female"}) == {"gender": "female", "active": True, "language": "en-GB"}


def test_a_mapping_without_expressions_is_a_constant() -> None:
    node = {"system": "http://unitsofmeasure.org", "code": "min"}
    assert compile_node(node, context(), "length") == (None, node)
    assert build({"serviceProvider": {"reference": "Organization/1"}})({}) == {
        "serviceProvider": {"reference": "Organization/1"}}


def test_an_element_whose_expressions_are_all_empty_is_omitted_with_its_literals() -> None:
    fn = build({"telecom": [
        {"system": "phone", "use": "home", "value": {"column": "p.HOME_TEL"}},
        {"system": "phone", "use": "mobile", "value": {"column": "p.MOBILE_TEL"}},
    ]})
    assert fn({"p.HOME_TEL": None, "p.MOBILE_TEL": "07700 900001"}) == {"telecom": [
        {"system": "phone", "use": "mobile", "value": "07700 900001"}]}
    assert fn({"p.HOME_TEL": "   ", "p.MOBILE_TEL": None}) == {}  # blank is empty
    assert fn({}) == {}


def test_one_present_expression_keeps_the_element_and_its_literals() -> None:
    fn = build({"period": {"start": {"column": "s.ADMIT"}, "end": {"column": "s.DISCH"}}})
    assert fn({"s.ADMIT": "202401151030", "s.DISCH": None}) == {
        "period": {"start": "2024-01-15T10:30:00+00:00"}}


def test_nested_elements_are_omitted_from_the_inside_out() -> None:
    fn = build({"name": [{
        "use": "official",
        "family": {"column": "p.SURNAME"},
        "given": [{"column": "p.FORENAME"}, {"column": "p.SECOND"}],
        "prefix": [{"column": "p.TITLE"}],
    }]})
    assert fn({"p.SURNAME": None, "p.FORENAME": None}) == {}
    assert fn({"p.FORENAME": "Jane"}) == {"name": [{"use": "official", "given": ["Jane"]}]}
    assert fn({"p.SURNAME": "Smith", "p.SECOND": "Ann"}) == {
        "name": [{"use": "official", "family": "Smith", "given": ["Ann"]}]}


def test_an_extension_whose_value_is_unmapped_disappears() -> None:
    ethnic = CodeMap("ethnic", "https://example.org/ethnic", "omit", {"WB": Target("A", "B")})
    fn = build({"extension": [{
        "url": "https://example.org/ext",
        "valueCodeableConcept": {"column": "p.ETH", "codemap": "ethnic",
                                 "part": "codeable-concept"},
    }]}, context(ethnic=ethnic))
    assert fn({"p.ETH": "ZZ"}) == {}
    assert fn({"p.ETH": "WB"}) == {"extension": [{
        "url": "https://example.org/ext",
        "valueCodeableConcept": {"coding": [
            {"system": "https://example.org/ethnic", "code": "A", "display": "B"}]}}]}


def test_lists_keep_literal_items_and_drop_empty_ones() -> None:
    fn = build({"line": [{"column": "a.L1"}, "Literal line", {"column": "a.L2"}]})
    assert fn({"a.L1": "1 High St", "a.L2": None}) == {"line": ["1 High St", "Literal line"]}
    assert fn({}) == {"line": ["Literal line"]}
    assert build({"given": [{"column": "p.A"}, {"column": "p.B"}]})({}) == {}


def test_false_and_zero_are_values_not_empty() -> None:
    fn = build({"active": {"column": "p.ARCHIVED", "transform": ["yes_no", "not"]},
                "multipleBirthInteger": {"column": "p.BIRTH_ORDER", "transform": "integer"}})
    assert fn({"p.ARCHIVED": "Y", "p.BIRTH_ORDER": "0"}) == {
        "active": False, "multipleBirthInteger": 0}


def test_storage_conversion_comes_before_transforms_and_maps() -> None:
    fn = build({"id": {"column": "p.ID", "transform": "string"},
                "birthDate": {"column": "p.DOB"},
                "text": {"column": "p.DOB", "transform": "upper"}})
    assert fn({"p.ID": 100001, "p.DOB": "19650412"}) == {
        "id": "100001", "birthDate": "1965-04-12", "text": "1965-04-12"}
    assert fn({"p.ID": 1, "p.DOB": "00000000"}) == {"id": "1"}  # not a date: omitted


def test_field_works_like_column() -> None:
    assert build({"family": {"field": "PID-5.1", "transform": "title_case"}})(
        {"PID-5.1": "O'BRIEN"}) == {"family": "O'Brien"}


def test_references() -> None:
    ctx = context()
    fn = compile_output({"subject": {"reference": {"column": "s.PAT", "ref": "Patient"}}}, ctx)
    assert fn({"s.PAT": 100001}) == {"subject": {"reference": "Patient/100001"}}
    assert fn({"s.PAT": None}) == {}
    assert ctx.references == [("subject.reference", "Patient", None)]


# --- each: one item per child row -------------------------------------------------------------


ADDRESS = {
    "each": "addresses",
    "use": {"column": "a.TYPE", "codemap": "address-use"},
    "line": [{"column": "a.LINE1"}],
    "text": {"column": "p.SURNAME"},  # a parent value, visible in each row
    "period": {"start": {"column": "a.START"}},
}


def test_each_repeats_an_item_per_child_row_with_parent_values_visible() -> None:
    ctx = context()
    fn = compile_output({"address": [ADDRESS]}, ctx)
    rec = {"p.SURNAME": "Smith", "@addresses": [
        {"a.TYPE": "HOME", "a.LINE1": "14 Cardigan Road", "a.START": "199005010000"},
        {"a.TYPE": "TEMP", "a.LINE1": "7 Church Lane", "a.START": "201801010000"},
    ]}
    assert fn(rec) == {"address": [
        {"use": "home", "line": ["14 Cardigan Road"], "text": "Smith",
         "period": {"start": "1990-05-01T00:00:00+01:00"}},
        {"use": "temp", "line": ["7 Church Lane"], "text": "Smith",
         "period": {"start": "2018-01-01T00:00:00+00:00"}},
    ]}
    # Everything an each item reads is listed under its child (the adapter tells parent
    # columns from child columns by alias); nothing else was read.
    assert ctx.refs == set()
    assert ctx.children == {"addresses": {"a.TYPE", "a.LINE1", "a.START", "p.SURNAME"}}


def test_each_without_rows_omits_the_element() -> None:
    fn = build({"address": [ADDRESS]})
    assert fn({"p.SURNAME": "Smith", "@addresses": []}) == {}
    assert fn({"p.SURNAME": "Smith"}) == {}


def test_each_skips_a_row_whose_item_is_empty() -> None:
    fn = build({"identifier": [
        {"system": "urn:pas", "value": {"column": "p.PASID"}},
        {"each": "ids", "use": "old", "system": "urn:old", "value": {"column": "i.ID"}},
    ]})
    rec = {"p.PASID": "D1", "@ids": [{"i.ID": None}, {"i.ID": "H2"}]}
    assert fn(rec) == {"identifier": [{"system": "urn:pas", "value": "D1"},
                                      {"use": "old", "system": "urn:old", "value": "H2"}]}


def test_a_child_value_shadows_a_parent_value_of_the_same_name() -> None:
    fn = build({"x": [{"each": "c", "value": {"column": "k.V"}}]})
    assert fn({"k.V": "parent", "@c": [{"k.V": "child"}]}) == {"x": [{"value": "child"}]}


def test_a_parent_value_shows_where_the_child_row_lacks_the_column() -> None:
    # A row that holds every column its item reads is used as it is; one that lacks one
    # is read over the parent record, so the parent's value shows through.
    if MODE == "positions":
        pytest.skip("dict records only: a layout gives every row of a child the same columns")
    fn = build({"x": [{"each": "c", "value": {"column": "k.V"}, "id": {"column": "k.ID"}}]})
    rec = {"k.V": "parent", "@c": [{"k.ID": "1", "k.V": "child"}, {"k.ID": "2"}]}
    assert fn(rec) == {"x": [{"value": "child", "id": "1"}, {"value": "parent", "id": "2"}]}
    assert rec == {"k.V": "parent", "@c": [{"k.ID": "1", "k.V": "child"}, {"k.ID": "2"}]}


def test_a_list_mixing_each_items_literals_and_expressions_keeps_its_order() -> None:
    fn = build({"x": [
        {"each": "c", "value": {"column": "k.V"}},
        "literal",
        {"column": "p.A"},
        {"each": "c", "other": {"column": "k.W"}, "parent": {"column": "p.A"}},
    ]})
    rec = {"p.A": "a", "@c": [{"k.V": "v1", "k.W": "w1"}, {"k.V": None, "k.W": "w2"}]}
    assert fn(rec) == {"x": [{"value": "v1"}, "literal", "a", {"other": "w1", "parent": "a"},
                             {"other": "w2", "parent": "a"}]}
    assert fn({}) == {"x": ["literal"]}


def test_literals_keep_their_place_among_expressions() -> None:
    fn = build({"a": {"column": "p.A"}, "lit": 1, "b": {"column": "p.B"}})
    assert list(fn({"p.A": "x", "p.B": "y"})) == ["a", "lit", "b"]
    assert list(fn({"p.B": "y"})) == ["lit", "b"]
    fn = build({"c": {"lit": 1, "a": {"column": "p.A"}, "b": {"column": "p.B"}}})
    assert list(fn({"p.A": "x", "p.B": "y"})["c"]) == ["lit", "a", "b"]
    assert list(fn({"p.B": "y"})["c"]) == ["lit", "b"]
    assert fn({}) == {}


def test_text_values_that_are_not_str() -> None:
    fn = build({"a": {"column": "p.A"}, "b": {"column": "p.B", "transform": "upper"}})
    assert fn({"p.A": 12, "p.B": 3.5}) == {"a": "12", "b": "3.5"}
    assert fn({"p.A": " x ", "p.B": "  "}) == {"a": "x"}


def test_references_inside_each_name_their_child() -> None:
    ctx = context()
    compile_output({"generalPractitioner": [
        {"each": "gp", "reference": {"column": "r.PROCA", "ref": "Practitioner"}}]}, ctx)
    assert ctx.references == [("generalPractitioner[0].reference", "Practitioner", "gp")]


@pytest.mark.parametrize(("output", "path", "message"), [
    ({"address": {"each": "addresses", "city": {"column": "a.CITY"}}}, "address",
     "'each' may only appear on an item of a list"),
    ({"address": [{"each": 3, "city": {"column": "a.CITY"}}]}, "address[0].each",
     "names a child (a string)"),
    ({"address": [{"each": "addresses", "use": "home"}]}, "address[0]",
     "an 'each' item must read something from the child"),
    ({"contact": [{"each": "c", "address": [{"each": "d", "city": {"column": "d.X"}}]}]},
     "contact[0].address[0].each", "children cannot be nested"),
    ({"birthDate": None}, "birthDate", "an empty value; remove the key or give it a value"),
    ({"gender": {"column": "p.SEX", "codemap": "sex"}}, "gender", "unknown codemap 'sex'"),
    ({"name": [{"family": {"column": "p.S", "transform": "titlecase"}}]}, "name[0].family",
     "unknown transform 'titlecase' (one of: title_case, upper, lower, string, integer, decimal, "
     "yes_no, not, digits, no_spaces)"),
    ({"length": {"value": {"function": "los", "args": ["s.A"]}}}, "length.value",
     "unknown function 'los' (one of: minutes_between, days_between, deceased_flag, "
     "visit_status, sha1_hex_to_base64)"),
    ({"gender": {"colum": "p.SEX", "codemap": "address-use"}}, "gender.colum", "unknown key"),
    ({"gender": {"column": "p.SEX", "transfrom": "upper"}}, "gender.transfrom", "unknown key"),
    ({"gender": {"codemap": "address-use"}}, "gender",
     "an expression needs exactly one of: column, field, function"),
    ({"gender": {"column": "p.SEX", "part": "coding"}}, "gender",
     "part: display/system/coding/codeable-concept needs a codemap"),
])
def test_compile_errors_name_the_element(output: dict[str, Any], path: str,
                                         message: str) -> None:
    with pytest.raises(CompileError) as info:
        build(output)
    assert (info.value.path, info.value.message) == (path, message)


def test_every_compile_error_is_collected() -> None:
    ctx = context()
    with pytest.raises(CompileError) as info:
        compile_output({
            "gender": {"column": "p.SEX", "codemap": "sex"},
            "name": [{"family": {"column": "p.S", "transform": "nope"}}],
            "birthDate": {"column": "p.DOB"},
            "length": {"value": {"function": "los"}, "unit": None},
        }, ctx)
    assert info.value is ctx.errors[0]
    assert [(e.path, e.message.split(" (")[0]) for e in ctx.errors] == [
        ("gender", "unknown codemap 'sex'"),
        ("name[0].family", "unknown transform 'nope'"),
        ("length.value", "unknown function 'los'"),
        ("length.unit", "an empty value; remove the key or give it a value"),
    ]


# --- functions --------------------------------------------------------------------------------


def test_functions_receive_converted_values() -> None:
    fn = build({"length": {
        "value": {"function": "minutes_between", "args": ["s.ADMIT", "s.DISCH"]},
        "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"}})
    assert fn({"s.ADMIT": "202309041130", "s.DISCH": "202309071600"}) == {"length": {
        "value": 4590, "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"}}
    # An ongoing spell has no length: the whole Duration goes, its literals with it.
    assert fn({"s.ADMIT": "202309041130", "s.DISCH": None}) == {}


def test_function_arguments_are_fetched() -> None:
    ctx = context()
    compile_expr(Expr.model_validate({"function": "days_between", "args": ["s.ADMIT", "s.DISCH"]}),
                 ctx, "x")
    assert ctx.refs == {"s.ADMIT", "s.DISCH"}


def test_a_misspelt_functions_columns_still_count_as_read() -> None:
    # Otherwise the loader would add "declared but not used" for each of its columns.
    ctx = context()
    with pytest.raises(CompileError):
        compile_expr(Expr.model_validate({"function": "los", "args": ["s.ADMIT"]}), ctx, "x")
    assert ctx.refs == {"s.ADMIT"}


def test_minutes_between_counts_real_minutes_across_clock_changes() -> None:
    assert minutes_between("2023-09-04T11:30:00+01:00", "2023-09-07T16:00:00+01:00") == 4590
    # 30 March 12:00 GMT to 31 March 12:00 BST is 23 hours, not 24.
    assert minutes_between("2024-03-30T12:00:00+00:00", "2024-03-31T12:00:00+01:00") == 1380
    # 26 October 12:00 BST to 27 October 12:00 GMT is 25 hours.
    assert minutes_between("2024-10-26T12:00:00+01:00", "2024-10-27T12:00:00+00:00") == 1500
    assert minutes_between("2024-01-01T10:00:00+00:00", "2024-01-01T10:00:59+00:00") == 0
    assert minutes_between("2024-01-01T10:00:00+00:00", "2024-01-01T10:00:00+00:00") == 0


@pytest.mark.parametrize(("start", "end"), [
    (None, "2024-01-01T10:00:00+00:00"), ("2024-01-01T10:00:00+00:00", None), ("", ""),
    ("2024-01-02T10:00:00+00:00", "2024-01-01T10:00:00+00:00"),  # ends before it starts
    ("yesterday", "2024-01-01T10:00:00+00:00"),
    ("2024-01-01T10:00:00+00:00", "2024-01-01T11:00:00"),  # aware and naive do not mix
])
def test_minutes_between_is_none_when_there_is_no_answer(start: Any, end: Any) -> None:
    assert minutes_between(start, end) is None


def test_days_between_counts_calendar_days() -> None:
    assert days_between("2023-09-04T11:30:00+01:00", "2023-09-07T09:00:00+01:00") == 3
    assert days_between("2023-09-04T23:59:00+01:00", "2023-09-05T00:01:00+01:00") == 1
    assert days_between("2024-02-28", "2024-03-01") == 2
    assert days_between("2023-09-04", "2023-09-04") == 0
    assert days_between("2023-09-05", "2023-09-04") is None
    assert days_between(None, "2023-09-04") is None
    assert days_between("2023-02-30", "2023-03-04") is None


def test_the_function_registry() -> None:
    assert dict(FUNCTIONS) == {"minutes_between": minutes_between,
                               "days_between": days_between,
                               "deceased_flag": deceased_flag, "visit_status": visit_status,
                               "sha1_hex_to_base64": sha1_hex_to_base64}


def test_sha1_hex_to_base64() -> None:
    digest = hashlib.sha1(b"letter").digest()
    assert sha1_hex_to_base64(digest.hex()) == base64.b64encode(digest).decode()
    assert sha1_hex_to_base64(digest.hex().upper()) == base64.b64encode(digest).decode()
    for bad in (None, "", "abc", "z" * 40, digest.hex() + "00"):
        assert sha1_hex_to_base64(bad) is None


def test_deceased_flag_and_visit_status() -> None:
    assert deceased_flag("Y", None) is True
    assert deceased_flag("y ", "") is True
    assert deceased_flag("Y", "2024-01-10") is None  # the date gives deceasedDateTime
    assert deceased_flag("N", None) is None and deceased_flag(None, None) is None
    assert visit_status("2024-01-10T09:30:00+00:00", "2024-01-12T10:00:00+00:00") == "finished"
    assert visit_status("2024-01-10T09:30:00+00:00", None) == "in-progress"
    assert visit_status("2999-01-10T09:30:00+00:00", None) == "planned"
    assert visit_status(None, None, "2030-01-01") == "planned"  # a pre-admission
    assert visit_status(None, None) == "unknown" and visit_status("garbage", None) == "unknown"


# --- requires: an element output only when its named keys have values ------------------------

QUANTITY = {
    "low": {
        "requires": "value",
        "value": {"column": "r.LOW", "transform": "decimal"},
        "unit": {"column": "r.UNITS"},
        "system": "http://unitsofmeasure.org",
    },
    "text": {"column": "r.TEXT"},
}


def test_requires_keeps_an_element_whose_key_has_a_value() -> None:
    assert build({"range": QUANTITY}, context())({"r.LOW": "3.5", "r.UNITS": "mmol/L"}) == {
        "range": {"low": {"value": 3.5, "unit": "mmol/L",
                          "system": "http://unitsofmeasure.org"}}}


def test_requires_drops_an_element_without_it_but_not_its_siblings() -> None:
    # a unit with no number is no measurement: the whole low goes, the text stays
    out = build({"range": QUANTITY}, context())({"r.UNITS": "mmol/L", "r.TEXT": "< 5"})
    assert out == {"range": {"text": "< 5"}}
    assert build({"range": QUANTITY}, context())({"r.UNITS": "mmol/L"}) == {}


def test_requires_a_list_of_keys() -> None:
    node = {"q": {"requires": ["value", "unit"], "value": {"column": "r.LOW"},
                  "unit": {"column": "r.UNITS"}}}
    assert build(node, context())({"r.LOW": "1"}) == {}
    assert build(node, context())({"r.LOW": "1", "r.UNITS": "g"}) == {
        "q": {"value": "1", "unit": "g"}}


@pytest.mark.parametrize(("requires", "message"), [
    ("code", "names keys of this element"),
    ([], "names keys of this element"),
    ("system", "'system' is a literal"),
])
def test_requires_names_expression_keys_of_the_element(requires: Any, message: str) -> None:
    node = {"q": {"requires": requires, "value": {"column": "r.LOW"},
                  "system": "http://unitsofmeasure.org"}}
    with pytest.raises(CompileError) as err:
        compile_output(node, context())
    assert err.value.path == "q.requires"
    assert message in err.value.message
