"""Golden files for the HL7 v2 mappings: a message in, exactly these resources out.

``hl7v2/<case>.hl7`` is a message as it arrives (replies recorded from the PAS simulator, the
NHS ITK samples from ../shared, and hand-made edge cases); ``<case>.expected.json`` is the
list of resources the demo HL7 v2 mappings make of its PID groups. ``CCG_UPDATE_GOLDEN=1``
rewrites the expected files (see README.md: review them before committing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from adapters.hl7v2 import er7
from adapters.hl7v2.adapter import Hl7v2Adapter
from adapters.registry import create
from gateway.mapping.loader import load_directory
from gateway.providers import Provider
from tests.reference import update_golden

HERE = Path(__file__).resolve().parent / "hl7v2"
REPO = HERE.parents[2]
CASES = sorted(HERE.glob("*.hl7"))


@pytest.fixture(scope="module")
def providers(demo_sqlite_url: str) -> dict[str, Provider]:
    # The adapter connects lazily: nothing listens on this port and nothing needs to.
    loaded = load_directory(REPO / "mappings" / "demo-hl7v2", create,
                            urls={"pas": demo_sqlite_url, "pas-hl7": "mllp://127.0.0.1:9"})
    return {m.resource_type: Provider(m) for m in loaded.mappings}


def _resources(providers: dict[str, Provider], message: er7.Message) -> list[dict[str, Any]]:
    kind = "Encounter" if message.segment("PV1") is not None else "Patient"
    provider = providers[kind]
    adapter = provider.mapping.adapter
    assert isinstance(adapter, Hl7v2Adapter)
    return [provider.resource(r) for r in adapter.records(provider.mapping.prepared, message)]


def test_there_are_cases_for_both_hl7_mappings() -> None:
    names = {c.name for c in CASES}
    assert any("zv2" in n for n in names) and any("itk" in n for n in names)


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden(case: Path, providers: dict[str, Provider]) -> None:
    message = er7.parse(case.read_bytes())
    resources = _resources(providers, message)
    expected_file = case.with_suffix(".expected.json")
    if update_golden():
        expected_file.write_text(json.dumps(resources, indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    assert json.dumps(resources, sort_keys=True, ensure_ascii=False) == json.dumps(
        expected, sort_keys=True, ensure_ascii=False)
    assert resources, "a golden case must produce at least one resource"


# --- the NHS ITK sample messages themselves (../shared), read as they are --------------------

ITK_SAMPLES = REPO.parent / "shared" / "hl7v2-samples" / "uk-itk-adt"
ITK_VISITS = sorted(p for p in ITK_SAMPLES.glob("*")
                    if re.search(rb"(?:^|[\r\n])PV1\|", p.read_bytes()))


def test_the_itk_samples_are_there() -> None:
    assert len(ITK_VISITS) >= 4, ITK_SAMPLES


@pytest.mark.parametrize("sample", ITK_VISITS, ids=lambda p: p.stem)
def test_itk_sample_visits(sample: Path, providers: dict[str, Provider]) -> None:
    """Each ITK ADT sample with a PV1 gives its visit as an Encounter (with status and
    class); one without a visit number (PV1-19) gives none, and that is counted."""
    from adapters import dropped

    message = er7.parse(sample.read_bytes())
    provider = providers["Encounter"]
    adapter = provider.mapping.adapter
    assert isinstance(adapter, Hl7v2Adapter)
    before = sum(n for (where, _), n in dropped.snapshot().items() if "PV1" in where)
    resources = [provider.resource(r)
                 for r in adapter.records(provider.mapping.prepared, message)]
    after = sum(n for (where, _), n in dropped.snapshot().items() if "PV1" in where)
    visits = message.groups("PV1")
    assert len(resources) + (after - before) == len(visits)
    expected_file = HERE / "itk-shared" / f"{sample.stem}.expected.json"
    if update_golden():
        expected_file.parent.mkdir(exist_ok=True)
        expected_file.write_text(json.dumps(resources, indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    assert resources == expected
    for enc in resources:
        assert enc["status"] and enc["class"]["code"]
