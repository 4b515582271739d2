"""The FHIR REST interactions: read, search (GET and POST _search), capabilities; health.

Handlers are thin: they negotiate the format, ask the registry for the provider, plan the
search and assemble the Bundle. Everything they raise is a GatewayError, turned into an
OperationOutcome by the error layer (gateway.middleware).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import replace
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import structlog
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from adapters.base import Page, Write
from gateway import bundle, chain, compartment, cost, explain, lifecycle, tracing, writes
from gateway.auth import authorize
from gateway.auth.capability import with_security
from gateway.binary import BinaryEndpoint
from gateway.bundle import Pager
from gateway.capability import capability_statement
from gateway.errors import (
    BadRequest,
    GatewayError,
    GatewayTimeout,
    InvalidPageToken,
    MethodNotAllowed,
    NotFound,
    NotImplementedInteraction,
    PreconditionFailed,
    UnsupportedMediaType,
    UnsupportedSearch,
    operation_outcome,
)
from gateway.formats import Format, negotiate, render, wants_html
from gateway.notices import notice
from gateway.operations import OperationRegistry
from gateway.operations.base import Invocation, Level
from gateway.plan import Include, RevInclude, SearchPlan, matches_exactly
from gateway.providers import Failed
from gateway.randomness import uuid4
from gateway.registry import Registry, TypeProvider, adapters
from gateway.reload import LiveMappings
from gateway.search import ID_RE
from gateway.settings import Settings
from gateway.terminology.provider import TerminologyProvider, search_bundle
from gateway.worker_status import supervisor_status

MAX_FORM_BYTES = 64 * 1024

log = structlog.get_logger("gateway.routes")

Missing = list[tuple[str, str, str, GatewayError]]
"""(include, included type, source name, error) of each source an include went without."""


class Api:
    def __init__(self, mappings: Registry | LiveMappings, settings: Settings, pager: Pager,
                 operations: OperationRegistry | None = None) -> None:
        # a plain registry (tests, tools) is one generation that never reloads
        self.mappings = mappings if isinstance(mappings, LiveMappings) else \
            LiveMappings(mappings, operations=operations)
        self.settings = settings
        self.pager = pager

    @property
    def registry(self) -> Registry:
        """The providers of the mappings this request started on (gateway/reload.py)."""
        return self.mappings.registry

    @property
    def operations(self) -> OperationRegistry:
        """The operations of the same generation as :attr:`registry`."""
        return self.mappings.operations

    # -- helpers

    def base_url(self, request: Request) -> str:
        if self.settings.public_base_url:
            return self.settings.public_base_url.rstrip("/")
        return str(request.base_url).rstrip("/") + self.settings.base_path

    @staticmethod
    def fmt(request: Request) -> Format:
        fmt: Format = negotiate(
            request.headers.get("accept"),
            request.query_params.get("_format"),
            request.query_params.get("_pretty"),
        )
        request.state.format = fmt
        return fmt

    @staticmethod
    def respond(body: dict[str, Any], fmt: Format, status: int = 200,
                headers: dict[str, str] | None = None) -> Response:
        return Response(render(body, fmt), status_code=status, headers=headers,
                        media_type=fmt.content_type)

    def strict(self, request: Request) -> bool:
        handling = _prefer_handling(request)
        return self.settings.strict_search if handling is None else handling == "strict"

    def whole(self, request: Request) -> bool:
        return _prefer_handling(request) == "strict"

    # -- interactions

    async def metadata(self, request: Request) -> Response:
        fmt = self.fmt(request)
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed("metadata supports GET", headers={"Allow": "GET"})
        statement = capability_statement(self.registry, self.base_url(request), self.operations,
                                         getattr(request.app.state, "capability_extra", ()))
        return self.respond(with_security(statement, self.settings), fmt)

    async def type_level(self, request: Request) -> Response:
        fmt = self.fmt(request)
        if (term := self.registry.terminology(request.path_params["type"])) is not None:
            if request.method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"{term.resource_type} supports GET here",
                                       headers={"Allow": "GET"})
            return self._terminology_search(request, term, list(request.query_params.multi_items()),
                                            fmt)
        provider = self.registry.get(request.path_params["type"])
        if request.method == "POST" and "create" in provider.interactions:
            return await self._create(request, provider, fmt)
        if request.method not in ("GET", "HEAD"):
            allowed = "GET, POST" if "create" in provider.interactions else "GET"
            raise MethodNotAllowed(
                f"{provider.resource_type} does not support {request.method} here",
                headers={"Allow": allowed},
            )
        pairs = list(request.query_params.multi_items())
        return await self._search(request, provider, pairs, fmt)

    async def search_post(self, request: Request) -> Response:
        fmt = self.fmt(request)
        term = self.registry.terminology(request.path_params["type"])
        provider = term or self.registry.get(request.path_params["type"])
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType(
                "POST _search takes application/x-www-form-urlencoded parameters"
            )
        # Before the body is read: a client without the scope never holds the server's
        # attention for as long as it takes to send one (issue 13).
        authorize.require(request, provider.resource_type, "s")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise BadRequest("the search form is too large")
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise BadRequest("the search form is not UTF-8") from None
        # Parameters in the URL and the body both count (FHIR STU3 3.1.1.3).
        pairs = [*request.query_params.multi_items(), *form]
        if term is not None:
            return self._terminology_search(request, term, pairs, fmt)
        assert not isinstance(provider, TerminologyProvider)
        return await self._search(request, provider, pairs, fmt)

    async def instance(self, request: Request) -> Response:
        fmt = self.fmt(request)
        rtype = request.path_params["type"]
        if rtype == "OperationDefinition" and rtype not in self.registry:
            return await self.operation_definition(request)  # this server's own operations
        if (term := self.registry.terminology(rtype)) is not None:
            return self._terminology_read(request, term, request.path_params["id"], fmt)
        provider = self.registry.get(rtype)
        rid = request.path_params["id"]
        if rid == "_search" and request.method in ("GET", "HEAD"):
            return await self._search(request, provider, list(request.query_params.multi_items()),
                                      fmt)
        if rid.startswith(("$", "_")):
            raise NotImplementedInteraction("this interaction is not supported by this server")
        if request.method == "PUT" and "update" in provider.interactions:
            return await self._update(request, provider, rid, fmt)
        if request.method not in ("GET", "HEAD"):
            allowed = "GET, PUT" if "update" in provider.interactions else "GET"
            raise MethodNotAllowed(
                f"{provider.resource_type}/[id] does not support {request.method}",
                headers={"Allow": allowed},
            )
        authorize.require(request, provider.resource_type, "r")
        resource = await provider.read(rid)
        if resource is None:
            raise NotFound(f"{provider.resource_type} with that id was not found")
        headers: dict[str, str] = {}
        updated = resource["meta"].get("lastUpdated")
        if updated:
            etag = 'W/"' + hashlib.sha256(updated.encode()).hexdigest()[:16] + '"'
            when = dt.datetime.fromisoformat(updated)
            headers["ETag"] = etag
            headers["Last-Modified"] = http_date(when)
            if _not_modified(request, etag, when):
                return Response(status_code=304, headers=headers)
        return self.respond(resource, fmt, headers=headers)

    async def operation(self, request: Request) -> Response:
        """``$name`` at system, type or instance level: dispatched to the operation registry."""
        if not (request.path_params["op"] == "$document" and wants_html(
                request.headers.get("accept"), request.query_params.get("_format"))):
            self.fmt(request)  # an HTML page of a document is negotiated by the operation
        params = request.path_params
        name = params["op"][1:]
        rtype, rid = params.get("type"), params.get("id")
        level: Level = "instance" if rid is not None else "type" if rtype else "system"
        term = self.registry.terminology(rtype)
        provider = self.registry.get(rtype) if rtype and term is None else None
        op = self.operations.find(name, level, rtype)
        if term is not None and op is not None and rtype not in (op.resource_types or ()):
            op = None  # an operation on every mapped type ($validate) is not a terminology one
        if op is None:
            raise NotImplementedInteraction(
                f"operation ${name} is not supported here" if name.isalnum() or "-" in name
                else "this operation is not supported here")
        if request.method not in op.methods:
            allowed = ", ".join(op.methods)
            raise MethodNotAllowed(f"${name} supports {allowed}", headers={"Allow": allowed})
        return await op.run(self, Invocation(request, level, provider, rid))

    # -- terminology (gateway.terminology: a provider kind of its own)

    def _terminology_read(self, request: Request, term: TerminologyProvider, rid: str,
                          fmt: Format) -> Response:
        if rid == "_search" and request.method in ("GET", "HEAD"):
            return self._terminology_search(request, term,
                                            list(request.query_params.multi_items()), fmt)
        if rid.startswith(("$", "_")):
            raise NotImplementedInteraction("this interaction is not supported by this server")
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{term.resource_type}/[id] supports GET",
                                   headers={"Allow": "GET"})
        authorize.require(request, term.resource_type, "r")
        resource = term.read(rid, self.base_url(request))
        if resource is None:
            raise NotFound(f"{term.resource_type} with that id was not found")
        return self.respond(resource, fmt)

    def _terminology_search(self, request: Request, term: TerminologyProvider,
                            pairs: list[tuple[str, str]], fmt: Format) -> Response:
        authorize.require(request, term.resource_type, "s")
        s = self.settings
        cost.check_size(pairs, s.max_search_parameters, s.max_values_per_parameter)
        return self.respond(search_bundle(term, pairs, self.base_url(request),
                                          self.strict(request)), fmt)

    async def operation_definition(self, request: Request) -> Response:
        """``OperationDefinition/[id]``: the definitions of this server's own operations."""
        fmt = self.fmt(request)
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed("OperationDefinition supports GET", headers={"Allow": "GET"})
        found = self.operations.definition(request.path_params["id"], self.base_url(request))
        if found is None:
            raise NotFound("OperationDefinition with that id was not found")
        return self.respond(found, fmt)

    async def deeper(self, request: Request) -> Response:
        """``[type]/[id]/_history``, ``[type]/[id]/$op`` and the like: recognised, not served."""
        self.fmt(request)
        if self.registry.terminology(request.path_params["type"]) is None:
            self.registry.get(request.path_params["type"])
        raise NotImplementedInteraction("this interaction is not supported by this server")

    # -- writes

    async def _create(self, request: Request, provider: TypeProvider, fmt: Format) -> Response:
        authorize.require(request, provider.resource_type, "c")
        if request.headers.get("if-none-exist"):  # a search that can answer with a match
            authorize.require(request, provider.resource_type, "s")
        resource = await writes.read_body(request, self.settings.max_body_bytes)
        writes.validate(resource, provider.resource_type, provider.profile)
        base = self.base_url(request)
        condition = request.headers.get("if-none-exist")
        if condition:
            # Conditional create: a resend of the same create finds the first one.
            pairs = parse_qsl(condition.split("?", 1)[-1], keep_blank_values=True)
            s = self.settings
            cost.check_size(pairs, s.max_search_parameters, s.max_values_per_parameter)
            plan = self.registry.plan(provider, pairs, default_count=2, max_count=2,
                                      strict=True)
            _check_cost(provider, plan, s.search_cost_budget)
            plan.count = 2
            found = await provider.search(plan)
            if len(found.records) > 1:
                raise PreconditionFailed("If-None-Exist matches more than one resource")
            if found.records:
                existing = provider.resource(found.records[0])
                location = f"{base}/{provider.resource_type}/{existing['id']}"
                return self.respond(authorize.written(request, provider.resource_type,
                                                      existing, "exists"),
                                    fmt, headers={"Location": location})
        record = provider.to_record(resource)
        try:
            result = await provider.write(Write("create", record))
        except GatewayTimeout as exc:  # sent, unanswered: it may have been applied
            raise writes.WriteOutcomeUnknown("create") from exc
        # Applied: from here on the answer is 201, whatever the read-back does.
        created, warning = await _read_back(provider, result.id, record, resource, "create")
        headers = {"Warning": warning} if warning else {}
        if result.id:
            headers["Location"] = f"{base}/{provider.resource_type}/{result.id}"
        body = authorize.written(request, provider.resource_type, created, "created")
        return self.respond(body, fmt, status=201, headers=headers)

    async def _update(self, request: Request, provider: TypeProvider, rid: str, fmt: Format
                      ) -> Response:
        authorize.require(request, provider.resource_type, "u")
        resource = await writes.read_body(request, self.settings.max_body_bytes)
        if resource.get("id") != rid:
            raise BadRequest("the resource id must match the id in the URL")
        writes.validate(resource, provider.resource_type, provider.profile)
        if await provider.read(rid) is None:
            raise NotFound(f"{provider.resource_type} with that id was not found "
                           "(this server does not create by update)")
        record = provider.to_record(resource)
        try:
            await provider.write(Write("update", record, id=rid))
        except GatewayTimeout as exc:
            raise writes.WriteOutcomeUnknown("update") from exc
        updated, warning = await _read_back(provider, rid, record, resource, "update")
        return self.respond(authorize.written(request, provider.resource_type, updated,
                                              "updated"), fmt,
                            headers={"Warning": warning} if warning else None)

    # -- search

    async def _search(
        self, request: Request, provider: TypeProvider, pairs: list[tuple[str, str]], fmt: Format
    ) -> Response:
        authorize.require(request, provider.resource_type, "s")
        s = self.settings
        cost.check_size(pairs, s.max_search_parameters, s.max_values_per_parameter)
        plan = self.registry.plan(provider, pairs, default_count=s.default_count,
                                  max_count=s.max_count, strict=self.strict(request),
                                  # a source failing: a partial page, unless asked for strict
                                  whole=self.whole(request))
        if "x-explain" in request.headers:  # an admin's diagnostic (before the cost check)
            explain.log_search_plan(request, self.registry, provider, plan, s)
        _check_cost(provider, plan, s.search_cost_budget)
        authorize.require_includes(request, self.registry, provider, plan)
        chains = chain.unresolved(plan)
        if chains and plan.page_token:
            # The links of such a search carry what its chains found, never the chains: this
            # is no link of ours (and a page token turns the search policy off).
            raise InvalidPageToken("the paging link is not valid: a chained parameter or "
                                   "_has beside _page (start the search again)")
        if chains:  # not joinable: their targets are searched first, and the links say so
            resolved = await chain.resolve_request(self.registry, provider, pairs, chains,
                                                   s.max_values_per_parameter)
            if resolved.pairs is None:
                chain.nothing(plan)
            else:
                plan = self.registry.plan(provider, resolved.pairs, note=False, policy=False,
                                          default_count=s.default_count,
                                          max_count=s.max_count, strict=self.strict(request),
                                          whole=self.whole(request))
                _check_cost(provider, plan, s.search_cost_budget)
            plan.notes = resolved.notes
        base = self.base_url(request)
        used = urlencode(plan.used)  # shared by the self, next and previous links
        # The compartment (patient/ tokens) is part of the query's identity: links cannot move.
        extra = compartment.fingerprint_pairs()
        # The sort as planned is part of it too: a link's position is a tuple of sort values,
        # meaningless under another sort (mappings reloaded with another key or _sort column).
        fingerprint = Pager.fingerprint(provider.resource_type,
                                        f"{used}&{urlencode(extra)}" if extra else used,
                                        sort=plan.sort)
        after: tuple[Any, ...] | None = None
        backwards = False
        if plan.page_token:
            after, backwards = self.pager.load(plan.page_token, fingerprint)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self_link = ("self", bundle.search_url(base, provider.resource_type, used,
                                               plan.page_token))
        outcome = _ignored_outcome(plan)

        if plan.summary_count or plan.count == 0:  # _count=0: just the total
            if plan.exact:  # the backend's count would include the case/accent variants
                raise UnsupportedSearch(
                    "a count cannot be given for a search with :exact: it is case- and "
                    "accent-sensitive on the served values, which the backend cannot count; "
                    "search without _summary=count (or _count=0)")
            total = await provider.count(plan)
            body = bundle.searchset(bundle_id=uuid4(), links=[self_link],
                                    entries=outcome, total=total, last_updated=now)
            return self.respond(body, fmt)

        page = await provider.search(plan, after, backwards)
        with tracing.traced("map page", {"fhir.resource_type": provider.resource_type,
                                         "ccg.records": len(page.records)}):
            matches = [provider.resource(r) for r in page.records]
        matched = page
        if plan.exact:  # :exact is case- and accent-sensitive on what is served
            keep = [matches_exactly(r, plan.exact) for r in matches]
            matches = [r for r, k in zip(matches, keep, strict=True) if k]
            # what the page includes is what it matched, not the backend's near misses
            # (the links still page from the page as read)
            matched = replace(page, records=[
                rec for rec, k in zip(page.records, keep, strict=True) if k])
        entries = [bundle.entry(base, r, "match") for r in matches]
        # bdl-7: a resource already in the Bundle as a match is not included again
        entries += await self._includes(provider, plan, matched, base,
                                        {(r["resourceType"], r["id"]) for r in matches},
                                        self.whole(request))
        entries += provider.page_outcome(page)  # a source that did not answer: said so
        entries += outcome

        links = [self_link]
        first_page = after is None
        if not first_page:  # the search again, from its beginning
            links.append(("first", bundle.search_url(base, provider.resource_type, used)))
        if page.records:
            has_next = page.more if not backwards else True
            has_prev = (not first_page) if not backwards else page.more
            if has_next and page.end is not None:
                links.append(("next", self._page_link(base, provider, used, fingerprint,
                                                      page.end, False)))
            if has_prev and page.start is not None:
                links.append(("previous", self._page_link(base, provider, used, fingerprint,
                                                          page.start, True)))
        # With :exact the backend matched case- and accent-insensitively, so its total (and
        # the page's record count) is only a bound: a total is given only when known exactly.
        found: int | None = None if plan.exact else page.total
        if found is None and plan.total != "none" and first_page and not page.more:
            found = len(matches)
        body = bundle.searchset(bundle_id=uuid4(), links=links, entries=entries,
                                total=found, last_updated=now)
        return self.respond(body, fmt)

    def _page_link(self, base: str, provider: TypeProvider, used: str, fingerprint: str,
                   position: tuple[Any, ...], backwards: bool) -> str:
        token = self.pager.token(fingerprint, position, backwards)
        return bundle.search_url(base, provider.resource_type, used, token)

    async def _includes(self, provider: TypeProvider, plan: SearchPlan, page: Page, base: str,
                        seen: set[tuple[str, str]], whole: bool) -> list[dict[str, Any]]:
        """The ``_include``d and ``_revinclude``d resources of a page. A source of an included
        type that does not answer (one of several, or the type's only one) is left out with
        a SOURCE_UNAVAILABLE warning, as in a multi-source type's own search: the page's
        matches are served (``whole``, asked-for strict: its error is the answer)."""
        if not page.records or not (plan.includes or plan.revincludes):
            return []
        limit = self.settings.include_limit
        out: list[dict[str, Any]] = []
        truncated: list[str] = []
        missing: Missing = []
        for inc in dict.fromkeys(plan.includes):  # a repeated _include is fetched once
            for resource in await self._include(provider, inc, page, limit, truncated,
                                                None if whole else missing):
                key = (resource["resourceType"], resource["id"])
                if key not in seen:
                    seen.add(key)
                    out.append(bundle.entry(base, resource, "include"))
        ids = [provider.record_id(r) for r in page.records]
        for rev in dict.fromkeys(plan.revincludes):
            for resource in await self._revinclude(provider, rev, ids, limit, truncated,
                                                   None if whole else missing):
                key = (resource["resourceType"], resource["id"])
                if key not in seen:
                    seen.add(key)
                    out.append(bundle.entry(base, resource, "include"))
        if truncated:  # never silently: say which includes were cut at the limit
            oo = operation_outcome([notice(
                "INCLUDE_LIMIT",
                f"{', '.join(dict.fromkeys(truncated))} matched more than {limit} resources; "
                f"only {limit} were included")])
            out.append({"resource": oo, "search": {"mode": "outcome"}})
        if missing:  # never a silent gap
            oo = operation_outcome([
                notice("SOURCE_UNAVAILABLE",
                       f"{rtype} source '{name}' did not answer ({exc.error_code}); {what} "
                       "lacks its records")
                for what, rtype, name, exc in missing])
            out.append({"resource": oo, "search": {"mode": "outcome"}})
        return out

    async def _include(self, provider: TypeProvider, inc: Include, page: Page, limit: int,
                       truncated: list[str], missing: Missing | None) -> list[dict[str, Any]]:
        targets = provider.params[inc.param].reference_targets()
        results: list[dict[str, Any]] = []
        for rtype in targets:
            if inc.target not in ("*", rtype) or rtype not in self.registry:
                continue
            ids = [v for r in page.records for v in provider.reference_ids(r, inc.param, rtype)]
            what = f"_include={provider.resource_type}:{inc.param}:{rtype}"
            if len({i for i in ids if ID_RE.match(i)}) > limit:
                truncated.append(what)
            failed: Failed | None = None if missing is None else []
            results += await self.registry.get(rtype).read_many(ids, limit, failed)
            _note(missing, failed, what, rtype)
        return results

    async def _revinclude(self, provider: TypeProvider, rev: RevInclude, ids: list[str],
                          limit: int, truncated: list[str], missing: Missing | None
                          ) -> list[dict[str, Any]]:
        source = self.registry.get(rev.source_type)
        prefixes = self.registry.id_prefixes(provider.resource_type)
        what = f"_revinclude={rev.source_type}:{rev.param}"
        failed: Failed | None = None if missing is None else []
        found, more = await source.revinclude(rev.param, provider.resource_type, ids, limit,
                                              prefixes, failed)
        _note(missing, failed, what, rev.source_type)
        if more:
            truncated.append(what)
        return found


