"""The coverage report in a real headless Chromium: its structure, where each value comes
from, links and folding as a reader meets them, and a screenshot."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from gateway import cli
from gateway.settings import bundled_mappings_roots
from tests.browser import Browser, require_chromium

MAPPINGS = bundled_mappings_roots()[0]
# one section per mapping: Encounter's two prefixed sources have their own (type.prefix)
TYPES = ["AllergyIntolerance", "Condition", "DocumentReference", "Encounter.ae", "Encounter.op",
         "Encounter", "Flag",
         "Immunization", "Location", "Medication", "MedicationRequest", "MedicationStatement",
         "Observation", "Organization", "Patient", "Practitioner", "PractitionerRole",
         "Procedure"]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report for a copy of the SQL demo whose Patient mapping lost its name: a required
    element (Patient.name, 1..*) that is not mapped."""
    tmp = tmp_path_factory.mktemp("coverage")
    shutil.copytree(MAPPINGS / "demo-pas", tmp / "demo-pas")
    shutil.copytree(MAPPINGS / "codemaps", tmp / "codemaps")
    patient = tmp / "demo-pas" / "Patient.sql.yaml"
    lines = patient.read_text(encoding="utf-8").splitlines()
    start = lines.index("  name:", lines.index("output:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("    "))
    patient.write_text("\n".join(lines[:start] + lines[end:]) + "\n", encoding="utf-8")
    out = tmp / "coverage.html"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCG_DATA_DIR", str(tmp / "data"))
        mp.setenv("CCG_DEMO_PATIENTS", "60")
        assert cli.main(["mappings", "coverage", str(tmp / "demo-pas"), "--html", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def browser(page: Path, tmp_path_factory: pytest.TempPathFactory) -> Browser:
    binary = require_chromium()
    with Browser(binary, tmp_path_factory.mktemp("chromium")) as b:
        b.open(page.as_uri())
        yield b


def test_summary_links_to_a_section_per_resource(browser: Browser) -> None:
    assert browser.js("document.title") == "Care Connect mapping coverage"
    links = browser.js("[...document.querySelectorAll('table.summary a')]"
                       ".map(a => a.getAttribute('href'))")
    assert links == [f"#{t}" for t in TYPES]
    sections = browser.js("[...document.querySelectorAll('section.resource')].map(s => s.id)")
    assert sections == TYPES
    # the Patient row counts its required-but-unmapped element
    counts = browser.js("[...document.querySelectorAll('table.summary tbody tr')]"
                        ".map(r => r.lastChild.textContent)")
    # Patient.name and its official slice
    assert counts == ["2" if t == "Patient" else "0" for t in TYPES]
    # following a link scrolls its section to the top of the window
    browser.js("document.querySelector('table.summary a[href=\"#Patient\"]').click()")
    assert browser.js("location.hash") == "#Patient"
    top = browser.js("document.getElementById('Patient').getBoundingClientRect().top")
    assert abs(top) < 2
    browser.js("window.scrollTo(0, 0)")


def test_required_unmapped_first_then_mapped_then_optional_folded(browser: Browser) -> None:
    for rtype in TYPES:
        order = browser.js(f"""(() => {{
            const s = document.getElementById('{rtype}');
            const kids = [...s.children].map(e => e.tagName + '.' + (e.className || ''));
            return kids.filter(k => /^(H3|TABLE|DETAILS|P\\.none)/.test(k));
        }})()""")
        assert order[0] == "H3." and order[-1] == "DETAILS.optional-unmapped", (rtype, order)
        assert order.index("TABLE.mapped") < order.index("DETAILS.optional-unmapped")
        required = order[1]
        assert required in ("TABLE.required-unmapped", "P.none"), (rtype, order)
    missing = browser.js("[...document.querySelectorAll('#Patient table.required-unmapped "
                         "tbody tr')].map(r => r.id)")
    assert missing == ["Patient.name", "Patient.name:official"]
    # folded: optional unmapped rows are not rendered until the reader opens the details
    hidden = "document.querySelector('#Patient details.optional-unmapped')"
    assert browser.js(f"{hidden}.open") is False
    contact = f"{hidden}.querySelector('tr[id=\"Patient.contact\"]')"
    height = f"{hidden}.getBoundingClientRect().height"
    folded = browser.js(height)
    assert browser.js(f"{contact}.checkVisibility()") is False
    assert browser.js("document.getElementById('Patient.gender').checkVisibility()") is True
    assert folded < 60  # the summary line only
    browser.js(f"{hidden}.querySelector('summary').click()")
    assert browser.js(f"{hidden}.open") is True
    assert browser.js(f"{contact}.checkVisibility()") is True
    assert browser.js(height) > 10 * folded


def test_each_mapped_element_says_where_it_comes_from(browser: Browser) -> None:
    def source(element: str) -> list[str]:
        found: list[str] = browser.js(
            f"[...document.getElementById('{element}').querySelectorAll('td.src div')]"
            ".map(d => d.textContent)")
        return found

    assert source("Patient.gender") == ["PATIENTS.SEXXX_CODE (p.SEXXX_CODE) | codemap sex "
                                        "(unmapped: error)"]
    assert source("Patient.address.city") == ["ADDRESSES.LINE3 (a.LINE3) | title_case | "
                                              "each: addresses"]
    assert source("Patient.address") == ["each: addresses (one per row)"]
    assert source("Patient.active") == ["PATIENTS.ARCHV_FLAG (p.ARCHV_FLAG) | yes_no, not"]
    assert "PATIENTS.NHS_NUMBER (p.NHS_NUMBER)" in source("Patient.identifier:nhsNumber")
    assert source("Encounter.subject.reference") == [
        "PROVIDER_SPELLS.PATNT_REFNO (s.PATNT_REFNO) → Patient/id"]
    # the other sources of Encounter, each in its own section, from its own table
    assert source("Encounter.op:Encounter.subject.reference") == [
        "OUTPATIENT_ATTENDANCES.PATNT_REFNO (o.PATNT_REFNO) → Patient/id"]
    assert source("Encounter.ae:Encounter.subject.reference") == [
        "AE_ATTENDANCES.PATNT_REFNO (e.PATNT_REFNO) → Patient/id"]
    assert source("Patient.id") == ["PATIENTS.PATNT_REFNO (p.PATNT_REFNO)"]
    # every mapped leaf element (no mapped children) has a source
    bare = browser.js("""[...document.querySelectorAll('table.mapped tbody tr')]
        .filter(r => !r.querySelector('td.src div'))
        .map(r => r.id)""")
    leaves = [e for e in bare if not any(o.startswith(e + ".") or o.startswith(e + ":")
                                         for o in browser.js(
        "[...document.querySelectorAll('table.mapped tbody tr')].map(r => r.id)"))]
    assert leaves == [], leaves


def test_screenshot(browser: Browser, tmp_path: Path) -> None:
    browser.js("window.scrollTo(0, 0)")
    shot = tmp_path / "coverage.png"
    data = browser.screenshot(shot, full_page=False)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (browser.width, browser.height)
    assert len(data) > 20_000  # text and tables, not a blank page
    full = browser.screenshot(tmp_path / "full.png", full_page=True)
    assert struct.unpack(">II", full[16:24])[1] > 5 * browser.height  # five long sections
