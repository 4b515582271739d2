"""An operation's Parameters body: what is not a list of named simple values is a 400
(BAD_REQUEST), never iterated as if it were (an int ``parameter`` raised TypeError: a 500)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import BadRequest
from gateway.operations.params import _from_parameters, parameter_list


@pytest.mark.parametrize("parameter", [-1, 1.5, True, "start", {"name": "start"}])
def test_parameter_that_is_not_a_list_is_refused(parameter: Any) -> None:
    with pytest.raises(BadRequest, match="not a list"):
        parameter_list({"resourceType": "Parameters", "parameter": parameter})
    with pytest.raises(BadRequest):
        _from_parameters({"resourceType": "Parameters", "parameter": parameter})


@pytest.mark.parametrize("value", [None, {}, [], {"value": 1}, ["2000-01-01"]])
def test_a_value_that_is_not_simple_is_refused(value: Any) -> None:
    """Not turned into the text "{}" or "None" and passed on as if the client had sent it."""
    body = {"resourceType": "Parameters", "parameter": [{"name": "start", "valueDate": value}]}
    with pytest.raises(BadRequest, match="no simple value"):
        _from_parameters(body)


def test_simple_values_are_read() -> None:
    assert parameter_list({"resourceType": "Parameters"}) == []
    assert _from_parameters({"resourceType": "Parameters", "parameter": [
        {"name": "start", "valueDate": "2000-01-01"}, {"name": "_count", "valueInteger": 5},
        {"name": "x", "valueBoolean": False}]}) == [
        ("start", "2000-01-01"), ("_count", "5"), ("x", "false")]
