"""Loading a mapping directory: every problem at once, each as file:line and a clear message;
``careconnect-gateway mappings check``; and the server refusing to start on a bad mapping."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from starlette.applications import Starlette

from adapters.registry import create
from gateway.cli import main
from gateway.mapping.loader import MappingError, load_directory

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "mappings" / "demo-pas"
CODEMAPS = REPO / "mappings" / "codemaps"


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A writable copy of the demo mappings with their code maps next to them."""
    shutil.copytree(DEMO, tmp_path / "demo-pas")
    shutil.copytree(CODEMAPS, tmp_path / "codemaps")
    return tmp_path / "demo-pas"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} is not unique in {path.name}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def line_with(path: Path, text: str, *, start: bool = False) -> int:
    """The number of the one line of ``path`` containing (or starting with) ``text``."""
    found = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if (line.startswith(text) if start else text in line)]
    assert len(found) == 1, f"{text!r} is on lines {found} of {path.name}"
    return found[0]


def problems(directory: Path, url: str = "sqlite://") -> list[tuple[str, int, str]]:
    with pytest.raises(MappingError) as info:
        load_directory(directory, create, urls={"pas": url})
    out = [(p.file.name, p.line, p.message) for p in info.value.problems]
    # The exception text is the report an operator reads: one file:line: message per problem.
    assert str(info.value).splitlines() == [f"{p.file}:{p.line}: {p.message}"
                                            for p in info.value.problems]
    return out


def one_problem(directory: Path) -> tuple[str, int, str]:
    found = problems(directory)
    assert len(found) == 1, found
    return found[0]


# --- the demo set loads -----------------------------------------------------------------------


def test_the_demo_mappings_load(demo_sqlite_url: str) -> None:
    loaded = load_directory(DEMO, create, urls={"pas": demo_sqlite_url})
    assert sorted(m.resource_type for m in loaded.mappings) == [
        "AllergyIntolerance", "Condition", "DocumentReference", "Encounter", "Encounter",
        "Encounter", "Flag", "Immunization", "Location", "Medication", "MedicationRequest",
        "MedicationStatement", "Observation", "Organization", "Patient", "Practitioner",
        "PractitionerRole", "Procedure"]
    assert {m.connection for m in loaded.mappings} == {"pas"}
    assert list(loaded.adapters) == ["pas"]  # one adapter shared by every mapping
    assert len({id(m.adapter) for m in loaded.mappings}) == 1
    assert {p.stem for p in CODEMAPS.glob("*.yaml")} == set(loaded.codemaps)
    by_type = {m.resource_type: m for m in loaded.mappings}
    assert ("subject.reference", "Patient", None) in by_type["Encounter"].references
    assert ("generalPractitioner[1].reference", "Organization", "gp") in by_type[
        "Patient"].references
    assert str(by_type["Patient"].tz) == "Europe/London"


def test_the_embedded_demo_is_used_only_when_no_url_is_configured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCG_PAS_URL", raising=False)
    calls: list[str] = []

    def demo() -> str:
        calls.append("built")
        return "sqlite://"

    load_directory(DEMO, create, demo_url=demo)
    assert calls == ["built"]
    monkeypatch.setenv("CCG_PAS_URL", "sqlite://")
    load_directory(DEMO, create, demo_url=demo)
    assert calls == ["built"]  # the environment variable wins


# --- each kind of problem, at its line --------------------------------------------------------


def test_unknown_key_in_an_output_expression(demo_copy: Path) -> None:
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "family: {column: p.SURNAME, transform: title_case}",
         "family: {colum: p.SURNAME, transform: title_case}")
    assert one_problem(demo_copy) == (
        "Patient.sql.yaml", line_with(f, "colum: p.SURNAME"),
        "output.name[0].family.colum: unknown key")


def test_unknown_key_next_to_a_column(demo_copy: Path) -> None:
    f = demo_copy / "Practitioner.sql.yaml"
    edit(f, "gender: {column: c.SEXXX_CODE, codemap: sex}",
         "gender: {column: c.SEXXX_CODE, codemap: sex, codmap: sex}")
    assert one_problem(demo_copy) == (
        "Practitioner.sql.yaml", line_with(f, "codmap: sex"), "output.gender.codmap: unknown key")


