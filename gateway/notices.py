"""The warnings and information the gateway puts in a successful answer, by stable code.

An error stops a request (``gateway.errors``: a ``GatewayError`` subclass per code); a notice
does not: it travels beside the result — an ``OperationOutcome`` entry of a searchset
(``search.mode = outcome``) or the body of a 202 — so a client knows the answer is partial,
narrowed or only accepted. Each code is registered here once, with its severity and FHIR
``issue.code``, and issued only through ``notice``: the README's table of them is generated
from ``NOTICES`` (``gateway.error_table``) and cannot drift from what is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import issue


@dataclass(frozen=True, slots=True)
class Notice:
    code: str
    severity: Literal["warning", "information"]
    issue_code: str
    """The FHIR ``OperationOutcome.issue.code``."""
    when: str
    """When a client sees it (the README's table)."""


NOTICES: dict[str, Notice] = {n.code: n for n in (
    Notice("SOURCE_UNAVAILABLE", "warning", "incomplete",
           "a source did not answer — one of several of a searched type, of an "
           "`_include`d/`_revinclude`d type (one of several or its only one: the page's "
           "matches are served), of a section of `$everything` or of a structured record, or "
           "of the Practitioners/Organizations/Locations/Medications an `$everything` page or "
           "a structured record refers to: the answer lacks its records, and the warning "
           "names the type, its mapping file and, for an include, which one (a search's or "
           "`$everything`'s next page asks it again; `Prefer: handling=strict`: its "
           "502/503/504 instead)"),
    Notice("SOURCE_NOT_SEARCHED", "warning", "incomplete",
           "a source of a multi-source type cannot answer the search as asked (an HL7 v2 "
           "source given no parameter it queries on): the answer lacks its records, on every "
           "page (`Prefer: handling=strict`: its 400 instead)"),
    Notice("INCLUDE_LIMIT", "warning", "too-costly",
           "an `_include` or `_revinclude` matched more than `CCG_INCLUDE_LIMIT` resources: "
           "only that many were included"),
    Notice("UNKNOWN_PARAMETER", "warning", "not-supported",
           "with `Prefer: handling=lenient`: search parameters ignored, named"),
    Notice("NOT_INCLUDED", "warning", "incomplete",
           "`$everything`: parameters ignored, types that `start`/`end`/`_since` could "
           "not narrow (returned whole), or types the token's scopes do not allow reading "
           "(the compartment's, and the Practitioners/Organizations/Locations/Medications "
           "the page refers to; in a structured record, those its sections refer to), named"),
    Notice("CHAIN_RESOLVED_BY_SEARCH", "information", "informational",
           "a chained parameter or `_has` was answered by searching its target first (on the "
           "first page; the self link gives what it found, and paging links page over it)"),
    Notice("MESSAGE_ACCEPTED", "information", "informational",
           "`$process-message?async=true` (202): the response message will be delivered to "
           "the response-url"),
)}


def notice(code: str, diagnostics: str, *, expression: str | None = None) -> dict[str, Any]:
    """One ``OperationOutcome.issue`` of a registered notice (KeyError: not registered)."""
    n = NOTICES[code]
    return issue(n.severity, n.issue_code, code, diagnostics, expression=expression)


__all__ = ["NOTICES", "Notice", "notice"]
