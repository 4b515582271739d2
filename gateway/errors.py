"""The gateway's error tree and its translation into FHIR OperationOutcome.

Every error a client can see is one of these classes. Each carries an HTTP status, a FHIR
``issue.code`` and a stable gateway error code (``details.coding``) that clients can switch
on. Messages must never contain PHI: they name parameters, types and codes, not values that
came from a patient record or from a search on one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

ERROR_CODE_SYSTEM = "https://careconnect-gateway.github.io/fhir/CodeSystem/gateway-error-code"


class GatewayError(Exception):
    status: ClassVar[int] = 500
    issue_code: ClassVar[str] = "exception"
    error_code: ClassVar[str] = "INTERNAL_SERVER_ERROR"
    severity: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        expression: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression
        self.headers = dict(headers or {})

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(
            [
                issue(
                    self.severity,
                    self.issue_code,
                    self.error_code,
                    self.message,
                    expression=self.expression,
                )
            ]
        )


def issue(
    severity: str,
    code: str,
    error_code: str,
    diagnostics: str,
    *,
    expression: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "severity": severity,
        "code": code,
        "details": {
            "coding": [{"system": ERROR_CODE_SYSTEM, "code": error_code, "display": diagnostics}]
        },
        "diagnostics": diagnostics,
    }
    if expression:
        out["expression"] = [expression]
        out["location"] = [expression]
    return out


def operation_outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": issues}


# --- 4xx: the request is at fault -------------------------------------------------------------


class BadRequest(GatewayError):
    status = 400
    issue_code = "invalid"
    error_code = "BAD_REQUEST"


class InvalidParameter(BadRequest):
    error_code = "INVALID_PARAMETER"


class UnknownParameter(BadRequest):
    issue_code = "not-supported"
    error_code = "UNKNOWN_PARAMETER"


class InvalidNHSNumber(BadRequest):
    error_code = "INVALID_NHS_NUMBER"


class InsufficientSearchCriteria(BadRequest):
    """Care Connect: a Patient search needs two parameters of different types."""

    issue_code = "required"
    error_code = "INSUFFICIENT_SEARCH_CRITERIA"


class InsufficientChainCriteria(InsufficientSearchCriteria):
    """Chained parameters into a type (``patient.family``) its own search policy refuses."""

    error_code = "INSUFFICIENT_CHAIN_CRITERIA"


class InvalidPageToken(BadRequest):
    error_code = "INVALID_PAGE_TOKEN"


class UnsupportedSearch(BadRequest):
    """A valid FHIR search that the system behind this resource cannot answer."""

    issue_code = "not-supported"
    error_code = "UNSUPPORTED_SEARCH"


class InvalidId(BadRequest):
    error_code = "INVALID_RESOURCE_ID"


class TooManyParameters(BadRequest):
    """More search parameters in one request than ``max_search_parameters``."""

    issue_code = "too-costly"
    error_code = "TOO_MANY_PARAMETERS"


class TooManyValues(BadRequest):
    """More comma-separated values in one parameter than ``max_values_per_parameter``, or
    more values in one query than the backend takes."""

    issue_code = "too-costly"
    error_code = "TOO_MANY_VALUES"


class SearchTooCostly(BadRequest):
    """The search's estimated cost is over ``search_cost_budget`` (gateway/cost.py)."""

    issue_code = "too-costly"
    error_code = "SEARCH_TOO_COSTLY"


class ResourceInvalid(GatewayError):
    """A resource sent to be written is not valid (→ 422, one issue per problem)."""

    status = 422
    issue_code = "invalid"
    error_code = "INVALID_RESOURCE"

    def __init__(self, problems: list[tuple[str, str]], **kw: Any) -> None:
        super().__init__(f"the resource is not valid ({len(problems)} problem(s))", **kw)
        self.problems = problems

    def outcome(self) -> dict[str, Any]:
        return operation_outcome([
            issue("error", self.issue_code, self.error_code, message, expression=path)
            for path, message in self.problems
        ])


def _with_others(error: GatewayError, others: tuple[GatewayError, ...],
                 expressions: tuple[str, ...]) -> dict[str, Any]:
    """``error``'s outcome located at ``expressions`` (every element the backend's field at
    fault feeds), then one issue for each further refusal of the same request."""
    out = GatewayError.outcome(error)
    if expressions:
        out["issue"][0]["expression"] = list(expressions)
        out["issue"][0]["location"] = list(expressions)
    for other in others:
        out["issue"] += other.outcome()["issue"]
    return out


