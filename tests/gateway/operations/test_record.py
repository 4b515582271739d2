"""gateway.operations.record.referenced_ids against an independent walk of the resources."""

from __future__ import annotations

from typing import Any

from gateway.operations.record import REFERENCED, referenced_ids


def _walk(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                out.append(v)
            else:
                out += _walk(v)
        return out
    if isinstance(node, list):
        return [r for v in node for r in _walk(v)]
    return []


def _oracle(resources: list[dict[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for ref in _walk(resources):
        rtype, _, rid = ref.partition("/")
        if rtype in REFERENCED and rid and "/" not in rid and '"' not in rid and "\\" not in rid:
            out.setdefault(rtype, set()).add(rid)
    return out


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Observation", "id": "1",
     "performer": [{"reference": "Practitioner/7"}, {"reference": "Organization/org-1"}],
     "subject": {"reference": "Patient/100001"},
     "note": [{"text": '{"reference":"Practitioner/999"} ,"reference":"Location/888"'}],
     "valueString": 'x\\","reference":"Location/777"'},
    {"resourceType": "MedicationRequest", "id": "2",
     "medicationReference": {"reference": "Medication/dmd.1234", "display": "a"},
     "contained": [{"resourceType": "X", "location": [{"location": {"reference": "Location/3"}}]}],
     "requester": {"agent": {"reference": "Practitioner/7"}},
     "basedOn": [{"reference": "Practitioner/a/b"}, {"reference": "Locationx/4"},
                 {"reference": 5}, {"reference": "Medication/"}],
     "reference": "Practitioner/top"},
]


def test_referenced_ids_finds_exactly_what_a_walk_finds() -> None:
    found = {t: set(ids) for t, ids in referenced_ids(RESOURCES).items()}
    assert found == _oracle(RESOURCES)
    assert found == {"Practitioner": {"7", "top"}, "Organization": {"org-1"},
                     "Medication": {"dmd.1234"}, "Location": {"3"}}


def test_referenced_ids_keep_first_seen_order() -> None:
    res = [{"a": {"reference": f"Practitioner/{i}"}} for i in (5, 3, 5, 9)]
    assert list(referenced_ids(res)["Practitioner"]) == ["5", "3", "9"]
