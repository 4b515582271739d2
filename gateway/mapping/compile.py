"""Compile a mapping's ``output:`` tree into fast builders: record → plain dict.

This is the outgoing hot path. Everything that can be decided at load time is: which keys
are constants, which expressions read which reference, which converter, transform and code
map apply. The result is a tree of small closures over dict look-ups, each describing itself;
``codegen`` then inlines the tree into one function per mapping (the closures stay the
reference the tests compare it with). No pydantic model is constructed.

Rules (documented for operations staff in mappings/README.md):

* a mapping with a ``column``/``field``/``function`` key is an expression; any other scalar is
  a literal;
* an element whose expressions are all empty is omitted, literals and all;
* lists are lists: each item is an element, or ``each: <child>`` repeats the item once per
  child record (one address per ADDRESSES row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from adapters import dropped
from adapters.base import Layout
from gateway.mapping import codegen
from gateway.mapping.codegen import describe
from gateway.mapping.codemaps import CodeMap, Target
from gateway.mapping.functions import FUNCTIONS
from gateway.mapping.model import EXPR_KEYS, Expr
from gateway.mapping.storage import Storage, text
from gateway.mapping.transforms import TRANSFORMS, chain, compose

Builder = Callable[[Any], Any]


class CompileError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass
class CompileContext:
    codemaps: dict[str, CodeMap]
    storage: Callable[[str], Storage]
    """Storage converter for a source reference (declared in ``types:``; default string)."""
    refs: set[str] = field(default_factory=set)
    children: dict[str, set[str]] = field(default_factory=dict)
    references: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(element path, target resource type, child name or None) for each ``ref:`` expression."""
    prefixed: list[tuple[str, str, str]] = field(default_factory=list)
    """(path of its ``id_prefix`` key, target type, prefix or "") of each ``ref:`` expression:
    the source of the target type it points at (checked against the directory by the loader)."""
    errors: list[CompileError] = field(default_factory=list)
    """Every problem found in an output tree (compile_output raises the first)."""
    _child: str | None = None
    _reads: set[str] = field(default_factory=set)
    """References read by the ``each`` item being compiled (child and parent ones)."""


def compile_expr(expr: Expr, ctx: CompileContext, path: str) -> Builder:
    if expr.sources is not None:
        return _compile_sources(expr, ctx, path)
    if expr.function:
        return _compile_function(expr, ctx, path)
    ref = expr.source_ref
    assert ref is not None
    _use(ctx, ref)
    convert = ctx.storage(ref).to_fhir
    steps: list[Callable[[Any], Any]] = []
    if expr.transform:
        names = [expr.transform] if isinstance(expr.transform, str) else list(expr.transform)
        unknown = [n for n in names if n not in TRANSFORMS]
        if unknown:
            raise CompileError(
                path, f"unknown transform {unknown[0]!r} (one of: {', '.join(TRANSFORMS)})"
            )
        steps.append(chain(names))
    if expr.codemap:
        cmap = ctx.codemaps.get(expr.codemap)
        if cmap is None:
            raise CompileError(path, f"unknown codemap {expr.codemap!r}")
        steps.append(_codemap_step(cmap, expr.part, path))
    if expr.ref:
        # id_prefix: the keys are of that source of the target type (Encounter/ae-5)
        prefix = f"{expr.ref}/{expr.id_prefix or ''}"
        ctx.references.append((path, expr.ref, ctx._child))
        ctx.prefixed.append((f"{path}.id_prefix", expr.ref, expr.id_prefix or ""))
        steps.append(lambda v: prefix + str(v))

    step = compose(steps) if steps else None
    if convert is text:
        # Most reads are of text columns holding str values: those are trimmed here (as
        # storage.text would) rather than through another call.
        if step is None:
            def get_text(rec: dict[str, Any]) -> Any:
                v = rec.get(ref)
                if v.__class__ is str:
                    return v.strip() or None
                return None if v is None else convert(v)

            return describe(get_text, "expr", ref, convert, True, None, path)

        def get_text_step(rec: dict[str, Any]) -> Any:
            v = rec.get(ref)
            if v.__class__ is str:
                v = v.strip()
                return step(v) if v else None
            v = None if v is None else convert(v)
            return None if v is None else step(v)

        return describe(get_text_step, "expr", ref, convert, True, step, path)
    if step is None:
        def get(rec: dict[str, Any]) -> Any:
            v = rec.get(ref)
            return None if v is None else convert(v)

        return describe(get, "expr", ref, convert, False, None, path)

    def get_step(rec: dict[str, Any]) -> Any:
        v = rec.get(ref)
        v = None if v is None else convert(v)
        return None if v is None else step(v)

    return describe(get_step, "expr", ref, convert, False, step, path)


