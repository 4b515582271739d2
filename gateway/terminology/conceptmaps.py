"""ConceptMaps generated from the YAML code maps, and ``$translate`` over them.

One ConceptMap per code map, id = the code map's name, one group: ``source`` is the code map's
``source_system`` (or, for local codes with no published system, ``LOCAL_SYSTEM/<name>``),
``target`` its ``target_system``. Each listed local code is an element; a local code listed
with no target (``CODE: null``) is an element whose target says ``unmatched``. The unmapped
policy is in ``group.unmapped`` where STU3 can say it (``default`` → mode ``fixed`` with the
default code) and always in the extension ``UNMAPPED_POLICY`` (omit | default | error).

Equivalence: ``equivalent`` where the target code is reached from one local code only,
``wider`` where several local codes share it (the target is wider than each of them).

``$translate`` forward (local → target) gives at most one match. Reverse (``reverse=true``,
target → local) is ambiguous where several local codes share a target: every one of them is
returned as a match (equivalence ``narrower``), ``result`` is true and ``message`` says the
answer is ambiguous — the same set a token search on that code searches for.
"""

from __future__ import annotations

from typing import Any

from gateway.mapping.codemaps import CodeMap

LOCAL_SYSTEM = "https://careconnect-gateway.github.io/fhir/CodeSystem/local"
UNMAPPED_POLICY = ("https://careconnect-gateway.github.io/fhir/StructureDefinition/"
                   "codemap-unmapped-policy")


def source_system(cmap: CodeMap) -> str:
    return cmap.source_system or f"{LOCAL_SYSTEM}/{cmap.name}"


def url(cmap: CodeMap, base_url: str) -> str:
    return f"{base_url}/ConceptMap/{cmap.name}"


def _policy_text(cmap: CodeMap) -> str:
    return {"omit": "a local code not listed is left out of the resource",
            "default": "a local code not listed is given the default target",
            "error": "a record carrying a local code not listed fails (UNMAPPED_SOURCE_CODE)",
            }[cmap.unmapped]


def concept_map(cmap: CodeMap, base_url: str) -> dict[str, Any]:
    shared = _shared_targets(cmap)
    elements: list[dict[str, Any]] = []
    for local, target in cmap.entries.items():
        t: dict[str, Any] = {"code": target.code}
        if target.display:
            t["display"] = target.display
        t["equivalence"] = "wider" if shared.get(target.code, 0) > 1 else "equivalent"
        elements.append({"code": local, "target": [t]})
    for local in sorted(cmap.no_target):
        elements.append({"code": local, "target": [{
            "equivalence": "unmatched",
            "comment": "listed in the code map with no target: deliberately left out"}]})
    group: dict[str, Any] = {
        "extension": [{"url": UNMAPPED_POLICY, "valueCode": cmap.unmapped}],
        "source": source_system(cmap),
    }
    if cmap.target_system:
        group["target"] = cmap.target_system
    group["element"] = elements
    if cmap.unmapped == "default" and cmap.default is not None:
        unmapped: dict[str, Any] = {"mode": "fixed", "code": cmap.default.code}
        if cmap.default.display:
            unmapped["display"] = cmap.default.display
        group["unmapped"] = unmapped
    description = cmap.description or cmap.source
    out: dict[str, Any] = {
        "resourceType": "ConceptMap",
        "id": cmap.name,
        "url": url(cmap, base_url),
        "name": cmap.name,
        "status": "active",
        "experimental": False,
        "publisher": "Care Connect Gateway (generated from the mapping's code map)",
    }
    out["description"] = ((description + ". ") if description else "") + (
        f"Unmapped policy {cmap.unmapped}: {_policy_text(cmap)}.")
    out["group"] = [group]
    return out


def _shared_targets(cmap: CodeMap) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in cmap.entries.values():
        counts[t.code] = counts.get(t.code, 0) + 1
    return counts


def _match(equivalence: str, system: str | None, code: str, display: str | None,
           source: str) -> dict[str, Any]:
    concept: dict[str, Any] = {}
    if system:
        concept["system"] = system
    concept["code"] = code
    if display:
        concept["display"] = display
    return {"name": "match", "part": [
        {"name": "equivalence", "valueCode": equivalence},
        {"name": "concept", "valueCoding": concept},
        {"name": "source", "valueUri": source},
    ]}


def _parameters(result: bool, message: str | None, matches: list[dict[str, Any]]
                ) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "result", "valueBoolean": result}]
    if message:
        params.append({"name": "message", "valueString": message})
    return {"resourceType": "Parameters", "parameter": params + matches}


def translate(cmap: CodeMap, code: str, reverse: bool, base_url: str) -> dict[str, Any]:
    """The ``$translate`` answer for one code through one map (Parameters)."""
    src = url(cmap, base_url)
    if reverse:
        return _reverse(cmap, code, src)
    hit = cmap.entries.get(code)
    if hit is not None:
        eq = "wider" if _shared_targets(cmap).get(hit.code, 0) > 1 else "equivalent"
        return _parameters(True, None, [_match(eq, cmap.target_system, hit.code, hit.display,
                                               src)])
    if code in cmap.no_target:
        return _parameters(False, f"the code is listed in code map '{cmap.name}' with no "
                                  "target (deliberately left out)", [])
    if cmap.unmapped == "default" and cmap.default is not None:
        return _parameters(True, f"the code is not listed in code map '{cmap.name}'; its "
                                 "unmapped policy (default) gives the default target",
                           [_match("inexact", cmap.target_system, cmap.default.code,
                                   cmap.default.display, src)])
    return _parameters(False, f"the code is not listed in code map '{cmap.name}' "
                              f"(unmapped policy {cmap.unmapped}: {_policy_text(cmap)})", [])


def _reverse(cmap: CodeMap, code: str, src: str) -> dict[str, Any]:
    locals_ = cmap.local_codes(code)
    system = source_system(cmap)
    if not locals_:
        if cmap.default is not None and code == cmap.default.code:
            return _parameters(False, f"in code map '{cmap.name}' the code is only the default "
                                      "for unlisted local codes: no local code maps to it", [])
        return _parameters(False, f"no local code maps to the code in code map '{cmap.name}'",
                           [])
    if len(locals_) == 1:
        return _parameters(True, None, [_match("equivalent", system, locals_[0], None, src)])
    return _parameters(True, f"ambiguous: {len(locals_)} local codes map to the code in code "
                             f"map '{cmap.name}'; all are listed",
                       [_match("narrower", system, c, None, src) for c in locals_])
