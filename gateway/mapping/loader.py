"""Load a mapping directory: connections, code maps and one file per resource per source.

Everything is checked at load time and every problem is reported at once, each naming
``file:line`` and what is wrong. The server refuses to start on a bad mapping;
``careconnect-gateway mappings check DIR`` runs the same checks without starting it.

Layout of a mapping directory::

    connections.yaml        named connections (secrets come from the environment)
    <Type>.<source>.yaml    one per resource type per source, e.g. Patient.sql.yaml
    messaging.yaml          FHIR messaging events (gateway.messaging), if any
    operations/, documents/ declared extracts and documents (gateway.operations)
    ../codemaps/*.yaml      shared code maps (path configurable in connections.yaml)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ValidationError

from adapters.base import Adapter, Needs, SourceConfigError
from gateway.mapping.codegen import LayoutError
from gateway.mapping.codemaps import CodeMap, Target
from gateway.mapping.compile import (
    CompileContext,
    CompileError,
    compile_expr,
    compile_tree,
    finish_expr,
    finish_output,
)
from gateway.mapping.model import Connection, MappingFile, MappingSet
from gateway.mapping.storage import Storage, make_storage
from gateway.mapping.yamlfile import (
    YamlError,
    line_of,
    line_of_dotted,
    line_of_value,
    load,
    split_path,
)

CONNECTIONS_FILE = "connections.yaml"
ROLE_FILES = frozenset({CONNECTIONS_FILE, "messaging.yaml"})
"""Files beside the mappings that are not mappings (messaging.yaml: gateway.messaging)."""
_PASSWORD_IN_URL = re.compile(r"://[^/@:]+:[^/@]+@")


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class MappingError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass
class CompiledMapping:
    file: Path
    spec: MappingFile
    connection: str
    adapter: Adapter
    prepared: Any
    build: Callable[[Any], dict[str, Any]]
    """Record → resource body; records are dicts, or tuples in ``adapter.layout(prepared)``."""
    build_id: Callable[[Any], Any]
    build_last_updated: Callable[[Any], Any] | None
    storage: Callable[[str], Storage]
    codemaps: dict[str, CodeMap]
    tz: ZoneInfo
    references: list[tuple[str, str, str | None]] = field(default_factory=list)
    prefixed: list[tuple[str, str, str]] = field(default_factory=list)
    """Output references and the source of their target each points at (CompileContext)."""

    @property
    def resource_type(self) -> str:
        return self.spec.resource


AdapterFactory = Callable[[str, Connection, Path], Adapter]


@dataclass
class LoadedSet:
    directory: Path
    mappings: list[CompiledMapping]
    adapters: dict[str, Adapter]
    codemaps: dict[str, CodeMap]
    settings: MappingSet


def _validation_problems(path: Path, doc: Any, exc: ValidationError, prefix: tuple[Any, ...] = ()
                         ) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        line = line_of(doc, loc)
        if not err["loc"] and ": " in msg:  # a whole-file check naming the key it is about
            where, msg = msg.split(": ", 1)
            line = line_of_dotted(doc, where)
        out.append(Problem(path, line, f"{where}: {msg}"))
    return out


_M = TypeVar("_M", bound=BaseModel)


def read_model(path: Path, model: type[_M], problems: list[Problem]) -> tuple[Any, _M] | None:
    """The YAML file at ``path`` (as loaded, for ``line_of``) and ``model`` made of it; None
    when it does not read or does not validate, every problem (file:line) in ``problems``."""
    try:
        doc = load(path)
    except YamlError as exc:
        problems.append(Problem(path, exc.line, exc.message))
        return None
    if not isinstance(doc, dict):
        problems.append(Problem(path, getattr(doc, "line", 1), "expected a mapping of keys"))
        return None
    try:
        return doc, model.model_validate(doc)
    except ValidationError as exc:
        problems.extend(_validation_problems(path, doc, exc))
        return None


def load_codemaps(directory: Path, problems: list[Problem]) -> dict[str, CodeMap]:
    out: dict[str, CodeMap] = {}
    if not directory.is_dir():
        problems.append(Problem(directory, 0, "code map directory not found"))
        return out
    for path in sorted(directory.glob("*.yaml")):
        found = read_model(path, _CodeMapFile, problems)
        if found is None:
            continue
        doc, spec = found
        if spec.name in out:
            problems.append(Problem(path, line_of(doc, ["name"]),
                                    f"code map name {spec.name!r} is used twice"))
            continue
        if spec.unmapped == "default" and spec.default is None:
            problems.append(Problem(path, line_of(doc, ["unmapped"]),
                                    "unmapped: default needs a default"))
            continue
        out[spec.name] = CodeMap(
            name=spec.name,
            target_system=spec.target_system,
            unmapped=spec.unmapped,
            entries={str(k): Target(v.code, v.display) for k, v in spec.map.items()
                     if v is not None},
            no_target=frozenset(str(k) for k, v in spec.map.items() if v is None),
            default=Target(spec.default.code, spec.default.display) if spec.default else None,
            source=spec.source or "",
            source_system=spec.source_system,
            description=spec.description or "",
        )
    return out


class _TargetSpec(BaseModel):
    model_config = {"extra": "forbid"}
    code: str
    display: str | None = None


class _CodeMapFile(BaseModel):
    model_config = {"extra": "forbid"}
    name: str
    source: str | None = None
    description: str | None = None
    source_system: str | None = None
    """The local codes' system URI, where they have one (the ConceptMap's group.source)."""
    target_system: str | None = None
    unmapped: Literal["omit", "default", "error"] = "omit"
    default: _TargetSpec | None = None
    map: dict[str, _TargetSpec | None]
    """``CODE: null`` lists a local code that deliberately has no target (omitted, not logged)."""


def resolve_url(name: str, conn: Connection, demo_url: Callable[[], str] | None,
                overrides: dict[str, str] | None = None) -> str:
    if overrides and name in overrides:
        return overrides[name]
    if conn.url_env and os.environ.get(conn.url_env):
        return os.environ[conn.url_env]
    if conn.url:
        return conn.url
    if conn.default == "embedded-demo" and demo_url is not None:
        return demo_url()
    raise ValueError(
        f"connection '{name}': set the environment variable {conn.url_env}"
        if conn.url_env
        else f"connection '{name}' has no url"
    )


def load_directory(
    directory: Path,
    adapter_factory: AdapterFactory,
    *,
    demo_url: Callable[[], str] | None = None,
    urls: dict[str, str] | None = None,
) -> LoadedSet:
    """Load, check and compile every mapping in ``directory``; raise MappingError on any problem."""
    problems: list[Problem] = []
    directory = directory.resolve()
    conn_path = directory / CONNECTIONS_FILE
    if not conn_path.is_file():
        raise MappingError([Problem(conn_path, 0, "not found (every mapping directory has one)")])
    read = read_model(conn_path, MappingSet, problems)
    if read is None:
        raise MappingError(problems)
    conn_doc, settings = read
    for name, conn in settings.connections.items():
        if conn.url and _PASSWORD_IN_URL.search(conn.url):
            problems.append(Problem(conn_path, line_of(conn_doc, ["connections", name, "url"]),
                                    f"connections.{name}.url: a password in a mapping file; "
                                    "put the URL in the environment variable named by url_env"))
    codemaps = load_codemaps((directory / settings.codemaps).resolve(), problems)

    adapters: dict[str, Adapter] = {}
    tzs: dict[str, ZoneInfo] = {}

    def adapter_for(name: str, path: Path, doc: Any) -> Adapter | None:
        if name in adapters:
            return adapters[name]
        conn = settings.connections.get(name)
        line = line_of(doc, ["source", "connection"])
        if conn is None:
            problems.append(Problem(path, line, f"source.connection: unknown connection {name!r} "
                                    f"(declared: {', '.join(settings.connections) or 'none'})"))
            return None
        try:
            tzs[name] = ZoneInfo(conn.timezone)
            resolved = conn.model_copy(update={"url": resolve_url(name, conn, demo_url, urls)})
            adapters[name] = adapter_factory(name, resolved, directory)
        except ZoneInfoNotFoundError:
            problems.append(Problem(conn_path, line_of(conn_doc, ["connections", name]),
                                    f"connections.{name}.timezone: unknown time zone"))
            return None
        except (ValueError, SourceConfigError) as exc:
            problems.append(Problem(conn_path, line_of(conn_doc, ["connections", name]), str(exc)))
            return None
        return adapters[name]

    compiled: list[CompiledMapping] = []
    seen: dict[str, list[tuple[Path, Any, MappingFile]]] = {}
    files = [p for p in sorted(directory.glob("*.yaml")) if p.name not in ROLE_FILES]
    for i, rel in enumerate(settings.include):
        included = (directory / rel).resolve()
        if not included.is_file():
            problems.append(Problem(conn_path, line_of(conn_doc, ["include", i]),
                                    f"include[{i}]: {rel} not found"))
        else:
            files.append(included)
    for path in files:
        found_file = read_model(path, MappingFile, problems)
        if found_file is None:
            continue
        doc, spec = found_file
        if not _another_source(path, doc, spec, seen.get(spec.resource, []), problems):
            continue
        seen.setdefault(spec.resource, []).append((path, doc, spec))
        conn_name = spec.source.get("connection")
        if not isinstance(conn_name, str):
            problems.append(Problem(path, line_of(doc, ["source"]),
                                    "source.connection: required key is missing"))
            continue
        adapter = adapter_for(conn_name, path, doc)
        if adapter is None:
            continue
        result = _compile(path, doc, spec, conn_name, adapter, codemaps, tzs[conn_name], problems)
        if result is not None:
            compiled.append(result)
    for sources in seen.values():
        _check_unprefixed(sources, problems)
    _check_reference_sources(compiled, seen, problems)
    if problems:  # a broken connection is met once per mapping using it: report it once
        raise MappingError(list(dict.fromkeys(problems)))
    return LoadedSet(directory, compiled, adapters, codemaps, settings)


def _another_source(path: Path, doc: Any, spec: MappingFile,
                    earlier: list[tuple[Path, Any, MappingFile]], problems: list[Problem]
                    ) -> bool:
    """Whether ``spec`` can join the sources already declared for its type.

    Several files may serve one type (inpatient, outpatient and A&E Encounters); their ids
    must stay unique and say which source they come from, so each file but one declares
    its own ``id_prefix``, and no prefix starts another. They share one profile: the
    CapabilityStatement names one per type.
    """
    if not earlier:
        return True
    first = earlier[0][0].name
    mine = spec.id_prefix or ""
    for other_path, _doc, other in earlier:
        theirs = other.id_prefix or ""
        if not mine and not theirs:
            problems.append(Problem(
                path, line_of(doc, ["resource"]),
                f"{spec.resource} is already mapped by {other_path.name}: a second source of "
                "a type needs its own id_prefix (e.g. id_prefix: op-)"))
            return False
        if mine and theirs and (mine.startswith(theirs) or theirs.startswith(mine)):
            problems.append(Problem(
                path, line_of(doc, ["id_prefix"]),
                f"id_prefix: {mine!r} clashes with {theirs!r} of {other_path.name} "
                "(no prefix may start another)"))
            return False
    if spec.profile != earlier[0][2].profile:
        problems.append(Problem(path, line_of(doc, ["profile"]),
                                f"profile: every source of {spec.resource} must declare the "
                                f"same profile as {first}"))
        return False
    return True


def _check_unprefixed(sources: list[tuple[Path, Any, MappingFile]], problems: list[Problem]
                      ) -> None:
    """The one source without a prefix must have keys that can never look prefixed."""
    if len(sources) < 2:
        return
    for path, doc, spec in sources:
        key = spec.id.source_ref
        if not spec.id_prefix and key is not None and spec.types.get(key) != "integer":
            problems.append(Problem(
                path, line_of(doc, ["id"]),
                f"id: {spec.resource} has several sources, so this one needs an id_prefix "
                "unless its key is declared as an integer in types:"))


def _check_reference_sources(compiled: list[CompiledMapping],
                             seen: dict[str, list[tuple[Path, Any, MappingFile]]],
                             problems: list[Problem]) -> None:
    """Every reference points at a source of its target type that exists.

    A reference column holds the keys of one source of its target (``id_prefix`` names it;
    none: the source without a prefix). A prefix no source of the target declares, or a
    prefix on a type this directory does not map, would serve references nothing resolves
    and match searches against the wrong records, so both are refused here. A reference to
    Patient must be to its source without a prefix: the patient compartment compares the
    patient's id with the column as it is.
    """
    docs = {path: doc for sources in seen.values() for path, doc, _spec in sources}
    for m in compiled:
        doc = docs.get(m.file)
        if doc is None:
            continue
        wanted: list[tuple[str, list[Any], str, str]] = [
            (f"output.{at}", ["output", *split_path(at)], target, prefix)
            for at, target, prefix in m.prefixed]
        for name, param in m.spec.search.items():
            if param.type != "reference":
                continue
            if param.sources:
                wanted += [(f"search.{name}.sources[{i}].id_prefix",
                            ["search", name, "sources", i, "id_prefix"], param.target or "",
                            src.id_prefix or "") for i, src in enumerate(param.sources)]
            else:
                wanted += [(f"search.{name}.id_prefix", ["search", name, "id_prefix"],
                            c.target, c.prefix) for c in param.reference_columns()]
        for where, loc, target, prefix in wanted:
            problem = _reference_source_problem(target, prefix, seen.get(target))
            if problem is not None:
                problems.append(Problem(m.file, line_of(doc, loc), f"{where}: {problem}"))


def _reference_source_problem(target: str, prefix: str,
                              sources: list[tuple[Path, Any, MappingFile]] | None) -> str | None:
    if not prefix:  # its source without a prefix (or a type served elsewhere), as ever
        return None
    if not sources:
        return f"{target} is not mapped in this directory, so id_prefix {prefix!r} names no source"
    prefixes = {spec.id_prefix or "": path.name for path, _doc, spec in sources}
    if prefix not in prefixes:
        listed = ", ".join(f"{name} ({p or 'no prefix'})" for p, name in sorted(prefixes.items()))
        return f"{target} has no source with id_prefix {prefix!r} (its sources: {listed})"
    if target == "Patient":
        return ("a reference to Patient must hold the keys of its source without an "
                "id_prefix (the patient compartment compares them as they are)")
    return None


def _semantic_problems(path: Path, doc: Any, spec: MappingFile,
                       storage: Callable[[str], Storage], ctx: CompileContext) -> list[Problem]:
    """Checks across sections that the schema alone cannot make."""
    out: list[Problem] = []
    if spec.id.transform or spec.id.codemap or spec.id.ref or spec.id.function:
        out.append(Problem(path, line_of(doc, ["id"]),
                           "id: reads the record key as it is (no transform, codemap, ref "
                           "or function)"))
    lu = spec.last_updated.source_ref if spec.last_updated is not None else None
    if lu is not None and storage(lu).kind != "datetime":
        out.append(Problem(path, line_of(doc, ["last_updated"]),
                           "last_updated: its column must be declared as a datetime in types:"))
    used = set(ctx.refs) | {r for refs in ctx.children.values() for r in refs}
    used |= {r for p in spec.search.values() for r in p.refs}
    used |= {r for p in spec.search.values() for s in p.systems or () for r in s.when}
    for key in (spec.id, spec.last_updated):
        if key is not None and key.source_ref:
            used.add(key.source_ref)
    for ref in spec.types:
        if ref not in used:
            out.append(Problem(path, line_of(doc, ["types", ref]),
                               f"types.{ref}: declared but not used by the mapping"))
    return out


def _compile(
    path: Path,
    doc: Any,
    spec: MappingFile,
    connection: str,
    adapter: Adapter,
    codemaps: dict[str, CodeMap],
    tz: ZoneInfo,
    problems: list[Problem],
) -> CompiledMapping | None:
    storages = {ref: make_storage(kind, tz) for ref, kind in spec.types.items()}
    default = make_storage("string", tz)

    def storage(ref: str) -> Storage:
        return storages.get(ref, default)

    ctx = CompileContext(codemaps=codemaps, storage=storage)
    before = len(problems)
    try:
        tree = compile_tree(spec.output, ctx)
    except CompileError as exc:
        for err in ctx.errors or [exc]:
            problems.append(Problem(path, line_of(doc, ["output", *split_path(err.path)]),
                                    f"output.{err.path}: {err.message}"))
    try:
        build_id = compile_expr(spec.id, ctx, "id")
        build_lu = (compile_expr(spec.last_updated, ctx, "last_updated")
                    if spec.last_updated else None)
    except CompileError as exc:
        problems.append(Problem(path, line_of(doc, split_path(exc.path)), str(exc)))
    for name, param in spec.search.items():
        if param.codemap and param.codemap not in codemaps:
            problems.append(Problem(path, line_of(doc, ["search", name, "codemap"]),
                                    f"search.{name}.codemap: unknown codemap {param.codemap!r}"))
        for i, system in enumerate(param.systems or ()):
            if system.codemap is None:
                continue
            at = ["search", name, "systems", i, "codemap"]
            cmap = codemaps.get(system.codemap)
            if cmap is None:
                problems.append(Problem(path, line_of(doc, at),
                                        f"search.{name}.systems[{i}].codemap: unknown codemap "
                                        f"{system.codemap!r}"))
            elif cmap.target_system != system.system:
                problems.append(Problem(path, line_of(doc, at),
                                        f"search.{name}.systems[{i}].codemap: {system.codemap!r} "
                                        f"translates into {cmap.target_system!r}, not "
                                        f"{system.system!r}"))
        if param.unit is not None and param.unit.codemap and param.unit.codemap not in codemaps:
            problems.append(Problem(path, line_of(doc, ["search", name, "unit", "codemap"]),
                                    f"search.{name}.unit.codemap: unknown codemap "
                                    f"{param.unit.codemap!r}"))
        if param.type == "date":
            for ref in param.refs:
                if storage(ref).kind not in ("date", "datetime"):
                    problems.append(Problem(
                        path, line_of(doc, ["search", name]),
                        f"search.{name}: {ref} must be declared as a date or datetime in types:",
                    ))
    problems.extend(_semantic_problems(path, doc, spec, storage, ctx))
    if len(problems) > before:
        return None

    key = spec.id.source_ref
    if key is None:
        problems.append(Problem(path, line_of(doc, ["id"]), "id: must read a column or field"))
        return None
    criteria_refs = {r for p in spec.search.values() for r in p.refs}
    criteria_refs |= {r for p in spec.search.values() for s in p.systems or () for r in s.when}
    sort_refs = {spec.search[name].refs[0] for name in spec.sort}
    fields = set(ctx.refs) | {r for refs in ctx.children.values() for r in refs}
    # Reference parameters feed _include: their values must come back with the records.
    for p in spec.search.values():
        if p.type == "reference":
            fields.update(c.ref for c in p.reference_columns())
    needs = Needs(
        key=key,
        fields=frozenset(fields),
        children=frozenset(ctx.children),
        criteria_refs=frozenset(criteria_refs),
        sort_refs=frozenset(sort_refs),
    )
    try:
        prepared = adapter.prepare(dict(spec.source), needs)
    except SourceConfigError as exc:
        parts = split_path(exc.path)
        if not parts or parts[0] in doc["source"]:
            where = f"source.{exc.path}" if parts else "source"
            line = line_of(doc, ["source", *parts])
        elif parts[0] in doc:  # a top-level key the adapter checks (id, sort)
            where, line = exc.path, line_of(doc, parts)
        else:  # a reference or child name the source lacks: where the mapping uses it
            where = "source"
            line = line_of_value(doc, exc.path) or line_of(doc, ["source"])
        problems.append(Problem(path, line, f"{where}: {exc}"))
        return None
    layout = adapter.layout(prepared)
    try:
        build = finish_output(tree, layout)
        build_id = finish_expr(build_id, layout)
        build_lu = finish_expr(build_lu, layout) if build_lu is not None else None
    except LayoutError as exc:  # read where the records do not hold it (another child's)
        problems.append(Problem(path, line_of(doc, ["output", *split_path(exc.path)]),
                                f"output.{exc.path}: {exc}"))
        return None
    return CompiledMapping(
        file=path,
        spec=spec,
        connection=connection,
        adapter=adapter,
        prepared=prepared,
        build=build,
        build_id=build_id,
        build_last_updated=build_lu,
        storage=storage,
        codemaps=codemaps,
        tz=tz,
        references=ctx.references,
        prefixed=ctx.prefixed,
    )