def test_unknown_key_in_search_and_at_the_top_level(demo_copy: Path) -> None:
    f = demo_copy / "Organization.sql.yaml"
    edit(f, "name: {type: string, column: o.ORG_NAME",
         "name: {type: string, colum: o.ORG_NAME")
    edit(f, "sort: [name]", "sort: [name]\nsortt: [name]")
    assert problems(demo_copy) == [
        ("Organization.sql.yaml", line_with(f, "colum: o.ORG_NAME"),
         "search.name.colum: unknown key"),
        ("Organization.sql.yaml", line_with(f, "sortt:"), "sortt: unknown key"),
    ]


def test_missing_required_keys(demo_copy: Path) -> None:
    f = demo_copy / "Location.sql.yaml"
    edit(f, "profile: https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Location-1\n",
         "")
    edit(f, "name: {type: string, column: l.LOCTN_NAME,", "name: {column: l.LOCTN_NAME,")
    # A missing key has no line of its own: the line of the mapping that should hold it.
    assert sorted(problems(demo_copy)) == [
        ("Location.sql.yaml", line_with(f, "resource: Location"),
         "profile: required key is missing"),
        ("Location.sql.yaml", line_with(f, "name: {column: l.LOCTN_NAME,"),
         "search.name.type: required key is missing"),
    ]


def test_missing_connection_in_source(demo_copy: Path) -> None:
    f = demo_copy / "Location.sql.yaml"
    edit(f, "  connection: pas\n", "")
    assert one_problem(demo_copy) == (
        "Location.sql.yaml", line_with(f, "source:", start=True),
        "source.connection: required key is missing")


def test_duplicate_key(demo_copy: Path) -> None:
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "  birthDate: {column: p.DTTM_OF_BIRTH}\n",
         "  birthDate: {column: p.DTTM_OF_BIRTH}\n  gender: {column: p.SEXXX_CODE}\n")
    assert one_problem(demo_copy) == (
        "Patient.sql.yaml", line_with(f, "  gender: {column: p.SEXXX_CODE}\n".strip()),
        "duplicate key 'gender'")


def test_a_key_on_reads_as_a_boolean(demo_copy: Path) -> None:
    f = demo_copy / "Practitioner.sql.yaml"
    edit(f, "link: {o.ORGAN_REFNO: c.ORGAN_REFNO}", "on: {o.ORGAN_REFNO: c.ORGAN_REFNO}")
    assert one_problem(demo_copy) == (
        "Practitioner.sql.yaml", line_with(f, "on: {o.ORGAN_REFNO"),
        "key 'on' reads as a boolean in YAML; quote it")


def test_unknown_codemap_in_output_and_in_search(demo_copy: Path) -> None:
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "maritalStatus: {column: p.MARRY_CODE, codemap: marital-status,",
         "maritalStatus: {column: p.MARRY_CODE, codemap: marital-statuz,")
    edit(f, "column: p.SEXXX_CODE, codemap: sex, description",
         "column: p.SEXXX_CODE, codemap: sexx, description")
    assert problems(demo_copy) == [
        ("Patient.sql.yaml", line_with(f, "marital-statuz"),
         "output.maritalStatus: unknown codemap 'marital-statuz'"),
        ("Patient.sql.yaml", line_with(f, "codemap: sexx"),
         "search.gender.codemap: unknown codemap 'sexx'"),
    ]


def test_unknown_transform(demo_copy: Path) -> None:
    f = demo_copy / "Location.sql.yaml"
    edit(f, "city: {column: l.ADDR_LINE3, transform: title_case}",
         "city: {column: l.ADDR_LINE3, transform: [upper, titlecase]}")
    file, line, message = one_problem(demo_copy)
    assert (file, line) == ("Location.sql.yaml", line_with(f, "titlecase"))
    assert message.startswith("output.address.city: unknown transform 'titlecase' (one of: ")
    assert "title_case" in message


def test_unknown_function(demo_copy: Path) -> None:
    f = demo_copy / "Encounter.sql.yaml"
    edit(f, "function: minutes_between", "function: minutes_betwen")
    assert one_problem(demo_copy) == (
        "Encounter.sql.yaml", line_with(f, "minutes_betwen"),
        "output.length.value: unknown function 'minutes_betwen' "
        "(one of: minutes_between, days_between, deceased_flag, visit_status, "
        "sha1_hex_to_base64)")


