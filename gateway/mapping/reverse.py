"""Read a mapping's ``output:`` tree in reverse: FHIR resource → source record, for writes.

The same declarations serve both directions, so one file describes both ways. Each
expression is inverted step by step (reference prefix, code map, transform, storage type);
list items are matched to template items by their literals (``system``, ``use``, ``url``)
and by the reference types they accept; ``each:`` items become child records.

Nothing is dropped silently: every element of the input that no declaration consumed is
reported, so a client learns that ``Patient.photo`` cannot be stored rather than losing it.
Functions are read-only and are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from gateway.mapping.codemaps import CodeMap
from gateway.mapping.functions import INVERSES
from gateway.mapping.model import EXPR_KEYS, Expr
from gateway.mapping.storage import Storage, from_fhir
from gateway.mapping.transforms import inverse_chain

# Elements a write may carry that are about the resource, not the record.
IGNORED_TOP_LEVEL = frozenset({"resourceType", "id", "meta", "text", "implicitRules", "language"})

Record = dict[str, Any]


class ReverseError(Exception):
    """The input cannot be written through this mapping (→ 422). Names paths, never values."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


class _Mismatch(Exception):
    """This template item does not describe that input item: try the next one."""


@dataclass
class _State:
    record: Record
    consumed: set[str] = field(default_factory=set)
    problems: list[tuple[str, str]] = field(default_factory=list)


Reader = Callable[[Any, Record, _State, str], None]


@dataclass
class ReverseContext:
    codemaps: dict[str, CodeMap]
    storage: Callable[[str], Storage]
    tz: ZoneInfo


def compile_reverse(output: dict[str, Any], ctx: ReverseContext, resource_type: str
                    ) -> Callable[[dict[str, Any]], Record]:
    reader = _node(output, ctx)

    def read(resource: dict[str, Any]) -> Record:
        state = _State(record={})
        body = {k: v for k, v in resource.items() if k not in IGNORED_TOP_LEVEL}
        try:
            reader(body, state.record, state, resource_type)
        except _Mismatch as exc:
            state.problems.append((resource_type, str(exc) or "does not match the mapping"))
        for path in sorted(_leaves(body, resource_type) - state.consumed):
            state.problems.append((path, "this element cannot be stored by this source"))
        if state.problems:
            raise ReverseError(state.problems)
        return state.record

    return read


def _leaves(value: Any, path: str) -> set[str]:
    if isinstance(value, dict):
        out: set[str] = set()
        for k, v in value.items():
            out |= _leaves(v, f"{path}.{k}")
        return out
    if isinstance(value, list):
        out = set()
        for i, v in enumerate(value):
            out |= _leaves(v, f"{path}[{i}]")
        return out
    return {path}


def _consume_all(value: Any, state: _State, path: str) -> None:
    state.consumed |= _leaves(value, path)


def _node(node: Any, ctx: ReverseContext) -> Reader:
    if isinstance(node, dict) and EXPR_KEYS & node.keys():
        return _expr(Expr.model_validate(node), ctx)
    if isinstance(node, dict):
        return _dict(node, ctx)
    if isinstance(node, list):
        return _list(node, ctx)
    return _literal(node)


def _literal(expected: Any) -> Reader:
    def read(value: Any, record: Record, state: _State, path: str) -> None:
        if value != expected:
            raise _Mismatch(f"expected {expected!r}")
        state.consumed.add(path)

    return read


def _expr(expr: Expr, ctx: ReverseContext) -> Reader:
    if expr.function:
        inverse = INVERSES.get(expr.function)
        refs = [a if isinstance(a, str) else str(a) for a in (expr.args or [])]

        def skip(value: Any, record: Record, state: _State, path: str) -> None:
            _consume_all(value, state, path)  # derived by the source; nothing to store
            if inverse is not None:  # ... unless the value says something the source keeps
                for ref, stored in inverse(value, *refs).items():
                    record.setdefault(ref, stored)

        return skip
    if expr.sources is not None:
        return _sources(expr, ctx)
    ref = expr.source_ref
    assert ref is not None
    storage = ctx.storage(ref)
    invert = inverse_chain(
        [expr.transform] if isinstance(expr.transform, str) else list(expr.transform or [])
    )
    cmap = ctx.codemaps.get(expr.codemap) if expr.codemap else None
    prefix = f"{expr.ref}/{expr.id_prefix or ''}" if expr.ref else None

    def read(value: Any, record: Record, state: _State, path: str) -> None:
        v = value
        if prefix is not None:
            if not isinstance(v, str) or not v.startswith(prefix):
                raise _Mismatch(f"expected a reference to {expr.ref}")
            v = v[len(prefix):]
        if cmap is not None:
            if expr.part in ("display", "system"):
                _consume_all(value, state, path)
                return
            v = _local_code(cmap, expr.part, v, state, path)
            if v is None:
                _consume_all(value, state, path)
                return
        v = invert(v)
        try:
            stored = from_fhir(storage, v, ctx.tz)
        except (TypeError, ValueError):
            state.problems.append((path, "value has the wrong form for this source"))
            return
        _consume_all(value, state, path)
        if stored is not None and ref not in record:
            record[ref] = stored

    return read


