"""Merged patients (ADT^A34 / A40), answered at read time from the ADT store.

The PAS merged the retired id into the survivor; the backend behind the gateway (a SQL
database or the PAS itself) may still serve the retired record, or nothing. STU3 says the
retired Patient points at the survivor with ``link.type = replaced-by``, and a search by
the retired id finds the survivor. This layer, inside authentication, does both:

- ``GET [base]/Patient/{retired}`` answers a Patient with ``active: false`` and the link
  (no other data — the survivor is the record to read), to a principal allowed to read
  Patients through a user/system scope (patient-context tokens get the backend's answer);
- ``GET [base]/Patient?identifier=<id system>|{retired}`` and ``_id={retired}`` are rewritten
  to the survivor before the search runs.

Limits: the survivor's own read does not gain a ``replaces`` link; ids are the ones the ADT
mappings give (the PAS number), so a served mapping keyed on another id sees the merge only
through the identifier search.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.adt.store import AdtStore
from gateway.auth.principal import get_principal


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
            if rid and "/" not in rid and self._may_read(scope):
                survivor = await asyncio.to_thread(self.store.survivor_of, rid)
                if survivor is not None:
                    await self._retired(scope, send, rid, survivor)
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