def _note(missing: Missing | None, failed: Failed | None, what: str, rtype: str) -> None:
    """The sources an include went without, for the page's warning."""
    if missing is not None and failed:
        missing += [(what, rtype, name, exc) for name, exc in failed]


def _prefer_handling(request: Request) -> str | None:
    """``strict`` or ``lenient`` as the client's ``Prefer: handling`` says, or None."""
    for part in request.headers.get("prefer", "").split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "handling":
            handling = value.strip().strip('"').lower()
            if handling in ("strict", "lenient"):
                return handling
    return None


def _check_cost(provider: TypeProvider, plan: SearchPlan, budget: int) -> None:
    """Each source's own plan against the budget (one source: the plan itself)."""
    parts: list[SearchPlan] = getattr(plan, "parts", None) or [plan]
    for source, part in zip(provider.sources, parts, strict=True):
        cost.check_cost(part.criteria, source.key, budget)
        # a chain that cannot be joined runs as the other type's own search first
        for criteria, key in chain.deferred_searches(part):
            cost.check_cost(criteria, key, budget)


async def _read_back(provider: TypeProvider, rid: str, record: dict[str, Any],
                     resource: dict[str, Any], interaction: str
                     ) -> tuple[dict[str, Any], str | None]:
    """The written resource as the backend now serves it; if that read fails (the write is
    applied all the same), the resource as sent and mapped, with a Warning header value."""
    if rid:
        try:
            found = await provider.read(rid)
        except GatewayError:
            found = None
        if found is not None:
            return found, None
    shown: dict[str, Any] = {**resource, "id": rid} if rid else dict(resource)
    if rid:
        try:
            source = provider.sources[0]  # writes are offered only where a type has one
            shown = source.resource(source.as_record({**record, source.key: rid}))
        except Exception:  # the mapping cannot show it: the client's own resource will do
            log.warning("write_read_back_unmapped", resource_type=provider.resource_type)
    if not rid:
        shown.pop("id", None)
        return shown, (f'199 careconnect-gateway "the {interaction} was accepted by the '
                       'system behind this server, which did not say the new id: search '
                       'by the identifier sent"')
    return shown, writes.not_read_back_warning(interaction)