SEVERAL_REFERENCES = "several reference columns hold a value; the first is served"  # a label: <= 64


def _compile_sources(expr: Expr, ctx: CompileContext, path: str) -> Builder:
    """A reference from the first of several columns with a value, each holding keys of one
    source of the target type. A record holding more than one is a data fault: the first is
    served and the others are counted (adapters.dropped), never silently lost."""
    assert expr.sources is not None and expr.ref is not None
    built = []
    for i, s in enumerate(expr.sources):
        built.append(compile_expr(Expr(column=s.column, ref=expr.ref, id_prefix=s.id_prefix),
                                  ctx, path))
        ctx.prefixed[-1] = (f"{path}.sources[{i}].id_prefix", expr.ref, s.id_prefix or "")
    fns = tuple(built)

    def several() -> None:
        dropped.note(path, SEVERAL_REFERENCES)

    def first(rec: dict[str, Any]) -> Any:
        found = None
        for fn in fns:
            v = fn(rec)
            if v is not None:
                if found is None:
                    found = v
                else:
                    several()
        return found

    return describe(first, "first", fns, several)


def _codemap_step(cmap: CodeMap, part: str, path: str) -> Callable[[Any], Any]:
    system = cmap.target_system
    if part in ("system", "coding", "codeable-concept") and not system:
        raise CompileError(path, f"codemap {cmap.name!r} declares no target_system")
    # Built once per target; resources are never mutated after building, so the same small
    # dict can be shared by every resource that carries this code.
    built: dict[Target, Any] = {}

    def result(t: Target) -> Any:
        out = built.get(t)
        if out is None:
            if part == "system":
                out = system
            elif part == "display":
                out = t.display
            elif part in ("coding", "codeable-concept"):
                c: dict[str, Any] = {"system": system, "code": t.code}
                if t.display:
                    c["display"] = t.display
                out = {"coding": [c]} if part == "codeable-concept" else c
            else:
                out = t.code
            built[t] = out
        return out

    # The answer for every listed local code, looked up by the key CodeMap.lookup uses; any
    # other value goes through lookup for its unmapped policy (default, error or omit+log).
    listed = {local: result(t) for local, t in cmap.entries.items()}

    def step(v: Any) -> Any:
        out = listed.get((v if v.__class__ is str else str(v)).strip())
        if out is not None:
            return out
        t = cmap.lookup(v)
        return None if t is None else result(t)

    return step


def _compile_function(expr: Expr, ctx: CompileContext, path: str) -> Builder:
    assert expr.function is not None
    refs = list(expr.args)
    for r in refs:  # recorded first: a misspelt function must not make its columns look unused
        _use(ctx, r)
    fn = FUNCTIONS.get(expr.function)
    if fn is None:
        raise CompileError(
            path, f"unknown function {expr.function!r} (one of: {', '.join(FUNCTIONS)})"
        )
    converters = [ctx.storage(r).to_fhir for r in refs]

    def call(rec: dict[str, Any]) -> Any:
        args = []
        for r, conv in zip(refs, converters, strict=True):
            v = rec.get(r)
            args.append(None if v is None else conv(v))
        return fn(*args)

    return describe(call, "call", fn, tuple(refs), tuple(converters), path)


def _use(ctx: CompileContext, ref: str) -> None:
    if ctx._child is None:
        ctx.refs.add(ref)
    else:
        ctx.children[ctx._child].add(ref)
        ctx._reads.add(ref)


