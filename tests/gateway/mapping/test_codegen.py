"""The generated builder gives the closures' resources, byte for byte; its source holds
nothing from a mapping file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from adapters import registry
from adapters.base import Layout, Query, SortKey
from gateway.mapping import codegen
from gateway.mapping.codemaps import CodeMap, Target
from gateway.mapping.compile import CompileContext, _compile_dict, compile_output
from gateway.mapping.loader import CompiledMapping, load_directory
from gateway.mapping.storage import Storage, make_storage

REPO = Path(__file__).resolve().parents[3]


def _load(url: str, generate: bool, monkeypatch: pytest.MonkeyPatch) -> list[CompiledMapping]:
    monkeypatch.setattr("gateway.mapping.compile.GENERATE", generate)
    loaded = load_directory(REPO / "mappings" / "demo-pas", registry.create, urls={"pas": url})
    return sorted(loaded.mappings, key=lambda m: m.resource_type)


async def _every_record(m: CompiledMapping) -> list[dict[str, Any]]:
    key = m.spec.id.source_ref
    assert key is not None
    page = await m.adapter.fetch(m.prepared, Query(None, (SortKey(key),), count=100_000))
    assert not page.more
    return page.records


def test_demo_resources_are_identical_both_ways(demo_sqlite_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    closures = _load(demo_sqlite_url, False, monkeypatch)
    generated = _load(demo_sqlite_url, True, monkeypatch)
    seen = 0
    for slow, fast in zip(closures, generated, strict=True):
        assert slow.resource_type == fast.resource_type
        assert not hasattr(slow.build, codegen.IR_ATTR)  # the closures' wrapper, not inlined
        assert fast.build.__code__.co_filename == "<mapping build>"
        records = asyncio.run(_every_record(fast))
        assert records, fast.resource_type
        for rec in records:
            # serialised: key order counts too
            assert orjson.dumps(fast.build(rec)) == orjson.dumps(slow.build(rec)), rec
        seen += len(records)
    assert seen > 1500  # every patient, and the other types besides
    for m in (*closures, *generated):
        asyncio.run(m.adapter.aclose())


def _context() -> CompileContext:
    text = make_storage("string", ZoneInfo("Europe/London"))

    def storage(ref: str) -> Storage:
        return text

    sneaky = CodeMap("sneaky", "urn:x\"); import os  #", "omit",
                     {"A": Target("a\"'\\n", "A'); os.system('x')")})
    return CompileContext(codemaps={"sneaky": sneaky}, storage=storage)


HOSTILE = {
    "k\"); import os; os.system('x') #": "literal'); os.system('y') #\n",
    "code": {"column": "p.X'); os.system('z') #", "codemap": "sneaky", "part": "coding"},
    "rows": [{"each": "kids\"]", "value": {"column": "c.V\\"}, "note": "{__import__('os')}"}],
}


def test_nothing_from_the_mapping_reaches_the_source() -> None:
    fn, _ = _compile_both(HOSTILE)
    built, _const = _compile_dict(HOSTILE, _context(), "")
    assert built is not None
    _, source = codegen.generate(built)
    for word in ("import", "os.system", "__import__", "literal", "sneaky", "kids", "c.V",
                 "p.X", "'", '"', "\\"):
        assert word not in source, word
    rec = {"p.X'); os.system('z') #": "A",
           "@kids\"]": [{"c.V\\": " one "}, {"c.V\\": "  "}]}
    assert fn(rec) == {
        "k\"); import os; os.system('x') #": "literal'); os.system('y') #\n",
        "code": {"system": "urn:x\"); import os  #", "code": "a\"'\\n",
                 "display": "A'); os.system('x')"},
        "rows": [{"value": "one", "note": "{__import__('os')}"}],
    }


def _compile_both(output: dict[str, Any]) -> tuple[Any, Any]:
    import gateway.mapping.compile as compile_module

    old = compile_module.GENERATE
    try:
        compile_module.GENERATE = True
        fast = compile_output(output, _context())
        compile_module.GENERATE = False
        slow = compile_output(output, _context())
    finally:
        compile_module.GENERATE = old
    return fast, slow


@pytest.mark.parametrize("rec", [
    {},
    {"p.X'); os.system('z') #": "B"},  # an unmapped code: omitted
    {"@kids\"]": [{"c.V\\": 7}], "p.X'); os.system('z') #": " A "},
    {"@kids\"]": [], "c.V\\": "parent"},
])
def test_hostile_mapping_both_ways(rec: dict[str, Any]) -> None:
    fast, slow = _compile_both(HOSTILE)
    assert orjson.dumps(fast(rec)) == orjson.dumps(slow(rec))


def test_an_undescribed_builder_is_called_as_it_is() -> None:
    def custom(rec: dict[str, Any]) -> Any:
        return rec.get("x")

    built, source = codegen.generate(codegen.describe(
        lambda rec: None, "items", [custom, custom]))
    assert source.count("c0(rec)") == 2  # the same builder, called twice
    assert built({"x": 1}) == [1, 1]
    assert built({}) is None


# --- records as tuples (an adapter's Layout) ------------------------------------------------

ADDRESS = {"line": [{"each": "addresses", "text": {"column": "a.LINE1"},
                     "of": {"column": "p.NAME"}}],
           "name": {"column": "p.NAME"}}
LAYOUT = Layout(("p.ID", "p.NAME"), (("ids", ("i.VALUE",)), ("addresses", ("a.LINE1",))))


def test_a_layout_is_read_by_position() -> None:
    built, _const = _compile_dict(ADDRESS, _context(), "")
    assert built is not None
    fn, source = codegen.generate(built, layout=LAYOUT)
    assert ".get(" not in source and "**" not in source  # no look-ups, no merged records
    assert "rec[1]" in source and "rec[3]" in source  # p.NAME; the addresses' rows
    # a child row carries its parent key after its own columns: never read
    rec = (1, "Ann", (), (("1 High St", 1), ("2 Low Rd", 1)))
    assert fn(rec) == {"line": [{"text": "1 High St", "of": "Ann"},
                                {"text": "2 Low Rd", "of": "Ann"}], "name": "Ann"}
    dict_fn, _ = codegen.generate(built)
    assert dict_fn(LAYOUT.as_dict(rec)) == fn(rec)


@pytest.mark.parametrize(("column", "message"), [
    ("i.VALUE", "i.VALUE is a column of a child: read it inside an 'each' over that child"),
    ("x.NOWHERE", "x.NOWHERE is not in the records the source returns"),
])
def test_a_reference_outside_the_layout_is_refused(column: str, message: str) -> None:
    output = {"line": [{"each": "addresses", "text": {"column": column}}]}
    built, _const = _compile_dict(output, _context(), "")
    assert built is not None
    with pytest.raises(codegen.LayoutError) as info:
        codegen.generate(built, layout=LAYOUT)
    assert (str(info.value), info.value.path) == (message, "line[0].text")