def test_unknown_storage_type(demo_copy: Path) -> None:
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "p.DTTM_OF_BIRTH: date:yyyymmdd", "p.DTTM_OF_BIRTH: date:ddmmyyyy")
    file, line, message = one_problem(demo_copy)
    assert (file, line) == ("Patient.sql.yaml", line_with(f, "date:ddmmyyyy"))
    assert message.startswith(
        "types.p.DTTM_OF_BIRTH: unknown storage type 'date:ddmmyyyy' (one of: string, ")


def test_unknown_connection(demo_copy: Path) -> None:
    f = demo_copy / "Organization.sql.yaml"
    edit(f, "connection: pas", "connection: epr")
    assert one_problem(demo_copy) == (
        "Organization.sql.yaml", line_with(f, "connection: epr"),
        "source.connection: unknown connection 'epr' (declared: pas)")


def test_alias_not_declared_in_the_source(demo_copy: Path) -> None:
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "birthDate: {column: p.DTTM_OF_BIRTH}", "birthDate: {column: q.DTTM_OF_BIRTH}")
    # Reported where the mapping uses it, not at the top of the source block.
    assert one_problem(demo_copy) == (
        "Patient.sql.yaml", line_with(f, "q.DTTM_OF_BIRTH"),
        "source: 'q.DTTM_OF_BIRTH' uses an alias the source does not declare")


def test_a_column_without_an_alias(demo_copy: Path) -> None:
    f = demo_copy / "Organization.sql.yaml"
    edit(f, "name: {column: o.ORG_NAME}", "name: {column: ORG_NAME}")
    assert one_problem(demo_copy) == (
        "Organization.sql.yaml", line_with(f, "name: {column: ORG_NAME}"),
        "source: 'ORG_NAME' is not alias.COLUMN")


def test_each_naming_an_undeclared_child(demo_copy: Path) -> None:
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "- each: addresses", "- each: adresses")
    assert one_problem(demo_copy) == (
        "Patient.sql.yaml", line_with(f, "each: adresses"),
        "source: output repeats over child 'adresses', not declared")


def test_a_column_of_one_child_read_inside_another(demo_copy: Path) -> None:
    # The SQL adapter's records hold each child's columns in that child's rows only.
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "        - {column: a.LINE1, transform: title_case}",
         "        - {column: i.IDENTIFIER, transform: title_case}")
    assert one_problem(demo_copy) == (
        "Patient.sql.yaml", line_with(f, "{column: i.IDENTIFIER, transform: title_case}"),
        "output.address[0].line[0]: i.IDENTIFIER is a column of a child: read it inside an "
        "'each' over that child")


def test_an_id_read_from_a_child(demo_copy: Path) -> None:
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "id: {column: p.PATNT_REFNO}", "id: {column: a.PATNT_REFNO}")
    edit(f, "  p.PATNT_REFNO: integer", "  a.PATNT_REFNO: integer")
    assert one_problem(demo_copy) == (
        "Patient.sql.yaml", line_with(f, "id: {column: a.PATNT_REFNO}"),
        "id: the id must be a column of the main table")


def test_a_source_key_problem_points_into_the_source(demo_copy: Path) -> None:
    f = demo_copy / "Practitioner.sql.yaml"
    edit(f, "link: {o.ORGAN_REFNO: c.ORGAN_REFNO}", "\"on\": {o.ORGAN_REFNO: c.ORGAN_REFNO}")
    assert one_problem(demo_copy) == (
        "Practitioner.sql.yaml", line_with(f, "- {table: ORGANISATIONS"),
        "source.joins[0].link: required key is missing")


def test_sort_naming_a_parameter_that_cannot_sort(demo_copy: Path) -> None:
    f = demo_copy / "Patient.sql.yaml"
    edit(f, "sort: [family, birthdate]", "sort: [family, gender]")
    assert one_problem(demo_copy) == (
        "Patient.sql.yaml", line_with(f, "sort: [family, gender]"),
        "sort: 'gender' must be a declared string or date parameter on one column")