def _ignored_outcome(plan: SearchPlan) -> list[dict[str, Any]]:
    issues = [notice("CHAIN_RESOLVED_BY_SEARCH", note)
              for note in plan.notes]  # a chain answered by searching first (gateway.chain)
    if plan.ignored:
        names = ", ".join(sorted(set(plan.ignored)))
        issues.insert(0, notice("UNKNOWN_PARAMETER", f"search parameters ignored: {names}"))
    if not issues:
        return []
    return [{"resource": operation_outcome(issues), "search": {"mode": "outcome"}}]


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(when: dt.datetime) -> str:
    """RFC 9110 IMF-fixdate, as email.utils.format_datetime(usegmt=True), at a third of the cost
    (it is on every read)."""
    u = when.astimezone(dt.UTC)
    return (f"{_DAYS[u.weekday()]}, {u.day:02d} {_MONTHS[u.month - 1]} {u.year:04d} "
            f"{u.hour:02d}:{u.minute:02d}:{u.second:02d} GMT")


def _not_modified(request: Request, etag: str, when: dt.datetime) -> bool:
    inm = request.headers.get("if-none-match")
    if inm is not None:
        return any(t.strip() in (etag, "*") for t in inm.split(","))
    ims = request.headers.get("if-modified-since")
    if ims:
        try:
            since = parsedate_to_datetime(ims)
        except (TypeError, ValueError):
            return False
        if since.tzinfo is None:  # "-0000" parses naive: RFC 5322 says it is still UTC
            since = since.replace(tzinfo=dt.UTC)
        return when.replace(microsecond=0) <= since
    return False


