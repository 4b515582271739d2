"""STU3 XML element order: children must appear in the order the type defines them.

JSON has no order, but FHIR XML does ("elements SHALL appear in the order defined", FHIR
XML §1.17). The models' XML reader accepts any order, so a body is checked against each
type's element sequence (``elements_sequence()``) while the XML tree and the parsed model are
walked together — the model says which type every child element is.
"""

from __future__ import annotations

from typing import Any

from lxml import etree
from pydantic import BaseModel

FHIR_NS = "http://hl7.org/fhir"


def _children(node: Any) -> list[Any]:
    return [c for c in node if isinstance(c.tag, str)]  # not comments or processing instructions


def _name(node: Any) -> str:
    return str(etree.QName(node).localname)


def order_problems(root: Any, model: BaseModel, path: str) -> list[tuple[str, str]]:
    """(path, message) for every element that comes after one it must precede."""
    problems: list[tuple[str, str]] = []
    _walk(root, model, path, problems)
    return problems


def _walk(node: Any, model: BaseModel, path: str, problems: list[tuple[str, str]]) -> None:
    sequence = getattr(type(model), "elements_sequence", None)
    if sequence is None:
        return
    order = {name: i for i, name in enumerate(sequence())}
    last, last_name = -1, ""
    seen: dict[str, int] = {}
    for child in _children(node):
        if etree.QName(child).namespace not in (FHIR_NS, None):
            continue  # narrative xhtml
        name = _name(child)
        index = order.get(name)
        if index is None:
            continue  # unknown elements are the model's to report
        if index < last:
            problems.append((f"{path}.{name}", f"XML element order: {name} must come before "
                             f"{last_name} (STU3 XML keeps the order the type defines)"))
        elif index > last:
            last, last_name = index, name
        position = seen.get(name, 0)
        seen[name] = position + 1
        value = getattr(model, name, None)
        if isinstance(value, list):
            value = value[position] if position < len(value) else None
            where = f"{path}.{name}[{position}]"
        else:
            where = f"{path}.{name}"
        if isinstance(value, BaseModel):
            if name == "contained" or _is_resource_wrapper(child, value):
                inner = _children(child)
                if inner:
                    _walk(inner[0], value, where, problems)
            else:
                _walk(child, value, where, problems)


def _is_resource_wrapper(node: Any, value: BaseModel) -> bool:
    """``<resource><Patient>...</Patient></resource>`` (Bundle entries, Parameters)."""
    inner = _children(node)
    get_type = getattr(type(value), "get_resource_type", None)
    resource_type = get_type() if get_type is not None else None
    return len(inner) == 1 and resource_type is not None and _name(inner[0]) == resource_type