def test_a_password_in_a_connection_url(demo_copy: Path) -> None:
    f = demo_copy / "connections.yaml"
    edit(f, "    url_env: CCG_PAS_URL",
         "    url: postgresql+psycopg://gateway:s3cret@pas-db/pas\n    url_env: CCG_PAS_URL")
    file, line, message = one_problem(demo_copy)
    assert (file, line) == ("connections.yaml", line_with(f, "url: postgresql"))
    assert message == ("connections.pas.url: a password in a mapping file; put the URL in the "
                       "environment variable named by url_env")
    assert "s3cret" not in message


def test_a_url_without_a_password_is_fine(demo_copy: Path) -> None:
    edit(demo_copy / "connections.yaml", "    url_env: CCG_PAS_URL",
         "    url: postgresql+psycopg://gateway@pas-db/pas\n    url_env: CCG_PAS_URL")
    loaded = load_directory(demo_copy, create, urls={"pas": "sqlite://"})
    assert len(loaded.mappings) == len(list(DEMO.glob("*.sql.yaml"))) == 18


def test_two_files_mapping_the_same_resource(demo_copy: Path) -> None:
    shutil.copy(demo_copy / "Patient.sql.yaml", demo_copy / "Patient.sql2.yaml")
    f = demo_copy / "Patient.sql2.yaml"
    assert one_problem(demo_copy) == (
        "Patient.sql2.yaml", line_with(f, "resource: Patient"),
        "Patient is already mapped by Patient.sql.yaml: a second source of a type needs its "
        "own id_prefix (e.g. id_prefix: op-)")


def test_a_second_source_with_an_id_prefix_loads(demo_copy: Path) -> None:
    shutil.copy(demo_copy / "Location.sql.yaml", demo_copy / "Location.copy.yaml")
    edit(demo_copy / "Location.copy.yaml", "resource: Location\n",
         "resource: Location\nid_prefix: cp-\n")
    loaded = load_directory(demo_copy, create, urls={"pas": "sqlite://"})
    prefixes = sorted(m.spec.id_prefix or "" for m in loaded.mappings
                      if m.resource_type == "Location")
    assert prefixes == ["", "cp-"]


def test_clashing_id_prefixes(demo_copy: Path) -> None:
    for name, prefix in (("a", "cp-"), ("b", "cp-")):
        shutil.copy(demo_copy / "Location.sql.yaml", demo_copy / f"Location.{name}.yaml")
        edit(demo_copy / f"Location.{name}.yaml", "resource: Location\n",
             f"resource: Location\nid_prefix: {prefix}\n")
    f = demo_copy / "Location.b.yaml"
    assert one_problem(demo_copy) == (
        "Location.b.yaml", line_with(f, "id_prefix:"),
        "id_prefix: 'cp-' clashes with 'cp-' of Location.a.yaml (no prefix may start another)")


def test_an_id_prefix_must_end_in_a_separator(demo_copy: Path) -> None:
    f = demo_copy / "Location.sql.yaml"
    edit(f, "resource: Location\n", "resource: Location\nid_prefix: cp\n")
    name, line, message = one_problem(demo_copy)
    assert (name, line) == ("Location.sql.yaml", line_with(f, "id_prefix:"))
    assert message.startswith("id_prefix: String should match pattern")


def test_the_unprefixed_source_needs_integer_keys(demo_copy: Path) -> None:
    # Organization's key is an integer; drop that declaration, and a string key could
    # look like another source's prefixed id.
    shutil.copy(demo_copy / "Organization.sql.yaml", demo_copy / "Organization.b.yaml")
    f = demo_copy / "Organization.b.yaml"
    edit(f, "resource: Organization\n", "resource: Organization\nid_prefix: b-\n")
    g = demo_copy / "Organization.sql.yaml"
    key_line = [ln for ln in g.read_text().splitlines() if ln.strip().startswith("o.ORGAN_REFNO:")]
    assert len(key_line) == 1
    edit(g, key_line[0] + "\n", "")
    assert one_problem(demo_copy) == (
        "Organization.sql.yaml", line_with(g, "id: {column"),
        "id: Organization has several sources, so this one needs an id_prefix unless its key "
        "is declared as an integer in types:")


