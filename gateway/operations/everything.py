"""``Patient/[id]/$everything`` (STU3): the patient's record, a page at a time.

The patient, then every resource of its compartment — every source of every type linked to
a patient by a mapping's Patient reference parameter — that the caller's scopes allow, in
type order, source order and key order; then the Practitioners, Organizations, Locations and
Medications they refer to (``search.mode = include``). ``start``/``end`` narrow by each
type's care date (record.CARE_DATE: ``date``, or Condition's ``onset-date`` else
``asserted-date``, ...; a type without one is not narrowed, and said so), ``_since`` by
``meta.lastUpdated``, ``_type`` to the listed types, ``_count`` sets the page size.

Paging is stateless, as for searches: the link holds the sections still to serve, in the
order they are asked, each with its keyset position (encrypted and signed), and is bound to
the patient, the parameters and the token's compartment. A page costs one statement per
section it reaches plus one per referenced type: never one per resource. An unknown patient
is 404; a patient-context token sees only its own patient (any other is 404, as a read is).
The audit trail gets one record for the patient, listing every type touched.

A source that does not answer (502/503/504) is never a silent gap, and never fails the
record by default — as a multi-source search:

* a section's source: the page goes on without it and says so in a ``SOURCE_UNAVAILABLE``
  warning entry naming the type and source (no patient data); the link keeps the section,
  at the end of what is left, so a later page asks it again and a walk to the end serves it
  once it answers. A page that has nothing left to ask but sections that still do not answer
  is their error (502/503/504): the walk never ends as if it were whole, and that page's
  link serves the rest when the source is back;
* the source of a referenced Practitioner/Organization/Location/Medication: the page comes
  without that source's resources and a warning naming the type and source (a type of
  several sources keeps the others');
* the patient's own source: nothing to answer, its 502/503/504.

The audit record lists only the types actually served. ``Prefer: handling=strict`` makes any
source's error the answer (an OperationOutcome with its 502/503/504).
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from gateway import audit, bundle, compartment
from gateway.auth import authorize
from gateway.bundle import Pager
from gateway.errors import GatewayError, InvalidParameter, NotFound, UnknownParameter
from gateway.operations import record
from gateway.operations.base import Context, Invocation, Operation, Parameter
from gateway.operations.params import input_pairs
from gateway.providers import Provider
from gateway.randomness import uuid4
from gateway.search import split_values

DEFINITION = "http://hl7.org/fhir/OperationDefinition/Patient-everything"
_KNOWN = frozenset({"start", "end", "_since", "_type", "_count", "_page", "_format", "_pretty"})


class Everything(Operation):
    name = "everything"
    levels = frozenset({"instance"})
    resource_types = ("Patient",)
    parameters = (
        Parameter("start", "date", documentation="Care date from (each type's care date)"),
        Parameter("end", "date", documentation="Care date to (each type's care date)"),
        Parameter("_since", "instant", documentation="Only resources updated since"),
        Parameter("_type", "code", max="*", documentation="Only these resource types"),
        Parameter("_count", "integer", documentation="Page size"),
        Parameter("return", "Bundle", use="out", min=1, documentation="A searchset Bundle"),
    )
    scopes = ("read of Patient; each other type is included only if the scopes allow reading "
              "it (patient/ scopes: the token's own patient only)")
    definition_url = DEFINITION

    async def run(self, ctx: Context, call: Invocation) -> Response:
        request, pid = call.request, call.rid
        assert pid is not None
        fmt = ctx.fmt(request)
        principal = authorize.require(request, "Patient", "r")
        strict = ctx.strict(request)  # unknown parameters
        whole = ctx.whole(request)  # a section's source failing fails the request
        s = ctx.settings
        pairs = await input_pairs(request, s.max_body_bytes)
        start = end = page_token = None
        since: dt.datetime | None = None
        types: set[str] | None = None
        count = s.default_count
        used: list[tuple[str, str]] = []
        ignored: list[str] = []
        for name, raw in pairs:
            if name not in _KNOWN:
                if strict:
                    raise UnknownParameter(f"unknown parameter '{name[:64]}' for $everything")
                ignored.append(name[:64])
                continue
            if name in ("_format", "_pretty"):
                continue
            if name == "_page":
                page_token = raw
                continue
            used.append((name, raw))
            if name == "start":
                start = record.parse_day(name, raw)
            elif name == "end":
                end = record.parse_day(name, raw)
            elif name == "_since":
                since = record.parse_since(raw)
            elif name == "_type":
                listed = {t.strip() for t in split_values(raw) if t.strip()}
                unknown = sorted(t for t in listed if t not in ctx.registry)
                if unknown:
                    raise InvalidParameter(f"'_type' names types this server does not serve: "
                                           f"{', '.join(u[:64] for u in unknown)}")
                types = listed if types is None else types & listed
            elif name == "_count":
                if not raw.isdigit() or int(raw) < 1:
                    raise InvalidParameter("'_count' must be a positive integer")
                count = min(int(raw), s.max_count)

        secs, denied = record.sections(ctx.registry, types, principal)
        base = ctx.base_url(request)
        path = f"Patient/{pid}/$everything"
        query = urlencode(used)
        extra = compartment.fingerprint_pairs()
        fingerprint = Pager.fingerprint(path, f"{query}&{urlencode(extra)}" if extra else query)
        # What is left to serve, in the order it is asked: (section, keyset position).
        queue: list[tuple[int, tuple[Any, ...] | None]] = [(i, None) for i in range(len(secs))]
        if page_token:
            position, _ = ctx.pager.load(page_token, fingerprint)
            queue = _queue(position, len(secs))

        asked = [secs[i] for i, _ in queue]
        plans = [record.section_plan(ctx.registry, source, pid, count, start=start, end=end,
                                     since=since) for source in asked]
        failures: dict[int, GatewayError] = {}
        # The patient and the queued sections until the page is full: on one connection
        # in one backend call where the adapter allows (record.walk); never more than one
        # statement per section.
        patient, pages = await record.walk(ctx.registry, pid, asked, plans,
                                           [after for _, after in queue], count, whole,
                                           failures)
        if patient is None:
            raise NotFound("Patient with that id was not found")
        if page_token and len(failures) == len(queue):
            # Nothing answered (as a multi-source search): the error is the answer, and
            # this page's link stays good for when the source is back.
            raise failures[min(failures)]
        served: list[dict[str, Any]] = []
        by_source: list[tuple[Provider, list[dict[str, Any]]]] = []
        if not page_token and (types is None or "Patient" in types):
            served.append(patient)
            by_source.append((record.patient_source(ctx.registry, pid), [patient]))
        touched: dict[str, None] = {"Patient": None}
        room = count
        rest: list[tuple[int, tuple[Any, ...] | None]] = []  # not reached, or not finished
        retry: list[tuple[int, tuple[Any, ...] | None]] = []  # did not answer: asked last
        for k, page in enumerate(pages):
            i, after = queue[k]
            source = secs[i]
            if k in failures:  # said so in a warning; a later page asks it again
                retry.append((i, after))
                continue
            if page is None or room == 0:
                rest.append((i, after))
                continue
            taken = page.records[:room]
            resources = source.resources(taken)
            served += resources
            by_source.append((source, resources))
            if taken:
                touched[source.resource_type] = None
            room -= len(taken)
            if len(taken) < len(page.records):  # the page is full inside this section
                rest.append((i, tuple(source.position(taken[-1], plans[k].sort))))
            elif page.more and page.end is not None:
                rest.append((i, tuple(page.end)))
        pending = rest + retry
        failed = [f"{record.failure(secs[queue[k][0]], exc)}; a later page asks it again"
                  for k, exc in sorted(failures.items())]
        entries = [bundle.entry(base, r, "match") for r in served]
        included = []
        unread: list[str] = []  # referenced types the scopes do not allow: said below
        if types is None or not types.isdisjoint(record.REFERENCED):
            gaps: list[str] = []
            wanted = record.referenced_by(by_source)
            unread = record.referenced_denied(ctx.registry, wanted, principal, types)
            included = await record.referenced_of(ctx.registry, wanted, principal, types,
                                                  None if whole else gaps)
            failed += [f"{g}; the resources of that type this page refers to are not included"
                       for g in gaps]
        entries += [bundle.entry(base, r, "include") for r in included]
        for r in included:
            touched[r["resourceType"]] = None
        notes = []
        if denied:
            notes.append(f"not included, as the client's scopes do not allow reading them: "
                         f"{', '.join(denied)}")
        if unread:
            notes.append(record.unread_note(unread))
        if ignored:
            notes.append(f"parameters ignored: {', '.join(sorted(set(ignored)))}")
        # Never silently broader than asked: say which types the dates could not narrow.
        if start or end:
            wide = sorted({s.resource_type for s in secs if not record.care_dates(s)})
            if wide:
                notes.append(f"start/end do not apply to (no care date): {', '.join(wide)}")
        if since is not None:
            wide = sorted({s.resource_type for s in secs
                           if record.since_criterion(s, since) is None})
            if wide:
                notes.append(f"_since does not apply to (no last-updated time): "
                             f"{', '.join(wide)}")
        entries += record.warnings(failed)
        entries += record.warnings(notes, "NOT_INCLUDED")

        links = [("self", bundle.search_url(base, path, query, page_token))]
        if pending:
            token = ctx.pager.token(fingerprint, tuple(
                [i, list(after) if after is not None else None] for i, after in pending), False)
            links.append(("next", bundle.search_url(base, path, query, token)))
        audit.note_operation("everything", pid, list(touched))
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        body = bundle.searchset(bundle_id=uuid4(), links=links, entries=entries, total=None,
                                last_updated=now)
        return ctx.respond(body, fmt)


def _queue(position: tuple[Any, ...], n: int) -> list[tuple[int, tuple[Any, ...] | None]]:
    """A paging link's sections still to serve, checked: ``[[section, position], ...]``; a
    link of the earlier form ``[section, position]`` (everything from that section on) is
    still read."""
    if len(position) == 2 and isinstance(position[0], int) and not isinstance(
            position[0], bool):  # the earlier form
        at, after = position
        if 0 <= at < n and (after is None or isinstance(after, list)):
            first = tuple(after) if after is not None else None
            return [(at, first)] + [(j, None) for j in range(at + 1, n)]
        raise InvalidParameter("the paging link is not valid")
    out: list[tuple[int, tuple[Any, ...] | None]] = []
    for item in position:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and not isinstance(item[0], bool) and 0 <= item[0] < n
                and (item[1] is None or isinstance(item[1], list))):
            raise InvalidParameter("the paging link is not valid")
        out.append((item[0], tuple(item[1]) if item[1] is not None else None))
    if not out or len({i for i, _ in out}) != len(out):
        raise InvalidParameter("the paging link is not valid")
    return out