def compile_node(node: Any, ctx: CompileContext, path: str) -> tuple[Builder | None, Any]:
    """Return (builder, None) for a dynamic node or (None, constant) for a static one."""
    if isinstance(node, dict):
        # transform/codemap without column/field/function: a mistyped expression, not a literal
        if EXPR_KEYS & node.keys() or {"transform", "codemap"} & node.keys():
            try:
                expr = Expr.model_validate(node)
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                msg = ("unknown key" if err["type"] == "extra_forbidden"
                       else err["msg"].removeprefix("Value error, "))
                raise CompileError(path + (f".{loc}" if loc else ""), msg) from None
            return compile_expr(expr, ctx, path), None
        if "each" in node:
            raise CompileError(path, "'each' may only appear on an item of a list")
        if REQUIRES in node:
            return _compile_requires(node, ctx, path)
        return _compile_dict(node, ctx, path)
    if isinstance(node, list):
        return _compile_list(node, ctx, path)
    if node is None:
        raise CompileError(path, "an empty value; remove the key or give it a value")
    return None, node


REQUIRES = "requires"
"""An element's own keys that must have a value for it to be output (a Quantity's ``value``:
a unit with no number is no measurement). Not a FHIR element name at any level."""


def _compile_requires(
    node: dict[str, Any], ctx: CompileContext, path: str
) -> tuple[Builder | None, Any]:
    keys = node[REQUIRES]
    keys = [keys] if isinstance(keys, str) else keys
    rest = {k: v for k, v in node.items() if k != REQUIRES}
    if (not isinstance(keys, list) or not keys
            or not all(isinstance(k, str) and k in rest for k in keys)):
        raise CompileError(f"{path}.{REQUIRES}" if path else REQUIRES,
                           "names keys of this element (a key or a list of keys)")
    fn, _ = _compile_dict(rest, ctx, path)
    static = [k for k in keys if not _is_dynamic(rest[k])]
    if fn is None or static:
        raise CompileError(f"{path}.{REQUIRES}" if path else REQUIRES,
                           f"{(static or keys)[0]!r} is a literal: it always has a value")
    inner = fn
    needed = tuple(keys)

    def build_requires(rec: dict[str, Any]) -> Any:
        v = inner(rec)
        if v is None:
            return None
        for key in needed:
            if key not in v:
                return None
        return v

    return describe(build_requires, "requires", inner, needed), None


def _is_dynamic(node: Any) -> bool:
    if isinstance(node, dict):
        return bool(EXPR_KEYS & node.keys()) or any(_is_dynamic(v) for v in node.values())
    if isinstance(node, list):
        return any(_is_dynamic(v) for v in node)
    return False


def _compile_dict(
    node: dict[str, Any], ctx: CompileContext, path: str
) -> tuple[Builder | None, Any]:
    items: list[tuple[str, Builder | None, Any]] = []
    for key, value in node.items():
        try:
            fn, const = compile_node(value, ctx, f"{path}.{key}" if path else key)
        except CompileError as exc:  # keep going: report every problem at once
            ctx.errors.append(exc)
            fn, const = None, None
        items.append((key, fn, const))
    if all(fn is None for _, fn, _ in items):
        return None, {k: c for k, _, c in items}
    first_dynamic = next(i for i, (_, fn, _) in enumerate(items) if fn is not None)
    if all(fn is not None for _, fn, _ in items[first_dynamic:]):
        # Literals (if any) before expressions, as nearly every element is written: a copy
        # of the literals when the first expression has a value keeps the key order, and
        # nothing at all is built for an element that turns out empty.
        literals = {k: c for k, _, c in items[:first_dynamic]}
        exprs = [(k, fn) for k, fn, _ in items[first_dynamic:] if fn is not None]

        def build_tail(rec: dict[str, Any]) -> Any:
            out = None
            for key, fn in exprs:
                v = fn(rec)
                if v is not None:
                    if out is None:
                        out = literals.copy()
                    out[key] = v
            return out

        return describe(build_tail, "tail", literals, exprs), None

    def build(rec: dict[str, Any]) -> Any:
        out: dict[str, Any] = {}
        hit = False
        for key, fn, const in items:
            if fn is None:
                out[key] = const
            else:
                v = fn(rec)
                if v is not None:
                    out[key] = v
                    hit = True
        return out if hit else None

    return describe(build, "dict", items), None