def test_sources_of_one_type_share_a_profile(demo_copy: Path) -> None:
    shutil.copy(demo_copy / "Location.sql.yaml", demo_copy / "Location.x.yaml")
    f = demo_copy / "Location.x.yaml"
    edit(f, "resource: Location\n", "resource: Location\nid_prefix: cp-\n")
    edit(f, "StructureDefinition/CareConnect-Location-1",
         "StructureDefinition/CareConnect-Location-2")
    assert one_problem(demo_copy) == (
        "Location.x.yaml", line_with(f, "profile:"),
        "profile: every source of Location must declare the same profile as Location.sql.yaml")


def add_hl7v2_encounter(directory: Path) -> Path:
    """The HL7 v2 demo's Encounter (a PAS over MLLP) as one more Encounter source, prefixed."""
    edit(directory / "connections.yaml", "connections:\n",
         "connections:\n  pas-hl7:\n    adapter: hl7v2\n    url: mllp://127.0.0.1:2575\n"
         "    timezone: Europe/London\n")
    text = (REPO / "mappings" / "demo-hl7v2" / "Encounter.hl7v2.yaml").read_text(encoding="utf-8")
    assert text.count("resource: Encounter\n") == 1
    out = directory / "Encounter.hl7v2.yaml"
    out.write_text(text.replace("resource: Encounter\n", "resource: Encounter\nid_prefix: v2-\n"),
                   encoding="utf-8")
    return out


def drop_outpatient_links(directory: Path) -> None:
    """Without the outpatient Encounter source, the references the demo's clinical mappings
    make to it (``id_prefix: op-``) point at nothing and are refused: take them out too."""
    for name in ("Observation.sql.yaml", "MedicationRequest.sql.yaml"):
        f = directory / name
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        f.write_text("".join(ln for ln in lines if "OPATT_REFNO" not in ln), encoding="utf-8")



def test_an_hl7v2_source_joins_a_type_with_several(demo_copy: Path) -> None:
    # An HL7 v2 PAS resumes only at the DSC-1 pointer it gave for the end of a reply, so the
    # type is paged in source order, reading that source in place (gateway.multisource): no
    # longer refused at load. It cannot sort, so the type has no _sort.
    from gateway.multisource import MultiSource
    from gateway.providers import Provider
    from gateway.registry import Registry

    f = add_hl7v2_encounter(demo_copy)
    loaded = load_directory(demo_copy, create, urls={"pas": "sqlite://"})
    files = sorted(m.file.name for m in loaded.mappings if m.resource_type == "Encounter")
    assert files == ["Encounter.ae.sql.yaml", "Encounter.hl7v2.yaml",
                     "Encounter.outpatient.sql.yaml", "Encounter.sql.yaml"]
    assert f in [m.file for m in loaded.mappings]
    provider = Registry(Provider(m) for m in loaded.mappings).get("Encounter")
    assert isinstance(provider, MultiSource)
    assert provider.sortable == []
    assert set(provider.params) <= {"patient", "subject", "date", "identifier"}


def test_an_hl7v2_source_alone_still_serves_its_type(demo_copy: Path) -> None:
    f = add_hl7v2_encounter(demo_copy)
    for p in demo_copy.glob("Encounter.*sql.yaml"):
        p.unlink()
    drop_outpatient_links(demo_copy)
    loaded = load_directory(demo_copy, create, urls={"pas": "sqlite://"})
    assert [m.file for m in loaded.mappings if m.resource_type == "Encounter"] == [f]


@pytest.mark.parametrize("key", ["id", "meta"])
def test_output_setting_id_or_meta(demo_copy: Path, key: str) -> None:
    f = demo_copy / "Organization.sql.yaml"
    edit(f, "  name: {column: o.ORG_NAME}\n",
         f"  name: {{column: o.ORG_NAME}}\n  {key}: {{column: o.ODS_CODE}}\n")
    assert one_problem(demo_copy) == (
        "Organization.sql.yaml", line_with(f, f"  {key}: {{column: o.ODS_CODE}}"),
        f"output.{key}: must not be set (resourceType, id and meta are derived)")


def test_an_empty_output_value(demo_copy: Path) -> None:
    f = demo_copy / "Practitioner.sql.yaml"
    edit(f, "  gender: {column: c.SEXXX_CODE, codemap: sex}", "  gender:   # empty")
    assert one_problem(demo_copy) == (
        "Practitioner.sql.yaml", line_with(f, "# empty"),
        "output.gender: an empty value; remove the key or give it a value")


