"""YAML loading that remembers line numbers, so every mapping error can name file:line.

PyYAML silently keeps the last of two equal keys; here a duplicate key is an error, because
in a mapping file it is almost always a copy-paste mistake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class LineDict(dict[str, Any]):
    line: int = 0
    key_lines: dict[str, int]


class LineList(list[Any]):
    line: int = 0
    item_lines: list[int]


class YamlError(Exception):
    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, bool):
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key_node.value!r} reads as a boolean in YAML; quote it",
                key_node.start_mark)
        if not isinstance(key, str):
            if str(key) != key_node.value:  # 01 is the integer 1 in YAML 1.1: "01" is lost
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} reads as {key!r} in YAML; quote it",
                    key_node.start_mark)
            key = str(key)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlError(path, 0, f"cannot read: {exc}") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise YamlError(path, line, str(exc.problem or exc)) from None
    except yaml.YAMLError as exc:
        raise YamlError(path, 0, str(exc)) from None


def line_of(doc: Any, loc: tuple[Any, ...] | list[Any]) -> int:
    """The line of the deepest node along ``loc`` (a pydantic error location or a dotted path)."""
    line = getattr(doc, "line", 0)
    node = doc
    for part in loc:
        if isinstance(node, LineDict) and isinstance(part, str) and part in node:
            line = node.key_lines.get(part, line)
            node = node[part]
        elif isinstance(node, LineList) and isinstance(part, int) and 0 <= part < len(node):
            line = node.item_lines[part]
            node = node[part]
        else:
            break
    return line


def split_path(path: str) -> list[Any]:
    """``output.name[0].given`` → ['output', 'name', 0, 'given']."""
    out: list[Any] = []
    for segment in path.replace("]", "").split("."):
        if not segment:
            continue
        head, *indexes = segment.split("[")
        if head:
            out.append(head)
        out.extend(int(i) for i in indexes if i.isdigit())
    return out


def line_of_dotted(doc: Any, dotted: str) -> int:
    """Like ``line_of`` for a dotted path whose keys may contain dots (``types.p.SURNAME``)."""
    line = getattr(doc, "line", 0)
    node, parts = doc, split_path(dotted)
    while parts:
        if isinstance(node, LineList) and isinstance(parts[0], int) and parts[0] < len(node):
            line, node, parts = node.item_lines[parts[0]], node[parts[0]], parts[1:]
            continue
        if not isinstance(node, LineDict):
            break
        for n in range(len(parts), 0, -1):
            key = ".".join(str(p) for p in parts[:n])
            if key in node:
                line, node, parts = node.key_lines.get(key, line), node[key], parts[n:]
                break
        else:
            break
    return line


def line_of_value(doc: Any, value: str) -> int | None:
    """The line of the first key or scalar equal to ``value``, in document order."""
    if isinstance(doc, LineDict):
        for key, v in doc.items():
            if value in (key, v):
                return doc.key_lines.get(key, doc.line)
            found = line_of_value(v, value)
            if found:
                return found
    elif isinstance(doc, LineList):
        for i, v in enumerate(doc):
            if v == value:
                return doc.item_lines[i]
            found = line_of_value(v, value)
            if found:
                return found
    return None
