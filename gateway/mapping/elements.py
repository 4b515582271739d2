"""Which elements of a resource a source field or column feeds, from a mapping's ``output``
tree: how a backend's complaint about ``PID-7`` becomes ``Patient.birthDate`` for the client.

Paths carry no list indices (``Patient.generalPractitioner.identifier.value``): the mapping's
n-th item is not the n-th item of the resource a client sent, and FHIRPath without an index
names them all.
"""

from __future__ import annotations

from typing import Any

from gateway.mapping.model import EXPR_KEYS


def element_paths(output: dict[str, Any], resource_type: str, source: str) -> list[str]:
    """The paths of the elements ``source`` feeds, in output order: ``PID-3`` matches the
    expressions reading ``PID-3`` and its components (``PID-3.1``), never ``PID-30``."""
    found: list[str] = []

    def hit(ref: Any) -> bool:
        return isinstance(ref, str) and (ref == source or ref.startswith(source + "."))

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict) and EXPR_KEYS & node.keys():
            refs = [node.get("field"), node.get("column"), *(node.get("args") or [])]
            refs += [s.get("column") for s in node.get("sources") or [] if isinstance(s, dict)]
            if any(hit(r) for r in refs) and path not in found:
                found.append(path)
            return
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "each":
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(output, resource_type)
    return found