def _compile_list(node: list[Any], ctx: CompileContext, path: str) -> tuple[Builder | None, Any]:
    # (None, None, literal) | (None, builder, None) | ("@child", builder, references read)
    parts: list[tuple[str | None, Builder | None, Any]] = []
    for i, item in enumerate(node):
        ipath = f"{path}[{i}]"
        if isinstance(item, dict) and "each" in item:
            child = item["each"]
            if not isinstance(child, str):
                raise CompileError(ipath + ".each", "names a child (a string)")
            if ctx._child is not None:
                raise CompileError(ipath + ".each", "children cannot be nested")
            item = {k: v for k, v in item.items() if k != "each"}
            ctx.children.setdefault(child, set())
            ctx._child, ctx._reads = child, set()
            try:
                fn, const = compile_node(item, ctx, ipath)
            finally:
                ctx._child = None
            if fn is None:
                raise CompileError(ipath, "an 'each' item must read something from the child")
            parts.append(("@" + child, fn, frozenset(ctx._reads)))
            continue
        fn, const = compile_node(item, ctx, ipath)
        parts.append((None, fn, const))
    if all(fn is None for _, fn, _ in parts):
        return None, [c for _, _, c in parts]

    # An 'each' item sees the child row's values over the parent record's ({**rec, **row});
    # when the row holds every reference the item reads (so unless it reads a parent column) it
    # gives the same values alone, without a copy of the record for every row.
    each_key, each_fn, reads = parts[0]
    if len(parts) == 1 and each_key is not None and each_fn is not None:
        # one item per child row (addresses)
        def build_each(rec: dict[str, Any]) -> Any:
            out = []
            for row in rec.get(each_key) or ():
                v = each_fn(row if row.keys() >= reads else {**rec, **row})
                if v is not None:
                    out.append(v)
            return out or None

        return describe(build_each, "each", each_key, each_fn, reads), None
    if all(key is None and fn is not None for key, fn, _ in parts):
        fns = [fn for _, fn, _ in parts if fn is not None]

        def build_items(rec: dict[str, Any]) -> Any:
            out = []
            for fn in fns:
                v = fn(rec)
                if v is not None:
                    out.append(v)
            return out or None

        return describe(build_items, "items", fns), None

    def build(rec: dict[str, Any]) -> Any:
        out: list[Any] = []
        for key, fn, const in parts:
            if fn is None:
                out.append(const)
            elif key is None:
                v = fn(rec)
                if v is not None:
                    out.append(v)
            else:
                for row in rec.get(key) or ():
                    v = fn(row if row.keys() >= const else {**rec, **row})
                    if v is not None:
                        out.append(v)
        return out or None

    return describe(build, "list", parts), None


GENERATE = True
"""Inline the closures into one function (codegen); False keeps the closures (tests run the
compiler's rules both ways)."""


Compiled = tuple[Builder | None, Any]
"""An output tree compiled to closures: (builder, None), or (None, the constant output)."""


def compile_output(
    output: dict[str, Any], ctx: CompileContext, layout: Layout | None = None
) -> Callable[[Any], dict[str, Any]]:
    """The builder for an output tree, reading dict records (or tuples in ``layout``)."""
    return finish_output(compile_tree(output, ctx), layout)


def compile_tree(output: dict[str, Any], ctx: CompileContext) -> Compiled:
    compiled = _compile_dict(output, ctx, "")
    if ctx.errors:
        raise ctx.errors[0]
    return compiled


def finish_output(compiled: Compiled, layout: Layout | None = None
                  ) -> Callable[[Any], dict[str, Any]]:
    """One function for the tree (or its closures, with ``GENERATE`` off), for records in
    ``layout`` when one is given. Raises codegen.LayoutError for a reference outside it."""
    fn, const = compiled
    if fn is None:
        return lambda rec: dict(const)
    if GENERATE:
        generated, _source = codegen.generate(fn, or_empty=True, layout=layout)
        return generated
    build = fn
    if layout is not None:
        as_dict = layout.as_dict
        return lambda rec: build(as_dict(rec)) or {}
    return lambda rec: build(rec) or {}


def finish_expr(fn: Builder, layout: Layout | None) -> Builder:
    """A single expression (an id, a last-updated time) for records in ``layout``."""
    if layout is None:
        return fn
    if GENERATE:
        return codegen.generate(fn, layout=layout)[0]
    as_dict = layout.as_dict
    return lambda rec: fn(as_dict(rec))