# --- code map files ---------------------------------------------------------------------------


def test_a_bad_unmapped_policy(demo_copy: Path) -> None:
    f = demo_copy.parent / "codemaps" / "language.yaml"
    edit(f, "unmapped: omit", "unmapped: drop")
    found = problems(demo_copy)
    assert found[0] == ("language.yaml", line_with(f, "unmapped: drop"),
                        "unmapped: Input should be 'omit', 'default' or 'error'")
    # The mapping using the broken map says so too (the map is not available).
    assert found[1:] == [("Patient.sql.yaml", line_with(demo_copy / "Patient.sql.yaml",
                                                        "codemap: language"),
                          "output.extension[1].extension[0].valueCodeableConcept: "
                          "unknown codemap 'language'")]


def test_a_default_policy_without_a_default(demo_copy: Path) -> None:
    f = demo_copy.parent / "codemaps" / "marital-status.yaml"
    edit(f, "unmapped: omit", "unmapped: default")
    found = problems(demo_copy)
    assert found[0] == ("marital-status.yaml", line_with(f, "unmapped: default"),
                        "unmapped: default needs a default")


def test_a_default_policy_with_a_default_loads(demo_copy: Path) -> None:
    f = demo_copy.parent / "codemaps" / "marital-status.yaml"
    edit(f, "unmapped: omit", "unmapped: default\ndefault: {code: UNK, display: unknown}")
    loaded = load_directory(demo_copy, create, urls={"pas": "sqlite://"})
    cmap = loaded.codemaps["marital-status"]
    assert cmap.unmapped == "default"
    assert cmap.lookup("U") is not None
    assert cmap.lookup("U").code == "UNK"  # type: ignore[union-attr]


def test_duplicate_code_map_names(demo_copy: Path) -> None:
    codemaps = demo_copy.parent / "codemaps"
    shutil.copy(codemaps / "sex.yaml", codemaps / "sex2.yaml")  # loaded after sex.yaml
    assert one_problem(demo_copy) == (
        "sex2.yaml", line_with(codemaps / "sex2.yaml", "name: sex"),
        "code map name 'sex' is used twice")


def test_a_code_map_with_an_unknown_key_and_an_unquoted_leading_zero(demo_copy: Path) -> None:
    codemaps = demo_copy.parent / "codemaps"
    edit(codemaps / "sex.yaml", "unmapped: error", "unmaped: error")
    edit(codemaps / "nhs-number-verification-status.yaml", '"03": {code:', '03: {code:')
    found = problems(demo_copy)
    assert ("nhs-number-verification-status.yaml",
            line_with(codemaps / "nhs-number-verification-status.yaml", "03: {code:"),
            "key '03' reads as 3 in YAML; quote it") in found
    assert ("sex.yaml", line_with(codemaps / "sex.yaml", "unmaped:"), "unmaped: unknown key"
            ) in found


def test_a_missing_code_map_directory(demo_copy: Path) -> None:
    shutil.rmtree(demo_copy.parent / "codemaps")
    found = problems(demo_copy)
    assert found[0] == ("codemaps", 0, "code map directory not found")


# --- connections ------------------------------------------------------------------------------


def test_no_connections_file(tmp_path: Path) -> None:
    assert one_problem(tmp_path) == (
        "connections.yaml", 0, "not found (every mapping directory has one)")