async def health(request: Request) -> Response:
    """Liveness: this process answers. With ``--workers``, ``warn`` (still 200: the workers
    serving must not be restarted) while the supervisor has fewer workers serving than
    configured, e.g. a replacement that failed to start (gateway.workers)."""
    workers = supervisor_status()
    if workers is None:
        return JSONResponse({"status": "pass"})
    short = workers.get("serving", 0) < workers.get("workers", 0)
    return JSONResponse({"status": "warn" if short else "pass",
                         "checks": {"workers": "warn" if short else "pass"},
                         "workers": workers})


def ready_endpoint(mappings: Registry | LiveMappings, timeout: float = 5.0) -> Any:
    async def ready(request: Request) -> Response:
        if lifecycle.draining():  # shutting down: out of the load balancer before it stops
            return JSONResponse({"status": "fail", "checks": {"shutdown": "draining"}},
                                status_code=503)
        checks: dict[str, str] = {}
        registry = mappings.registry if isinstance(mappings, LiveMappings) else mappings
        for name, adapter in adapters(registry).items():
            try:
                with anyio.fail_after(timeout):
                    await adapter.ping()
                checks[name] = "pass"
            except Exception:  # readiness reports any failure; details are in the log
                checks[name] = "fail"
        ok = all(v == "pass" for v in checks.values())
        return JSONResponse({"status": "pass" if ok else "fail", "checks": checks},
                            status_code=200 if ok else 503)

    return ready


