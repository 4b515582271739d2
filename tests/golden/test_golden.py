"""Golden files: each demo mapping turns a raw record into exactly the expected resource.

``<Type>/<case>.input.json`` is a record as the adapter returns it (``"p.SURNAME"`` keys,
children under ``"@addresses"`` ...); ``<case>.expected.json`` is the resource the gateway
serves for it. See README.md for (re)writing the expected files with ``CCG_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from adapters.registry import create
from gateway.mapping.loader import load_directory
from gateway.profiles.golden import golden_name
from gateway.providers import Provider

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UPDATE = os.environ.get("CCG_UPDATE_GOLDEN") == "1"
CASES = sorted(HERE.glob("*/*.input.json"))


def _canonical(value: Any) -> str:
    # Text, not ==: in Python True == 1 and 1 == 1.0, in FHIR JSON they differ.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@pytest.fixture(scope="module")
def providers(demo_sqlite_url: str) -> dict[str, Provider]:
    loaded = load_directory(REPO / "mappings" / "demo-pas", create,
                            urls={"pas": demo_sqlite_url})
    return {golden_name(m): Provider(m) for m in loaded.mappings}


def test_every_served_resource_type_has_golden_cases(providers: dict[str, Provider]) -> None:
    covered = {case.parent.name for case in CASES}
    assert covered == set(providers)


def test_every_expected_file_has_its_input() -> None:
    for expected in HERE.glob("*/*.expected.json"):
        if expected.parent.name in ("hl7v2", "adt"):  # messages in: test_golden_hl7v2.py,
            # tests/gateway/adt/test_events.py
            continue
        assert expected.with_name(expected.name.replace(".expected.", ".input.")).is_file()


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name[:-11]}")
def test_golden(case: Path, providers: dict[str, Provider]) -> None:
    record = json.loads(case.read_text(encoding="utf-8"))
    provider = providers[case.parent.name]
    resource = provider.resource(provider.as_record(record))
    expected_file = case.with_name(case.name.replace(".input.", ".expected."))
    if UPDATE:
        expected_file.write_text(json.dumps(resource, indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    if not expected_file.is_file():
        pytest.fail(f"{expected_file.name} is missing: run with CCG_UPDATE_GOLDEN=1, then "
                    "review it against the Care Connect profile")
    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    assert resource == expected
    assert _canonical(resource) == _canonical(expected)
    # The id is the record key, as the server will serve it.
    assert resource["id"] == provider.id_prefix + str(record[provider.key])