class ResourceRejected(GatewayError):
    """The system behind the gateway refused the resource for its content — a value it needs
    missing, of the wrong type or not in its tables (HL7 0357 codes 101-104) — and wrote
    nothing. Further refusals of the same write follow as issues of their own."""

    status = 422
    issue_code = "invalid"
    error_code = "RESOURCE_REJECTED"

    def __init__(self, message: str, *, others: tuple[GatewayError, ...] = (),
                 expressions: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.others = others
        self.expressions = expressions

    def outcome(self) -> dict[str, Any]:
        return _with_others(self, self.others, self.expressions)


class UnknownReference(ResourceRejected):
    """A record the resource refers to (a GP, a ward, the patient of an admission) is not
    known to the system behind the gateway (HL7 0357 code 204); nothing was written."""

    issue_code = "not-found"
    error_code = "UNKNOWN_REFERENCE"


class DuplicateIdentifier(GatewayError):
    """The system behind the gateway already holds a record with an identifier sent (HL7 0357
    code 205: an NHS number already registered); nothing was written."""

    status = 409
    issue_code = "duplicate"
    error_code = "DUPLICATE_IDENTIFIER"

    def __init__(self, message: str, *, others: tuple[GatewayError, ...] = (),
                 expressions: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.others = others
        self.expressions = expressions

    def outcome(self) -> dict[str, Any]:
        return _with_others(self, self.others, self.expressions)


class PayloadTooLarge(GatewayError):
    status = 413
    issue_code = "too-costly"
    error_code = "PAYLOAD_TOO_LARGE"


class RequestTimeout(GatewayError):
    """The request body did not arrive within ``body_timeout_seconds``."""

    status = 408
    issue_code = "timeout"
    error_code = "REQUEST_TIMEOUT"


class PreconditionFailed(GatewayError):
    status = 412
    issue_code = "duplicate"
    error_code = "MULTIPLE_MATCHES"


class NotFound(GatewayError):
    status = 404
    issue_code = "not-found"
    error_code = "RESOURCE_NOT_FOUND"


class UnknownCode(NotFound):
    """``CodeSystem/$lookup`` of a code the code system does not define, or of a code system
    this server does not hold."""

    issue_code = "code-invalid"
    error_code = "UNKNOWN_CODE"


class ValueSetNotExpandable(GatewayError):
    """A ValueSet this server holds but cannot expand (or validate a code against) locally:
    an intensional definition (a SNOMED CT filter) or a code system not held here."""

    status = 422
    issue_code = "too-costly"
    error_code = "VALUESET_NOT_EXPANDABLE"


class UnknownResourceType(NotFound):
    issue_code = "not-supported"
    error_code = "UNKNOWN_RESOURCE_TYPE"


class MethodNotAllowed(GatewayError):
    status = 405
    issue_code = "not-supported"
    error_code = "METHOD_NOT_ALLOWED"


class NotAcceptable(GatewayError):
    status = 406
    issue_code = "not-supported"
    error_code = "NOT_ACCEPTABLE"


class UnsupportedMediaType(GatewayError):
    status = 415
    issue_code = "not-supported"
    error_code = "UNSUPPORTED_MEDIA_TYPE"


class NotImplementedInteraction(GatewayError):
    status = 501
    issue_code = "not-supported"
    error_code = "NOT_IMPLEMENTED"


# --- 5xx: the gateway or the system behind it is at fault -------------------------------------


class InternalError(GatewayError):
    """An unexpected failure. The message is generic; details go to the error log only."""


class UpstreamError(GatewayError):
    """The backend answered, but not usefully (bad data, rejected query)."""

    status = 502
    issue_code = "exception"
    error_code = "BACKEND_ERROR"


class UpstreamRejected(UpstreamError):
    """The backend refused the request (HL7 AE/AR): its reason, without patient data."""

    issue_code = "processing"
    error_code = "BACKEND_REJECTED"


class UnmappableData(UpstreamError):
    issue_code = "code-invalid"
    error_code = "UNMAPPED_SOURCE_CODE"


class ServiceUnavailable(GatewayError):
    status = 503
    issue_code = "transient"
    error_code = "BACKEND_UNAVAILABLE"


class GatewayTimeout(GatewayError):
    status = 504
    issue_code = "timeout"
    error_code = "BACKEND_TIMEOUT"
