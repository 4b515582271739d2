"""Every GatewayError: its HTTP status, FHIR issue code and stable gateway code, as a valid
STU3 OperationOutcome, directly and through the app's real error handlers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from gateway import errors
from gateway.errors import ERROR_CODE_SYSTEM, GatewayError, issue, operation_outcome
from gateway.formats import to_xml
from gateway.middleware import RequestContext, gateway_error_handler

pytestmark = pytest.mark.anyio

# class name → (HTTP status, FHIR issue type, stable gateway code). A new error class must be
# added here: test_every_error_class_is_listed fails otherwise.
EXPECTED: dict[str, tuple[int, str, str]] = {
    "GatewayError": (500, "exception", "INTERNAL_SERVER_ERROR"),
    "BadRequest": (400, "invalid", "BAD_REQUEST"),
    "InvalidParameter": (400, "invalid", "INVALID_PARAMETER"),
    "UnknownParameter": (400, "not-supported", "UNKNOWN_PARAMETER"),
    "InvalidNHSNumber": (400, "invalid", "INVALID_NHS_NUMBER"),
    "InsufficientSearchCriteria": (400, "required", "INSUFFICIENT_SEARCH_CRITERIA"),
    "InsufficientChainCriteria": (400, "required", "INSUFFICIENT_CHAIN_CRITERIA"),
    "InvalidPageToken": (400, "invalid", "INVALID_PAGE_TOKEN"),
    "UnsupportedSearch": (400, "not-supported", "UNSUPPORTED_SEARCH"),
    "InvalidId": (400, "invalid", "INVALID_RESOURCE_ID"),
    "TooManyParameters": (400, "too-costly", "TOO_MANY_PARAMETERS"),
    "TooManyValues": (400, "too-costly", "TOO_MANY_VALUES"),
    "SearchTooCostly": (400, "too-costly", "SEARCH_TOO_COSTLY"),
    "RequestTimeout": (408, "timeout", "REQUEST_TIMEOUT"),
    "PreconditionFailed": (412, "duplicate", "MULTIPLE_MATCHES"),
    "PayloadTooLarge": (413, "too-costly", "PAYLOAD_TOO_LARGE"),
    "ResourceInvalid": (422, "invalid", "INVALID_RESOURCE"),
    "ResourceRejected": (422, "invalid", "RESOURCE_REJECTED"),
    "UnknownReference": (422, "not-found", "UNKNOWN_REFERENCE"),
    "DuplicateIdentifier": (409, "duplicate", "DUPLICATE_IDENTIFIER"),
    "NotFound": (404, "not-found", "RESOURCE_NOT_FOUND"),
    "UnknownResourceType": (404, "not-supported", "UNKNOWN_RESOURCE_TYPE"),
    "UnknownCode": (404, "code-invalid", "UNKNOWN_CODE"),
    "ValueSetNotExpandable": (422, "too-costly", "VALUESET_NOT_EXPANDABLE"),
    "MethodNotAllowed": (405, "not-supported", "METHOD_NOT_ALLOWED"),
    "NotAcceptable": (406, "not-supported", "NOT_ACCEPTABLE"),
    "UnsupportedMediaType": (415, "not-supported", "UNSUPPORTED_MEDIA_TYPE"),
    "NotImplementedInteraction": (501, "not-supported", "NOT_IMPLEMENTED"),
    "InternalError": (500, "exception", "INTERNAL_SERVER_ERROR"),
    "UpstreamError": (502, "exception", "BACKEND_ERROR"),
    "UpstreamRejected": (502, "processing", "BACKEND_REJECTED"),
    "UnmappableData": (502, "code-invalid", "UNMAPPED_SOURCE_CODE"),
    "ServiceUnavailable": (503, "transient", "BACKEND_UNAVAILABLE"),
    "GatewayTimeout": (504, "timeout", "BACKEND_TIMEOUT"),
}

# http://hl7.org/fhir/STU3/valueset-issue-type.html
STU3_ISSUE_TYPES = {
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown",
    "expired", "forbidden", "suppressed", "processing", "not-supported", "duplicate",
    "not-found", "too-long", "code-invalid", "extension", "too-costly", "business-rule",
    "conflict", "incomplete", "transient", "lock-error", "no-store", "exception", "timeout",
    "throttled", "informational",
}


def all_error_classes() -> list[type[GatewayError]]:
    found: list[type[GatewayError]] = [GatewayError]
    i = 0
    while i < len(found):
        found += [c for c in found[i].__subclasses__() if c.__module__ == errors.__name__]
        i += 1
    return found


CLASSES = all_error_classes()
MESSAGE = "a message naming 'birthdate', never a value"


def make(cls: type[GatewayError], **kw: Any) -> GatewayError:
    if cls is errors.ResourceInvalid:  # one issue per problem: (element path, message)
        return errors.ResourceInvalid([("Patient.birthDate", MESSAGE)], **kw)
    return cls(MESSAGE, **kw)


def test_every_error_class_is_listed() -> None:
    assert sorted(c.__name__ for c in CLASSES) == sorted(EXPECTED)


def test_codes_are_stable_identifiers() -> None:
    codes = [c.error_code for c in CLASSES if c is not errors.InternalError]
    assert len(codes) == len(set(codes)), "two classes share a gateway error code"
    for c in CLASSES:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", c.error_code)
        assert c.issue_code in STU3_ISSUE_TYPES
        # a subclass refines its parent's code but keeps its status
        parent = c.__mro__[1]
        if parent is not GatewayError and issubclass(parent, GatewayError):
            assert c.status == parent.status, c


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_outcome_shape(cls: type[GatewayError]) -> None:
    status, issue_code, code = EXPECTED[cls.__name__]
    err = make(cls)
    assert (err.status, err.issue_code, err.error_code) == (status, issue_code, code)
    assert str(err) == err.message
    oo = err.outcome()
    expected_issue: dict[str, Any] = {
        "severity": "error",
        "code": issue_code,
        "details": {"coding": [{"system": ERROR_CODE_SYSTEM, "code": code, "display": MESSAGE}]},
        "diagnostics": MESSAGE,
    }
    if cls is errors.ResourceInvalid:
        expected_issue |= {"expression": ["Patient.birthDate"], "location": ["Patient.birthDate"]}
    assert oo == {"resourceType": "OperationOutcome", "issue": [expected_issue]}
    assert b"<OperationOutcome" in to_xml(oo)  # a valid STU3 resource


def test_resource_invalid_has_one_issue_per_problem() -> None:
    err = errors.ResourceInvalid([("Patient.gender", "not a code"),
                                  ("Patient.identifier[0].value", "not an NHS number")])
    assert err.message == "the resource is not valid (2 problem(s))"
    issues = err.outcome()["issue"]
    assert [i["expression"] for i in issues] == [["Patient.gender"],
                                                 ["Patient.identifier[0].value"]]
    assert {i["details"]["coding"][0]["code"] for i in issues} == {"INVALID_RESOURCE"}


def test_expression_locates_the_parameter() -> None:
    oo = errors.InvalidParameter("bad date", expression="birthdate").outcome()
    assert oo["issue"][0]["expression"] == ["birthdate"]
    assert oo["issue"][0]["location"] == ["birthdate"]
    assert "expression" not in errors.InvalidParameter("bad date").outcome()["issue"][0]


def test_headers_are_copied() -> None:
    given = {"Retry-After": "5"}
    err = errors.ServiceUnavailable("down", headers=given)
    given["Retry-After"] = "60"
    assert err.headers == {"Retry-After": "5"}
    assert errors.NotFound("x").headers == {}


def test_issue_and_outcome_helpers() -> None:
    warning = issue("warning", "not-supported", "UNKNOWN_PARAMETER", "ignored: colour")
    assert warning["severity"] == "warning"
    assert "expression" not in warning and "location" not in warning
    both = operation_outcome([warning, issue("information", "informational", "X", "y")])
    assert [i["severity"] for i in both["issue"]] == ["warning", "information"]
    assert b"<OperationOutcome" in to_xml(both)


# --- through the real exception handler --------------------------------------------------------


@pytest.fixture
async def raising() -> AsyncIterator[httpx.AsyncClient]:
    by_name = {c.__name__: c for c in CLASSES}

    async def endpoint(request: Request) -> None:
        cls = by_name[request.path_params["name"]]
        headers = {"Retry-After": "7"} if cls is errors.ServiceUnavailable else None
        raise make(cls, headers=headers)

    app = Starlette(routes=[Route("/raise/{name}", endpoint)],
                    middleware=[Middleware(RequestContext)],
                    exception_handlers={GatewayError: gateway_error_handler})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
async def test_handler_renders_every_error(raising: httpx.AsyncClient,
                                           cls: type[GatewayError]) -> None:
    status, issue_code, code = EXPECTED[cls.__name__]
    r = await raising.get(f"/raise/{cls.__name__}")
    assert r.status_code == status
    assert r.headers["content-type"] == "application/fhir+json; charset=utf-8"
    body = r.json()
    assert body["issue"][0]["code"] == issue_code
    assert body["issue"][0]["details"]["coding"][0]["code"] == code
    assert "x-request-id" in r.headers
    if cls is errors.ServiceUnavailable:
        assert r.headers["retry-after"] == "7"
    else:
        assert "retry-after" not in r.headers