class _TypeName(Convertor[str]):
    regex = "[A-Z][A-Za-z]{1,63}"  # a FHIR resource type: never metadata, _search or $op

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _Id(_TypeName):
    regex = "[A-Za-z0-9.-]{1,64}"  # a FHIR id (ID_RE)


class _Op(_TypeName):
    regex = r"\$[A-Za-z][A-Za-z0-9-]{0,63}"  # an operation: $everything


register_url_convertor("fhir_type", _TypeName())
register_url_convertor("fhir_id", _Id())
register_url_convertor("fhir_op", _Op())


def routes(api: Api, registry: Registry | LiveMappings, base: str) -> list[BaseRoute]:
    every = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]
    binary = BinaryEndpoint(registry, api.settings)
    return [
        # Binary content (gateway.binary): not a provider, its own representation rules.
        Route(f"{base}/Binary/{{id}}", binary.handle, methods=every),
        # The two routes nearly every request takes, first: the router tries routes in order.
        # Their convertors cannot match what the routes below serve (metadata, _search,
        # $validate); anything else they do not match falls through to the same handlers.
        Route(f"{base}/{{type:fhir_type}}/{{id:fhir_id}}", api.instance, methods=every),
        Route(f"{base}/{{type:fhir_type}}", api.type_level, methods=every),
        Route("/_health", health, methods=["GET"]),
        Route("/_ready", ready_endpoint(registry), methods=["GET"]),
        Route(f"{base}/metadata", api.metadata, methods=every),
        Route(f"{base}/{{type}}/_search", api.search_post, methods=["POST"]),
        # Operations: one dispatcher for every level, to the operation registry.
        Route(f"{base}/{{op:fhir_op}}", api.operation, methods=every),
        Route(f"{base}/{{type:fhir_type}}/{{op:fhir_op}}", api.operation, methods=every),
        Route(f"{base}/{{type:fhir_type}}/{{id}}/{{op:fhir_op}}", api.operation, methods=every),
        Route(f"{base}/{{type}}", api.type_level, methods=every),
        Route(f"{base}/{{type}}/{{id}}", api.instance, methods=every),
        Route(f"{base}/{{type}}/{{id}}/{{rest:path}}", api.deeper, methods=every),
    ]
