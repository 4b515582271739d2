"""Content negotiation (Accept, _format, _pretty) and rendering of FHIR JSON and XML."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from lxml import etree

from gateway.errors import NotAcceptable, NotFound
from gateway.formats import (
    DEFAULT,
    JSON_TYPES,
    XML_TYPES,
    Format,
    negotiate,
    render,
    to_xml,
)

FHIR_NS = "{http://hl7.org/fhir}"

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "100001",
    "meta": {"profile": ["https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Patient-1"]},
    "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}],
    "name": [{"use": "official", "family": "Brontë", "given": ["Charlotte"]}],
    "gender": "female",
    "birthDate": "1988-04-21",
}


def test_default_is_fhir_json() -> None:
    assert negotiate(None, None, None) == DEFAULT == Format("json", "application/fhir+json")
    assert negotiate("", None, None) == DEFAULT
    assert DEFAULT.content_type == "application/fhir+json; charset=utf-8"


@pytest.mark.parametrize("media_type", JSON_TYPES)
def test_every_json_media_type_is_echoed(media_type: str) -> None:
    assert negotiate(media_type, None, None) == Format("json", media_type)


@pytest.mark.parametrize("media_type", XML_TYPES)
def test_every_xml_media_type_is_echoed(media_type: str) -> None:
    assert negotiate(media_type, None, None) == Format("xml", media_type)


def test_the_stu3_era_media_types_are_served() -> None:
    assert {"application/json+fhir", "application/xml+fhir"} <= {*JSON_TYPES, *XML_TYPES}


@pytest.mark.parametrize(("accept", "media_type"), [
    ("*/*", "application/fhir+json"),
    ("application/*", "application/fhir+json"),
    ("text/*", "text/xml"),
    ("APPLICATION/FHIR+XML", "application/fhir+xml"),
    ("application/fhir+xml; fhirVersion=3.0; charset=utf-8", "application/fhir+xml"),
    ("text/html, application/fhir+json", "application/fhir+json"),
    # q-values: the highest wins ...
    ("application/fhir+xml;q=0.5, application/fhir+json;q=0.9", "application/fhir+json"),
    ("application/fhir+json;q=0.5, application/fhir+xml;q=0.9", "application/fhir+xml"),
    ("application/fhir+json; q=0.1, application/xml+fhir", "application/xml+fhir"),
    ("application/xml;q=0.9, */*;q=0.8", "application/xml"),
    ("application/fhir+xml;q=0.1, */*", "application/fhir+json"),
    # ... on a tie the first listed ...
    ("application/fhir+xml;q=0.7, application/fhir+json;q=0.7", "application/fhir+xml"),
    ("application/json, application/xml", "application/json"),
    # ... q=0 means "not this", and a malformed q counts as 0
    ("application/fhir+json;q=0, application/fhir+xml;q=0.1", "application/fhir+xml"),
    ("application/fhir+json;q=zero, application/xml+fhir;q=0.2", "application/xml+fhir"),
    # a browser: text/html cannot be served, the XML it also accepts can
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "application/xml"),
])
def test_accept(accept: str, media_type: str) -> None:
    fmt = negotiate(accept, None, None)
    assert fmt.media_type == media_type
    assert fmt.kind == ("xml" if "xml" in media_type else "json")
    assert not fmt.pretty


@pytest.mark.parametrize("accept", [
    "text/html",
    "image/png, text/plain",
    "application/pdf;q=1.0",
    "application/fhir+json;q=0",
    "application/fhir+json;q=0, application/fhir+xml;q=0.0",
    "*/*;q=0",
    "application/fhir+json;q=x",
])
def test_unacceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable) as err:
        negotiate(accept, None, None)
    assert err.value.status == 406
    assert err.value.error_code == "NOT_ACCEPTABLE"


@pytest.mark.parametrize(("param", "fmt"), [
    ("json", Format("json", "application/fhir+json")),
    ("xml", Format("xml", "application/fhir+xml")),
    ("application/fhir+json", Format("json", "application/fhir+json")),
    ("application/json+fhir", Format("json", "application/json+fhir")),
    ("application/fhir+xml", Format("xml", "application/fhir+xml")),
    ("application/xml+fhir", Format("xml", "application/xml+fhir")),
    ("application/json", Format("json", "application/json")),
    ("text/xml", Format("xml", "text/xml")),
    ("application/fhir xml", Format("xml", "application/fhir+xml")),  # an unencoded "+"
    (" xml ", Format("xml", "application/fhir+xml")),
])
def test_format_parameter(param: str, fmt: Format) -> None:
    assert negotiate(None, param, None) == fmt
    # _format overrides Accept, even an Accept the server could not satisfy
    assert negotiate("text/html", param, None) == fmt
    assert negotiate("application/fhir+json", param, None) == fmt


@pytest.mark.parametrize("param", ["html", "JSON", "turtle", "application/pdf", "ttl"])
def test_unknown_format_parameter(param: str) -> None:
    with pytest.raises(NotAcceptable):
        negotiate("application/fhir+json", param, None)


@pytest.mark.parametrize(("pretty", "expected"), [
    ("true", True), ("false", False), (None, False), ("1", False), ("yes", False),
])
def test_pretty(pretty: str | None, expected: bool) -> None:
    assert negotiate(None, None, pretty).pretty is expected
    assert negotiate("application/fhir+xml", None, pretty).pretty is expected
    assert negotiate(None, "xml", pretty).pretty is expected


def test_content_type_carries_the_charset() -> None:
    assert Format("xml", "application/xml+fhir").content_type == \
        "application/xml+fhir; charset=utf-8"


# --- rendering ---------------------------------------------------------------------------------


def test_render_json_compact_and_pretty() -> None:
    compact = render(PATIENT, DEFAULT)
    assert compact == orjson.dumps(PATIENT)
    assert b"\n" not in compact
    assert "Brontë".encode() in compact  # UTF-8, not \u escapes
    pretty = render(PATIENT, Format("json", "application/fhir+json", pretty=True))
    assert pretty.startswith(b'{\n  "resourceType": "Patient",\n  "id": "100001"')
    assert json.loads(pretty) == json.loads(compact) == PATIENT


def _xml(body: bytes) -> Any:
    return etree.fromstring(body)


def test_render_xml() -> None:
    body = render(PATIENT, Format("xml", "application/fhir+xml"))
    root = _xml(body)
    assert root.tag == FHIR_NS + "Patient"
    assert root.find(FHIR_NS + "id").get("value") == "100001"
    # FHIR XML element order, not dict order: id, meta, identifier, name, gender, birthDate
    children = [c.tag.removeprefix(FHIR_NS) for c in root]
    assert children == ["id", "meta", "identifier", "name", "gender", "birthDate"]
    family = root.find(f"{FHIR_NS}name/{FHIR_NS}family")
    assert family.get("value") == "Brontë"
    assert root.find(f"{FHIR_NS}identifier/{FHIR_NS}value").get("value") == "9990000018"


def test_render_xml_pretty() -> None:
    compact = render(PATIENT, Format("xml", "application/fhir+xml"))
    pretty = render(PATIENT, Format("xml", "application/fhir+xml", pretty=True))
    assert b"\n  <id value=\"100001\"/>" in pretty
    assert b"\n  <id" not in compact
    blank = etree.XMLParser(remove_blank_text=True)
    assert etree.tostring(etree.fromstring(pretty, blank)) == \
        etree.tostring(etree.fromstring(compact, blank))


def test_render_xml_bundle_and_outcome() -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": 1,
              "link": [{"relation": "self", "url": "http://x/Patient?a=1&b=2"}],
              "entry": [{"fullUrl": "http://x/Patient/100001", "resource": PATIENT,
                         "search": {"mode": "match"}}]}
    root = _xml(to_xml(bundle))
    assert root.tag == FHIR_NS + "Bundle"
    assert root.find(f"{FHIR_NS}link/{FHIR_NS}url").get("value") == "http://x/Patient?a=1&b=2"
    assert root.find(f"{FHIR_NS}entry/{FHIR_NS}resource/{FHIR_NS}Patient") is not None
    outcome = _xml(to_xml(NotFound("nothing here").outcome()))
    assert outcome.tag == FHIR_NS + "OperationOutcome"
    code = outcome.find(f"{FHIR_NS}issue/{FHIR_NS}details/{FHIR_NS}coding/{FHIR_NS}code")
    assert code.get("value") == "RESOURCE_NOT_FOUND"


def test_render_xml_rejects_what_is_not_fhir() -> None:
    with pytest.raises(ValueError):
        to_xml({"resourceType": "Patient", "gender": ["not", "a", "code"]})
