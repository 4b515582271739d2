"""messaging.yaml and documents/*.yaml are checked at start-up: every problem as
``file:line: key: message``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.mapping.loader import MappingError
from gateway.messaging.config import load_messaging
from gateway.operations.document import load_documents
from tests.gateway.operations.test_structured import DEMO, REPO, registry_of


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    shutil.copytree(DEMO, tmp_path / "demo-pas")
    shutil.copytree(REPO / "mappings" / "codemaps", tmp_path / "codemaps")
    return tmp_path / "demo-pas"


def test_messaging_problems_name_file_and_line(demo_copy: Path, demo_sqlite_url: str) -> None:
    f = demo_copy / "messaging.yaml"
    f.write_text("events:\n"
                 "  patient-registration:\n"
                 "    display: Register\n"
                 "    focus: Patient\n"
                 "    write: create\n"
                 "  Bad_Code:\n"
                 "    display: x\n"
                 "    focus: Nonsense\n"
                 "    write: update\n")
    registry = registry_of(demo_copy, demo_sqlite_url)  # the file is not read as a mapping
    with pytest.raises(MappingError) as info:
        load_messaging(demo_copy, registry)
    got = [(p.file.name, p.line, p.message) for p in info.value.problems]
    assert got == [
        ("messaging.yaml", 5, "events.patient-registration.write: Patient declares no create "
                              "(its mapping's write:)"),
        ("messaging.yaml", 6, "events.Bad_Code: an event code is lower case letters, digits "
                              "and '-'"),
        ("messaging.yaml", 8, "events.Bad_Code.focus: Nonsense is not served here"),
    ]
    f.write_text("events:\n  x:\n    display: x\n    focus: Patient\n    write: delete\n")
    with pytest.raises(MappingError) as info:
        load_messaging(demo_copy, registry)
    assert info.value.problems[0].line == 5 and "write" in info.value.problems[0].message
    f.unlink()
    assert load_messaging(demo_copy, registry) is None


def test_document_problems_name_file_and_line(demo_copy: Path, demo_sqlite_url: str) -> None:
    f = demo_copy / "documents" / "discharge-summary.yaml"
    text = f.read_text()
    text = text.replace("    encounter: context\n    sort: asserted-date",
                        "    encounter: visit\n    sort: asserted-date")
    text = text.replace("    search: {category: discharge}", "    search: {colour: blue}")
    f.write_text(text)
    lines = text.splitlines()
    with pytest.raises(MappingError) as info:
        load_documents(demo_copy, registry_of(demo_copy, demo_sqlite_url))
    got = [(p.line, p.message) for p in info.value.problems]
    assert got == [
        (next(n for n, ln in enumerate(lines, 1) if "encounter: visit" in ln),
         "sections.0.encounter: Condition has no search parameter 'visit'"),
        (next(n for n, ln in enumerate(lines, 1) if "colour: blue" in ln),
         "sections.2.search.colour: MedicationRequest has no search parameter 'colour'"),
    ]