def _sources(expr: Expr, ctx: ReverseContext) -> Reader:
    """A reference from one of several columns: stored in the column of the source whose
    id prefix the reference carries (the longest that matches)."""
    assert expr.ref is not None and expr.sources is not None
    readers = sorted(((f"{expr.ref}/{s.id_prefix or ''}",
                       _expr(Expr(column=s.column, ref=expr.ref, id_prefix=s.id_prefix), ctx))
                      for s in expr.sources), key=lambda pr: -len(pr[0]))

    def read(value: Any, record: Record, state: _State, path: str) -> None:
        for prefix, reader in readers:
            if isinstance(value, str) and value.startswith(prefix):
                reader(value, record, state, path)
                return
        raise _Mismatch(f"expected a reference to {expr.ref}")

    return read


def _local_code(cmap: CodeMap, part: str, value: Any, state: _State, path: str) -> Any:
    code: Any = value
    if part == "coding":
        if not isinstance(value, dict) or value.get("system") != cmap.target_system:
            raise _Mismatch(f"expected a coding from {cmap.target_system}")
        code = value.get("code")
    elif part == "codeable-concept":
        codings = value.get("coding") if isinstance(value, dict) else None
        match = [c for c in codings or [] if isinstance(c, dict)
                 and c.get("system") == cmap.target_system]
        if not match:
            state.problems.append((path, f"needs a coding from {cmap.target_system}"))
            return None
        code = match[0].get("code")
    local = cmap.local_codes(str(code)) if code is not None else ()
    if not local:
        state.problems.append((path, f"code {code!r} has no local code in code map "
                                     f"'{cmap.name}'"))
        return None
    return local[0]


def _dict(node: dict[str, Any], ctx: ReverseContext) -> Reader:
    node = {k: v for k, v in node.items() if k != "requires"}  # an output-only guard
    readers = {k: _node(v, ctx) for k, v in node.items()}
    literal_keys = {k for k, v in node.items() if not isinstance(v, dict | list)}

    def read(value: Any, record: Record, state: _State, path: str) -> None:
        if not isinstance(value, dict):
            raise _Mismatch("expected an element with children")
        for key in literal_keys:  # discriminators first: a mismatch must not half-write
            if key not in value:
                raise _Mismatch(f"{key} is required here")
            readers[key](value[key], record, state, f"{path}.{key}")
        for key, sub in value.items():
            if key in readers and key not in literal_keys:
                readers[key](sub, record, state, f"{path}.{key}")

    return read


def _list(node: list[Any], ctx: ReverseContext) -> Reader:
    items: list[tuple[str | None, Reader, bool]] = []
    for item in node:
        child = None
        if isinstance(item, dict) and "each" in item:
            child = item["each"]
            item = {k: v for k, v in item.items() if k != "each"}
        scalar = not isinstance(item, dict | list) or bool(
            isinstance(item, dict) and EXPR_KEYS & item.keys())
        items.append((child, _node(item, ctx), scalar))

    def read(value: Any, record: Record, state: _State, path: str) -> None:
        values = value if isinstance(value, list) else [value]
        used: set[int] = set()  # non-repeating template items take one input item each
        scalar_slots = [i for i, (c, _, s) in enumerate(items) if s and c is None]
        for n, v in enumerate(values):
            ipath = f"{path}[{n}]" if isinstance(value, list) else path
            if not isinstance(v, dict) and scalar_slots:
                slot = scalar_slots.pop(0)
                items[slot][1](v, record, state, ipath)
                continue
            for i, (child, reader, _) in enumerate(items):
                if child is None and i in used:
                    continue
                target: Record = {}  # tried apart, so a mismatch leaves nothing behind
                trial = _State(record=target)
                try:
                    reader(v, target, trial, ipath)
                except _Mismatch:
                    continue
                if child is not None:
                    record.setdefault("@" + child, []).append(target)
                else:
                    used.add(i)
                    for key, val in target.items():
                        record.setdefault(key, val)
                state.consumed |= trial.consumed
                state.problems += trial.problems
                break

    return read
