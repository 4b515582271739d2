"""Incoming resources: reading the body safely and checking it before anything is written.

A write is acknowledged or reported failed, never silently dropped: the body is parsed
(JSON, or XML without DTDs or entities), validated against the FHIR STU3 model and the Care
Connect rules the gateway can check itself, and reverse-mapped with every element that the
source cannot store reported. Only then does the adapter see it. Problems come back as one
422 OperationOutcome issue each, located by FHIRPath-style expression.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.requests import Request

from gateway import nhs_number
from gateway.errors import (
    BadRequest,
    GatewayTimeout,
    PayloadTooLarge,
    ResourceInvalid,
    UnsupportedMediaType,
)
from gateway.formats import JSON_TYPES, XML_TYPES

MAX_BODY_BYTES = 1024 * 1024
NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES and ctype not in XML_TYPES:
        raise UnsupportedMediaType("send application/fhir+json or application/fhir+xml")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    if ctype in JSON_TYPES:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the body is not a FHIR resource")
        return data
    return _xml_to_dict(body)


def _xml_to_dict(body: bytes) -> dict[str, Any]:
    # No DTD means no external entities and no entity-expansion bombs: refuse before parsing.
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise BadRequest("XML with a DOCTYPE or entities is not accepted")
    from fhir.resources.STU3 import get_fhir_model_class
    from lxml import etree
    from pydantic import ValidationError

    # FHIR is UTF-8 only; forcing it also keeps the DOCTYPE check above honest (a UTF-16
    # body would hide "<!DOCTYPE" from a byte search and have its entities expanded).
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, remove_comments=True, encoding="utf-8")
    try:
        root = etree.fromstring(body, parser=parser)
    except etree.XMLSyntaxError:
        raise BadRequest("the body is not well-formed XML") from None
    name = etree.QName(root).localname
    try:
        model = get_fhir_model_class(name)
    except (KeyError, ValueError):
        raise BadRequest("the XML root is not a FHIR STU3 resource") from None
    try:
        resource = model.model_validate_xml(body, xmlparser=parser)
    except ValidationError as exc:
        raise ResourceInvalid(_pydantic_problems(name, exc)) from None
    except Exception:  # lxml/fhir-core raise assorted errors on odd XML
        raise BadRequest("the XML is not a valid FHIR resource") from None
    from gateway.xml_order import order_problems

    misplaced = order_problems(root, resource, name)
    if misplaced:
        raise ResourceInvalid(misplaced)
    out: dict[str, Any] = orjson.loads(resource.model_dump_json())
    return out


def _pydantic_problems(resource_type: str, exc: Any) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        path = resource_type
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part not in ("__root__",):
                path += f".{part}"
        # Messages can quote the offending input; quotes are cut so no value is echoed.
        message = _QUOTED.sub("(value)", err["msg"])[:200]
        problems.append((path, message))
    return problems


def identifiers(resource: dict[str, Any]) -> list[Any]:
    """``identifier`` when it is a list; anything else is the structure check's error to
    report, not a list to walk."""
    found = resource.get("identifier")
    return found if isinstance(found, list) else []


def _unstated_verification_status(resource: dict[str, Any], resource_type: str) -> set[str]:
    """Where an NHS number carries no extension at all: Care Connect wants its verification
    status (1..1), but a PAS that does not state it (HL7 v2 without PID-32) gives the gateway
    none to serve, and what the gateway serves its own update must accept (a GET → PUT round
    trip). The status is never invented; a status that is sent is still checked."""
    out = set()
    for i, ident in enumerate(identifiers(resource)):
        if (isinstance(ident, dict) and ident.get("system") == NHS_NUMBER_SYSTEM
                and not ident.get("extension")):
            out.add(f"{resource_type}.identifier[{i}].extension")
    return out


def validate(resource: dict[str, Any], resource_type: str, profile: str | None = None) -> None:
    """STU3 structure (fhir.resources) plus the Care Connect profile (errors block; warnings
    do not); ``profile`` defaults to the one the resource claims, else its type's."""
    from fhir.resources.STU3 import get_fhir_model_class
    from pydantic import ValidationError

    from gateway.profiles.validator import validate as profile_issues

    if resource.get("resourceType") != resource_type:
        raise ResourceInvalid([(f"{resource_type}.resourceType",
                                f"must be {resource_type}")])
    problems: list[tuple[str, str]] = []
    try:
        get_fhir_model_class(resource_type).model_validate(resource)
    except ValidationError as exc:
        problems += _pydantic_problems(resource_type, exc)
    for i, ident in enumerate(identifiers(resource)):
        if not isinstance(ident, dict) or ident.get("system") != NHS_NUMBER_SYSTEM:
            continue
        value = ident.get("value")
        if not isinstance(value, str) or not nhs_number.is_valid(value):
            problems.append((f"{resource_type}.identifier[{i}].value",
                             "an NHS number must be 10 digits with a valid check digit"))
    reported = {path for path, _ in problems}  # one issue per place: STU3 first, then profile
    reported |= _unstated_verification_status(resource, resource_type)
    problems += [(i.expression, i.message) for i in profile_issues(resource, profile)
                 if i.severity == "error" and i.expression not in reported]
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ResourceInvalid(problems)


# --- the outcome of a write the backend may or may not have applied ---------------------------


class WriteOutcomeUnknown(GatewayTimeout):
    """The write was sent and no acknowledgement came back in time: it may have been applied.

    The safe retry is a conditional one: a create with ``If-None-Exist`` on the identifier
    sent (the NHS number) finds the first one if it was applied; an update is simply resent
    (it replaces the whole resource)."""

    error_code = "WRITE_OUTCOME_UNKNOWN"

    def __init__(self, interaction: str) -> None:
        retry = ("retry with If-None-Exist: identifier=<system>|<value> (the NHS number sent), "
                 "which returns the patient if the first create was applied"
                 if interaction == "create" else
                 "read the resource to see which version the system holds, or resend the "
                 "update (an update replaces the whole resource)")
        super().__init__(f"the {interaction} was sent but the system behind this server did "
                         f"not acknowledge it in time, so it MAY HAVE BEEN APPLIED; {retry}")


def not_read_back_warning(interaction: str) -> str:
    """The Warning header of a write the backend accepted but that could not be read back."""
    return (f'199 careconnect-gateway "the {interaction} was accepted by the system behind '
            'this server but could not be read back: the body is the resource as sent and '
            'mapped"')
