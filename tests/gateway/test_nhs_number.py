"""NHS number Modulus 11 check (NHS Data Dictionary), against a hand-computed oracle."""

from __future__ import annotations

import pytest

from gateway import nhs_number


def _oracle_check_digit(nine: str) -> int | None:
    # Written out long-hand from the Data Dictionary: weights 10..2, remainder mod 11,
    # 11 - remainder; 11 means 0, 10 means "no valid NHS number has these nine digits".
    weights = [10, 9, 8, 7, 6, 5, 4, 3, 2]
    total = 0
    for i in range(9):
        total += int(nine[i]) * weights[i]
    digit = 11 - (total % 11)
    if digit == 11:
        return 0
    if digit == 10:
        return None
    return digit


@pytest.mark.parametrize("value", ["9990000018", "9990000026", "9990000034", "9990000042",
                                   "9434765919", "4010232137"])
def test_valid_numbers(value: str) -> None:
    assert _oracle_check_digit(value[:9]) == int(value[9])  # the oracle agrees they are valid
    assert nhs_number.is_valid(value)


@pytest.mark.parametrize("value", ["9990000019", "9990000010", "9434765918", "4010232138"])
def test_wrong_check_digit(value: str) -> None:
    assert not nhs_number.is_valid(value)


@pytest.mark.parametrize(("stem", "digit"), [
    ("000000011", 6),   # 1*3 + 1*2 = 5; 11 - 5 = 6
    ("000000022", 1),   # 2*3 + 2*2 = 10; 11 - 10 = 1
    ("000000101", 5),   # 1*4 + 1*2 = 6; 11 - 6 = 5
    ("000000112", 0),   # 1*4 + 1*3 + 2*2 = 11: remainder 0, 11 - 0 = 11 means 0
    ("000000000", 0),
    ("000000202", None),  # 2*4 + 2*2 = 12: remainder 1, 11 - 1 = 10 is impossible
])
def test_check_digit_worked_examples(stem: str, digit: int | None) -> None:
    assert _oracle_check_digit(stem) == digit
    assert nhs_number.check_digit(stem) == digit
    if digit is not None:
        assert nhs_number.is_valid(stem + str(digit))
        assert not nhs_number.is_valid(stem + str((digit + 1) % 10))


def test_check_digit_ten_is_impossible() -> None:
    stems = [f"{n:09d}" for n in range(0, 2000)]
    impossible = [s for s in stems if _oracle_check_digit(s) is None]
    assert len(impossible) > 100  # about one stem in eleven
    for s in impossible:
        assert nhs_number.check_digit(s) is None
        # no final digit can make it valid
        assert not any(nhs_number.is_valid(s + str(d)) for d in range(10))


def test_agrees_with_oracle_on_many_stems() -> None:
    for n in range(0, 1_000_000_000, 7_777_777):
        stem = f"{n:09d}"
        expected = _oracle_check_digit(stem)
        assert nhs_number.check_digit(stem) == expected
        for d in range(10):
            assert nhs_number.is_valid(stem + str(d)) == (expected == d)


@pytest.mark.parametrize("value", ["", "999000001", "99900000180", "999 000 0018",
                                   "999-000-0018", " 9990000018"])
def test_wrong_length(value: str) -> None:
    assert not nhs_number.is_valid(value)


@pytest.mark.parametrize("value", ["999000001X", "99900000a8", "+990000018", "9990000.18",
                                   "\uff19\uff19\uff19\uff10\uff10\uff10\uff10\uff10\uff11\uff18",
                                   "\u0669\u0669\u0669\u0660\u0660\u0660\u0660\u0660\u0661\u0668"])
def test_non_digits(value: str) -> None:
    # includes full-width and Arabic-Indic digits, which str.isdigit() accepts
    assert len(value) == 10
    assert not nhs_number.is_valid(value)
