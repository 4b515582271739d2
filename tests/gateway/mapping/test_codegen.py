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
from adapters.base import Query, SortKey
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