def test_an_unset_url_environment_variable(demo_copy: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCG_PAS_URL", raising=False)
    f = demo_copy / "connections.yaml"
    edit(f, "    default: embedded-demo ", "    # no default ")
    with pytest.raises(MappingError) as info:
        load_directory(demo_copy, create)
    found = [(p.file.name, p.line, p.message) for p in info.value.problems]
    # Reported once, at the connection, however many mappings use it.
    assert found == [("connections.yaml", line_with(f, "  pas:"),
                      "connection 'pas': set the environment variable CCG_PAS_URL")]


def test_an_unknown_time_zone_and_adapter(demo_copy: Path) -> None:
    f = demo_copy / "connections.yaml"
    edit(f, "timezone: Europe/London", "timezone: Europe/Londres")
    assert one_problem(demo_copy) == (
        "connections.yaml", line_with(f, "  pas:"), "connections.pas.timezone: unknown time zone")
    edit(f, "timezone: Europe/Londres", "timezone: Europe/London")
    edit(f, "adapter: sql", "adapter: cobol")
    file, line, message = one_problem(demo_copy)
    assert (file, line) == ("connections.yaml", line_with(f, "  pas:"))
    assert message.startswith("connection 'pas': unknown adapter 'cobol' (available: ")


# --- every problem at once --------------------------------------------------------------------


TINY_CONNECTIONS = """\
connections:
  pas: {adapter: sql, url: "sqlite://"}
codemaps: maps
"""

TINY_CODEMAP = """\
name: sex
target_system: http://hl7.org/fhir/administrative-gender
unmapped: error
map:
  "1": {code: male, display: Male}
  "2": {code: female, display: Female}
"""

TINY_PATIENT = """\
resource: Patient
profile: https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Patient-1
source: {connection: pas, table: PATIENTS, alias: p}
types:
  p.PATNT_REFNO: integer
id: {column: p.PATNT_REFNO}
search:
  gender: {type: token, column: p.SEXXX_CODE, codemap: gender}
output:
  name:
    - family: {column: p.SURNAME, transform: titlecase}
      given: [{column: p.FORENAME, transform: title_case}]
  gender: {column: p.SEXXX_CODE, codemap: sexx}
  birthDate: {column: p.DOB, function: days_between}
  deceasedDateTime: {function: age_at_death, args: [p.DOB, p.DOD]}
"""

TINY_PRACTITIONER = """\
resource: Practitioner
profile: https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Practitioner-1
source: {connection: pas, table: CLINICIANS, alias: c}
types: {c.PROCA_REFNO: number}
id: {column: c.PROCA_REFNO}
output:
  gender: {column: c.SEXXX_CODE, codemap: sex}
"""

TINY_LOCATION = """\
resource: Location
profile: https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Location-1
source: {connection: epr, table: LOCATIONS, alias: l}
id: {column: l.LOCTN_REFNO}
output:
  name: {column: l.LOCTN_NAME}
"""


def test_every_problem_in_every_file_is_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "sex.yaml").write_text(TINY_CODEMAP)
    (tmp_path / "maps" / "sex2.yaml").write_text(TINY_CODEMAP)
    (tmp_path / "connections.yaml").write_text(TINY_CONNECTIONS)
    (tmp_path / "Patient.sql.yaml").write_text(TINY_PATIENT)
    (tmp_path / "Practitioner.sql.yaml").write_text(TINY_PRACTITIONER)
    (tmp_path / "Location.sql.yaml").write_text(TINY_LOCATION)
    with pytest.raises(MappingError) as info:
        load_directory(tmp_path, create)
    found = [(p.file.name, p.line, p.message.split(" (one of")[0]) for p in info.value.problems]
    assert found == [
        ("sex2.yaml", 1, "code map name 'sex' is used twice"),
        ("Location.sql.yaml", 3, "source.connection: unknown connection 'epr' (declared: pas)"),
        ("Patient.sql.yaml", 11, "output.name[0].family: unknown transform 'titlecase'"),
        ("Patient.sql.yaml", 13, "output.gender: unknown codemap 'sexx'"),
        ("Patient.sql.yaml", 14, "output.birthDate: an expression needs exactly one of: "
                                 "column, field, function"),
        ("Patient.sql.yaml", 15, "output.deceasedDateTime: unknown function 'age_at_death'"),
        ("Patient.sql.yaml", 8, "search.gender.codemap: unknown codemap 'gender'"),
        ("Practitioner.sql.yaml", 4, "types.c.PROCA_REFNO: unknown storage type 'number'"),
    ]


# --- the command line and the server ----------------------------------------------------------


