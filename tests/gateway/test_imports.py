"""No import circles in the request path (issue 11 §5): every import a module makes — at the
top, under TYPE_CHECKING or inside a function — read from the source, and the graph of the
gateway's own modules searched for cycles through the modules a request passes."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WATCHED = ("gateway.audit", "gateway.providers", "gateway.compartment", "gateway.middleware",
           "gateway.routes", "gateway.registry", "gateway.multisource", "gateway.capability",
           "gateway.operations.base", "gateway.operations.validate",
           "gateway.operations.everything", "gateway.operations.structured",
           "gateway.operations.record", "gateway.profiles.validator")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (REPO / "gateway").rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        # a package's __init__ is run by importing any of its modules
        out[name] = deps
    return out


def cycle_through(g: dict[str, set[str]], start: str) -> list[str] | None:
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(g.get(node, ())):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_request_path_has_no_import_circles() -> None:
    g = graph()
    assert set(WATCHED) <= set(g)
    found = {m: c for m in WATCHED if (c := cycle_through(g, m)) is not None}
    assert found == {}


def test_the_check_finds_a_circle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycle_through(g, "a") == ["a", "b", "c", "a"]
    assert cycle_through({"a": {"b"}, "b": set()}, "a") is None
