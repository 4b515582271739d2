"""Merged patients (ADT^A34 / A40), answered at read time from the ADT store.

The PAS merged the retired id into the survivor; the backend behind the gateway (a SQL
database or the PAS itself) may still serve the retired record, or nothing. STU3 says the
retired Patient points at the survivor with ``link.type = replaced-by``, and a search by
the retired id finds the survivor. This layer, inside authentication, does both:

- ``GET [base]/Patient/{retired}`` answers a Patient with ``active: false`` and the link
  (no other data — the survivor is the record to read), to a principal allowed to read
  Patients through a user/system scope (patient-context tokens get the backend's answer);
- ``GET [base]/Patient/{survivor}``: the backend's Patient gains a ``link`` of type
  ``replaces`` to each retired id (the backend is asked for JSON; the answer is rendered in
  the format the client asked for);
- ``GET [base]/Patient?identifier=<id system>|{retired}`` and ``_id={retired}`` are rewritten
  to the survivor before the search runs.

Limits: the ``replaces`` links are added to the survivor's read, not to Patients in search
results; ids are the ones the ADT mappings give (the PAS number), so a served mapping keyed
on another id sees the merge only through the identifier search.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.adt.store import AdtStore
from gateway.auth.principal import get_principal
from gateway.errors import GatewayError
from gateway.formats import Format, negotiate, render


class MergeLayer:
    def __init__(self, app: ASGIApp, store: AdtStore, base_path: str, id_system: str) -> None:
        self.app = app
        self.store = store
        self.prefix = base_path.rstrip("/") + "/Patient"
        self.id_system = id_system

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith(self.prefix + "/"):
            rid = path[len(self.prefix) + 1:]
            if rid and "/" not in rid:
                survivor, replaced = await asyncio.to_thread(self.store.merge_links, rid)
                if survivor is not None and self._may_read(scope):
                    await self._retired(scope, send, rid, survivor)
                    return
                if replaced:
                    await self._survivor(scope, receive, send, replaced)
                    return
        elif path in (self.prefix, self.prefix + "/") and scope.get("query_string"):
            scope = await self._rewrite(scope)
        await self.app(scope, receive, send)

    def _may_read(self, scope: Scope) -> bool:
        principal = get_principal(scope)
        return principal is not None and principal.allows("Patient", "r") and \
            not principal.patient_restricted_for("Patient", "r")

    async def _retired(self, scope: Scope, send: Send, rid: str, survivor: str) -> None:
        body = orjson.dumps({"resourceType": "Patient", "id": rid, "active": False,
                             "link": [{"other": {"reference": f"Patient/{survivor}"},
                                       "type": "replaced-by"}]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/fhir+json; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body",
                    "body": body if scope["method"] == "GET" else b""})

    async def _survivor(self, scope: Scope, receive: Receive, send: Send,
                        replaced: list[str]) -> None:
        """The backend's read of a survivor, with ``replaces`` links to the retired ids.

        Only a 200 Patient is changed: whatever the backend refuses (authorisation, not
        found) passes through as it was, so the links disclose nothing it would not."""
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                          keep_blank_values=True)
        params = dict(query)
        try:
            fmt = negotiate(Headers(scope=scope).get("accept"), params.get("_format"),
                            params.get("_pretty"))
        except GatewayError:  # not acceptable: the app answers that
            await self.app(scope, receive, send)
            return
        inner: dict[str, Any] = dict(scope)
        inner["method"] = "GET"
        # the conditional read is ours to answer: the backend's validators do not change
        # when a merge adds a link
        inner["headers"] = [(k, v) for k, v in scope["headers"] if k not in (
            b"accept", b"if-none-match", b"if-modified-since")] + [
            (b"accept", b"application/fhir+json")]
        inner["query_string"] = urlencode(
            [(k, v) for k, v in query if k not in ("_format", "_pretty")]).encode("latin-1")
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(inner, receive, capture)
        body = b"".join(chunks)
        headers = MutableHeaders(raw=list(start.get("headers", [])))
        status = start.get("status", 500)
        if body and "json" in headers.get("content-type", ""):
            resource = orjson.loads(body)
            if status == 200 and resource.get("resourceType") == "Patient":
                _add_replaces(resource, replaced)
                if "etag" in headers:
                    seen = headers["etag"] + "|" + ",".join(replaced)
                    headers["etag"] = 'W/"' + hashlib.sha256(seen.encode()).hexdigest()[:16] + '"'
                    wanted = Headers(scope=scope).get("if-none-match", "")
                    if headers["etag"] in (t.strip() for t in wanted.split(",")):
                        status, body = 304, b""
            if status != 304:
                body = render(resource, fmt)
                headers["content-type"] = Format(fmt.kind, fmt.media_type).content_type
            headers["content-length"] = str(len(body))
        if status == 304:
            for name in ("content-type", "content-length"):
                if name in headers:
                    del headers[name]
        await send({"type": "http.response.start", "status": status,
                    "headers": headers.raw})
        await send({"type": "http.response.body",
                    "body": body if scope["method"] == "GET" else b""})

    async def _rewrite(self, scope: Scope) -> Scope:
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        changed = False
        out: list[tuple[str, str]] = []
        for name, value in pairs:
            if name in ("identifier", "_id"):
                values = []
                for v in value.split(","):
                    system, bar, code = v.rpartition("|")
                    if name == "_id" or (bar and system == self.id_system):
                        survivor = await asyncio.to_thread(self.store.survivor_of, code)
                        if survivor is not None:
                            v = f"{system}{bar}{survivor}"
                            changed = True
                    values.append(v)
                value = ",".join(values)
            out.append((name, value))
        if not changed:
            return scope
        new: dict[str, Any] = dict(scope)
        new["query_string"] = urlencode(out).encode("latin-1")
        return new


def _add_replaces(patient: dict[str, Any], replaced: list[str]) -> None:
    links: list[dict[str, Any]] = patient.setdefault("link", [])
    have = {(ln.get("type"), (ln.get("other") or {}).get("reference")) for ln in links}
    for rid in replaced:
        if ("replaces", f"Patient/{rid}") not in have:
            links.append({"other": {"reference": f"Patient/{rid}"}, "type": "replaces"})
