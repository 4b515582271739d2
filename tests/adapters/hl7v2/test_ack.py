"""Reading a PAS's refusal (adapters/hl7v2/ack.py): where each HL7 version puts its errors,
and the table 0357 mapping checked against hl7apy's copy of the table (written by others)."""

from __future__ import annotations

import pytest
from hl7apy.v2_4 import tables as v24
from hl7apy.v2_8_2 import tables as v282

from adapters.base import (
    BackendRejected,
    BackendUnavailable,
    DuplicateKey,
    InvalidValue,
    UnknownKey,
)
from adapters.hl7v2 import ack, er7, messages

MSH = "MSH|^~\\&|PAS|RX1|CCG|RX1|20261207||ACK^A28^ACK|R1|P|{v}\r"


def _reply(body: str, version: str = "2.4") -> er7.Message:
    return er7.parse((MSH.format(v=version) + body).encode())


def test_the_table_holds_every_code_of_table_0357_and_no_other() -> None:
    codes = {c for c in v282.TABLES["HL70357"][1] if c.isdigit()} - {"0"}
    assert set(ack.TABLE_0357) == codes
    assert {c for c in v24.TABLES["HL70357"][1] if c.isdigit()} - {"0"} <= codes


@pytest.mark.parametrize("version", ["2.4", "2.5"])
def test_the_gateways_own_ack_builder_is_read_once(version: str) -> None:
    # messages.ack fills ERR-1 (ELD) and, from v2.5, ERR-3 too: one error, not two
    raw = messages.ack(messages.Header(sending_application="PAS", version=version), "R1",
                       acknowledges="C1", code="AE", error=("205", "duplicate"))
    assert ack.errors(er7.parse(raw)) == [ack.AckError("205", "E", None)]


def test_v24_eld_repetitions_with_locations() -> None:
    reply = _reply("MSA|AE|C1\rERR|PID^1^7^101&birth date missing&HL70357~"
                   "PID^1^8^103&sex X&HL70357\r")
    assert ack.errors(reply) == [ack.AckError("101", "E", "PID-7"),
                                 ack.AckError("103", "E", "PID-8")]


def test_v25_one_err_per_error_with_severity() -> None:
    reply = _reply("MSA|AE|C1\rERR||PID^1^3|205^Duplicate key identifier^HL70357|E\r"
                   "ERR|||0^Message accepted^HL70357|W||||address not verified\r", "2.5")
    assert ack.errors(reply) == [ack.AckError("205", "E", "PID-3"),
                                 ack.AckError("0", "W", None)]
    refused = ack.refusal("pas", "AE", reply, write="create", own_key=("PID", 3),
                          sensitive=[], correlation="C1")
    assert isinstance(refused, DuplicateKey) and not refused.others  # the warning is no reason
    assert refused.location == "PID-3" and refused.correlation == "C1"


def test_msa6_only_without_err() -> None:
    assert ack.errors(_reply("MSA|AR|C1|locked|||206^Application record locked\r")) == [
        ack.AckError("206", "E", None)]
    assert ack.errors(_reply("MSA|AE|C1|x|||206\rERR|^^^101&x&HL70357\r")) == [
        ack.AckError("101", "E", None)]


def test_free_text_is_never_taken_for_a_code_or_a_location() -> None:
    reply = _reply("MSA|AE|C1\rERR||SMITH JANE^1^3|SMITH JANE 9990000018^x^HL70357|E\r",
                   "2.5")
    assert ack.errors(reply) == [ack.AckError(None, "E", None)]
    refused = ack.refusal("pas", "AE", reply, write="create", own_key=None, sensitive=[],
                          correlation=None)
    assert isinstance(refused, BackendRejected)  # no code: the PAS's failure
    assert "SMITH" not in str(refused) and "9990000018" not in str(refused)


@pytest.mark.parametrize(("body", "write", "expected", "own"), [
    ("ERR|PID^1^3^204&x&HL70357", "update", UnknownKey, True),
    ("ERR|^^^204&x&HL70357", "update", UnknownKey, True),  # 0357: 204 is the record's own
    ("ERR|PD1^1^3^204&x&HL70357", "update", UnknownKey, False),
    ("ERR|PID^1^3^204&x&HL70357", "create", UnknownKey, False),  # an addition: a reference
    ("ERR|PID^1^7^104&x&HL70357", "create", InvalidValue, None),
    ("ERR|^^^206&x&HL70357", "create", BackendUnavailable, None),
    ("ERR|^^^206&x&HL70357", None, BackendUnavailable, None),
    ("ERR|^^^205&x&HL70357", None, BackendRejected, None),  # a query: the gateway's doing
    ("ERR|^^^Z99&x&HL70357", "create", BackendRejected, None),  # not in table 0357
    ("ERR|^^^205&x&HL70357~^^^207&x&HL70357", "create", BackendRejected, None),
])
def test_whose_fault(body: str, write: str | None, expected: type, own: bool | None) -> None:
    refused = ack.refusal("pas", "AE", _reply(f"MSA|AE|C1\r{body}\r"), write=write,  # type: ignore[arg-type]
                          own_key=("PID", 3), sensitive=[], correlation=None)
    assert type(refused) is expected
    if own is not None:
        assert isinstance(refused, UnknownKey) and refused.own is own
    if "Z99" in body:
        assert "Z99" in str(refused) and "not in HL7 table 0357" in str(refused)


def test_a_querys_refusal_keeps_the_pas_words_masked_a_writes_never() -> None:
    reply = _reply("MSA|AE|C1|pointer for SMITH expired\rERR|^^^102&pointer expired&HL70357\r")
    query = ack.refusal("pas", "AE", reply, write=None, own_key=None, sensitive=["SMITH"],
                        correlation=None)
    assert "expired" in str(query) and "SMITH" not in str(query)
    write = ack.refusal("pas", "AE", _reply("MSA|AE|C1|SMITH is missing a DOB\r"
                                            "ERR|PID^1^7^101&SMITH&HL70357\r"),
                        write="create", own_key=None, sensitive=[], correlation=None)
    assert isinstance(write, InvalidValue) and "SMITH" not in str(write)
