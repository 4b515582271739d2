"""YAML loading that remembers line numbers and refuses the classic YAML traps."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.mapping.yamlfile import (
    LineDict,
    LineList,
    YamlError,
    line_of,
    line_of_dotted,
    line_of_value,
    load,
    split_path,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return path


DOC = """\
# a comment
resource: Patient
types:
  p.SURNAME: string
  p.DTTM_OF_BIRTH: date:yyyymmdd
output:
  name:
    - use: official
      family: {column: p.SURNAME}
      given:
        - {column: p.FORENAME}
        - {column: p.SECOND_FORENAME}
"""


def test_mappings_and_lists_remember_their_lines(tmp_path: Path) -> None:
    doc = load(_write(tmp_path, DOC))
    assert isinstance(doc, LineDict)
    assert doc.line == 2  # the first key, not the comment above it
    assert doc.key_lines == {"resource": 2, "types": 3, "output": 6}
    assert doc["types"].key_lines == {"p.SURNAME": 4, "p.DTTM_OF_BIRTH": 5}
    names = doc["output"]["name"]
    assert isinstance(names, LineList)
    assert names.item_lines == [8]
    assert names[0].key_lines == {"use": 8, "family": 9, "given": 10}
    assert names[0]["given"].item_lines == [11, 12]
    # Plain values are plain Python values.
    assert doc["resource"] == "Patient"
    assert names[0]["family"] == {"column": "p.SURNAME"}


def test_line_of_follows_a_pydantic_location_to_the_deepest_node(tmp_path: Path) -> None:
    doc = load(_write(tmp_path, DOC))
    assert line_of(doc, ("output", "name", 0, "given", 1)) == 12
    assert line_of(doc, ("output", "name", 0, "family", "column")) == 9
    # A key that is not there: the line of the deepest node that is.
    assert line_of(doc, ("output", "name", 0, "prefix")) == 8
    assert line_of(doc, ("output", "name", 7)) == 7
    assert line_of(doc, ("nothing",)) == 2
    assert line_of(doc, ()) == 2


def test_split_path_turns_element_paths_into_locations() -> None:
    assert split_path("name[0].given[1]") == ["name", 0, "given", 1]
    assert split_path("output.length.value") == ["output", "length", "value"]
    assert split_path("joins[1].link") == ["joins", 1, "link"]
    assert split_path("") == []


def test_line_of_dotted_finds_keys_that_contain_dots(tmp_path: Path) -> None:
    doc = load(_write(tmp_path, DOC))
    assert line_of_dotted(doc, "types.p.DTTM_OF_BIRTH") == 5
    assert line_of_dotted(doc, "output.name[0].given[1]") == 12
    assert line_of_dotted(doc, "types.p.MISSING") == 3


def test_line_of_value_finds_the_first_use_of_a_name(tmp_path: Path) -> None:
    doc = load(_write(tmp_path, DOC))
    assert line_of_value(doc, "p.SECOND_FORENAME") == 12
    assert line_of_value(doc, "p.SURNAME") == 4  # as a key of types, before its use at 9
    assert line_of_value(doc, "official") == 8
    assert line_of_value(doc, "nowhere") is None


def test_a_duplicate_key_is_an_error_at_the_second_occurrence(tmp_path: Path) -> None:
    path = _write(tmp_path, "resource: Patient\noutput:\n  gender: a\n  birthDate: b\n"
                            "  gender: c\n")
    with pytest.raises(YamlError) as info:
        load(path)
    assert info.value.line == 5
    assert info.value.message == "duplicate key 'gender'"
    assert str(info.value) == f"{path}:5: duplicate key 'gender'"


@pytest.mark.parametrize("key", ["on", "off", "yes", "no", "true", "False", "ON"])
def test_a_key_that_yaml_reads_as_a_boolean_must_be_quoted(tmp_path: Path, key: str) -> None:
    path = _write(tmp_path, f"joins:\n  - table: X\n    {key}: {{a.X: b.Y}}\n")
    with pytest.raises(YamlError) as info:
        load(path)
    assert info.value.line == 3
    assert "reads as a boolean" in info.value.message
    assert "quote it" in info.value.message
    assert repr(key) in info.value.message


def test_the_quoted_key_is_fine(tmp_path: Path) -> None:
    doc = load(_write(tmp_path, 'joins:\n  - table: X\n    "on": {a.X: b.Y}\n'))
    assert doc["joins"][0]["on"] == {"a.X": "b.Y"}


def test_a_key_with_a_leading_zero_must_be_quoted(tmp_path: Path) -> None:
    # YAML 1.1 reads 01 as the integer 1, so the code "01" would silently become "1".
    path = _write(tmp_path, 'map:\n  "01": {code: "01"}\n  02: {code: "02"}\n')
    with pytest.raises(YamlError) as info:
        load(path)
    assert info.value.line == 3
    assert "'02' reads as 2" in info.value.message
    assert "quote it" in info.value.message


def test_numeric_keys_that_survive_unchanged_become_strings(tmp_path: Path) -> None:
    doc = load(_write(tmp_path, "map:\n  1: {code: male}\n  9: {code: other}\n  08: x\n"))
    assert list(doc["map"]) == ["1", "9", "08"]
    assert doc["map"].key_lines == {"1": 2, "9": 3, "08": 4}


def test_a_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "resource: Patient\noutput:\n  birthDate: {column: p.DOB\n"
                            "  gender: {column: p.SEX}\n")
    with pytest.raises(YamlError) as info:
        load(path)
    assert info.value.line == 4
    assert str(info.value).startswith(f"{path}:4: ")


def test_an_unreadable_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(YamlError) as info:
        load(missing)
    assert info.value.line == 0
    assert info.value.message.startswith("cannot read")
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("name: BRONT\xcb\n".encode("latin-1"))
    with pytest.raises(YamlError, match="cannot read"):
        load(binary)


def test_an_empty_file_loads_as_none(tmp_path: Path) -> None:
    assert load(_write(tmp_path, "# nothing here\n")) is None
