"""The closed set of value transforms."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.mapping import transforms
from gateway.mapping.transforms import TRANSFORMS, chain


def t(name: str, value: object) -> object:
    return TRANSFORMS[name][0](value)


@pytest.mark.parametrize(("stored", "shown"), [
    ("O'BRIEN", "O'Brien"),
    ("SMITH-JONES", "Smith-Jones"),
    ("MCDONALD", "McDonald"),
    ("O'NEILL-MCCARTHY", "O'Neill-McCarthy"),
    ("D'ARCY", "D'Arcy"),
    ("MACHIN", "Machin"),  # no Mac- rule: Machin, Mack and Macey are not MacHin
    ("SMITH", "Smith"),
    ("jane elizabeth", "Jane Elizabeth"),
    ("BRONTË", "Brontë"),
    ("ÉMILE ZOLA", "Émile Zola"),
    ("ST JOHN'S ROAD", "St John's Road"),  # a possessive is not an O'Brien
    ("FLAT 2, 40 HYDE PARK ROAD", "Flat 2, 40 Hyde Park Road"),
    ("MRS", "Mrs"),
    ("", ""),
])
def test_title_case(stored: str, shown: str) -> None:
    assert t("title_case", stored) == shown


def test_title_case_agrees_with_its_word_rules_on_any_text() -> None:
    # Plain ASCII text takes a shortcut (str.title); it must give what the rules give.
    rules = transforms._title_case.__wrapped__
    rnd = random.Random(7)
    alphabet = [*"abmcxzABMCXZ '-.,09_\t", "Mc", "mc", "MC", "é", "ß", "İ"]
    for _ in range(20_000):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
        assert rules(s) == transforms._WORD.sub(transforms._cap, s), s
    assert t("title_case", 42) == "42"


def test_every_transform_is_documented() -> None:
    assert set(TRANSFORMS) == {"title_case", "upper", "lower", "string", "integer", "decimal",
                               "yes_no", "not", "digits", "no_spaces"}
    for fn, doc in TRANSFORMS.values():
        assert callable(fn)
        assert doc


@pytest.mark.parametrize(("stored", "flag"), [
    ("Y", True), ("y", True), (" YES ", True), ("1", True), ("T", True), ("true", True),
    ("N", False), ("no", False), ("0", False), ("F", False), ("FALSE", False),
    ("X", None), ("", None), ("maybe", None), (1, True), (0, False),
])
def test_yes_no(stored: object, flag: bool | None) -> None:
    assert t("yes_no", stored) is flag


def test_not_negates_booleans_only() -> None:
    assert t("not", True) is False
    assert t("not", False) is True
    assert t("not", "Y") is None
    assert t("not", 1) is None


def test_chains_apply_in_order_and_stop_at_none() -> None:
    archived_to_active = chain(["yes_no", "not"])
    assert archived_to_active("Y") is False
    assert archived_to_active("N") is True
    assert archived_to_active("?") is None
    digits_then_integer = chain(["digits", "integer"])
    assert digits_then_integer("01632 960 001") == 1632960001
    assert digits_then_integer("none") is None  # digits gave None: integer is not called
    assert chain(["upper"]) is TRANSFORMS["upper"][0]


def test_the_other_transforms() -> None:
    assert t("upper", "ls6 1lj") == "LS6 1LJ"
    assert t("lower", "Jane.Smith@Example.COM") == "jane.smith@example.com"
    assert t("string", 100001) == "100001"
    assert t("string", "  ") is None
    assert t("integer", " 42 ") == 42
    assert t("integer", "4.2") is None
    assert t("digits", "999 000 0018") == "9990000018"
    assert t("digits", "n/a") is None
    assert t("no_spaces", " LS6  1LJ ") == "LS61LJ"
    assert t("no_spaces", "   ") is None


@pytest.mark.parametrize(("stored", "expected"), [
    ("5.4", 5.4), ("137", 137), ("-0.5", -0.5), (" 0.05 ", 0.05), ("0", 0),
    ("<0.1", None), ("POSITIVE", None), ("1e5", None), ("01.5", None), ("5.", None), ("", None),
])
def test_decimal(stored: str, expected: Any) -> None:
    result = TRANSFORMS["decimal"][0](stored)
    assert result == expected and type(result) is type(expected)