def test_mappings_check_passes_on_the_demo(demo_sqlite_url: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_PAS_URL", demo_sqlite_url)
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "data"))
    assert main(["mappings", "check", str(DEMO)]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = []
    for f in sorted(DEMO.glob("*.sql.yaml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        expected.append(f"ok  {f.name}: {doc['resource']} via pas "
                        f"({len(doc['search'])} search parameters)")
    # (Further lines, such as checks of golden cases, may follow the one per mapping.)
    assert sorted(line for line in out if line.endswith("search parameters)")) == expected
    assert len(expected) == 18
    assert not (tmp_path / "data").exists()  # CCG_PAS_URL set: no embedded demo was built


def test_mappings_check_fails_with_file_and_line(demo_copy: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_PAS_URL", "sqlite://")
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "data"))
    patient = demo_copy / "Patient.sql.yaml"
    encounter = demo_copy / "Encounter.sql.yaml"
    edit(patient, "- each: addresses", "- each: adresses")
    edit(encounter, "codemap: specialty", "codemap: specialities")
    assert main(["mappings", "check", str(demo_copy)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{encounter}:{line_with(encounter, 'specialities')}: output.type[0]: "
        "unknown codemap 'specialities'",
        f"{patient}:{line_with(patient, 'each: adresses')}: source: output repeats over "
        "child 'adresses', not declared",
        "2 problem(s)",
    ]


def test_mappings_check_passes_an_hl7v2_source_among_several(
        demo_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_PAS_URL", "sqlite://")
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "data"))
    # (the structured record's Encounter sections ask for `class` and a date sort, which
    # an HL7 v2 source cannot give: checked elsewhere, not here)
    shutil.rmtree(demo_copy / "operations")
    add_hl7v2_encounter(demo_copy)
    assert main(["mappings", "check", str(demo_copy)]) == 0
    out = capsys.readouterr().out
    assert "ok  Encounter.hl7v2.yaml: Encounter via pas-hl7" in out
    assert "problem" not in out


def test_the_server_refuses_to_start(demo_copy: Path, demo_sqlite_url: str,
                                     make_app: Callable[..., Starlette]) -> None:
    f = demo_copy / "Location.sql.yaml"
    edit(f, "city: {column: l.ADDR_LINE3, transform: title_case}",
         "city: {column: l.ADDR_LINE3, transform: titlecase}")
    with pytest.raises(MappingError) as info:
        make_app(demo_sqlite_url, mappings_dir=demo_copy)
    [problem] = info.value.problems
    assert (problem.file, problem.line) == (f, line_with(f, "titlecase"))


def test_serve_exits_with_the_problems(demo_copy: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_PAS_URL", "sqlite://")
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CCG_PAGING_SECRET", "x")
    f = demo_copy / "Organization.sql.yaml"
    edit(f, "connection: pas", "connection: epr")
    assert main(["serve", "--mappings", str(demo_copy), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start: 1 mapping problem(s)" in err
    assert f"{f}:{line_with(f, 'connection: epr')}: source.connection: unknown connection" in err


# --- a token system read through a code map --------------------------------------------------


def test_a_token_systems_codemap_must_exist(demo_copy: Path) -> None:
    f = demo_copy / "Condition.sql.yaml"
    edit(f, "column: c.CTV3_CODE, codemap: ctv3-snomed}", "column: c.CTV3_CODE, codemap: ctv3}")
    assert one_problem(demo_copy) == (
        "Condition.sql.yaml", line_with(f, "codemap: ctv3}"),
        "search.code.systems[3].codemap: unknown codemap 'ctv3'")


def test_a_token_systems_codemap_must_translate_into_that_system(demo_copy: Path) -> None:
    # readv2-snomed gives SNOMED CT codes: declaring them as Read v2 would search wrongly.
    f = demo_copy / "Condition.sql.yaml"
    edit(f, '{system: "http://snomed.info/sct", column: c.READ_CODE, codemap: readv2-snomed}',
         '{system: "http://read.info/readv2", column: c.READ_CODE, codemap: readv2-snomed}')
    assert one_problem(demo_copy) == (
        "Condition.sql.yaml", line_with(f, "codemap: readv2-snomed}"),
        "search.code.systems[2].codemap: 'readv2-snomed' translates into "
        "'http://snomed.info/sct', not 'http://read.info/readv2'")


def test_binary_names_columns_of_the_main_table(demo_copy: Path) -> None:
    f = demo_copy / "DocumentReference.sql.yaml"
    edit(f, "  file: d.FILE_PATH", "  file: x.FILE_PATH")
    name, line, message = one_problem(demo_copy)
    assert name == "DocumentReference.sql.yaml"
    assert message == ("binary.file: must be a column of the main table (d.COLUMN), "
                       "not 'x.FILE_PATH'")
    assert line == line_with(f, "file: x.FILE_PATH")
