"""Searchset Bundles and their stateless, encrypted paging links.

A paging link carries everything needed to serve the next page: the position (the sort-key
values of the last record shown, or a backend continuation pointer) and a fingerprint of the
query. It is encrypted and authenticated (Fernet) with a key derived from the gateway's
paging secret: encrypted because the position can hold a date of birth or an internal key,
and URLs end up in proxy logs; authenticated so a tampered link, or one pasted onto a
different query, is rejected with 400. Any replica sharing the secret can serve it; nothing
is stored server-side. Links expire after ``PAGE_LINK_TTL`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import urlencode

import orjson
from cryptography.fernet import Fernet, InvalidToken

from gateway.errors import InvalidPageToken

PAGE_LINK_TTL = 24 * 3600


class Pager:
    def __init__(self, secret: str, ttl: int = PAGE_LINK_TTL) -> None:
        key = hashlib.sha256(b"careconnect-gateway.page:" + secret.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))
        self._ttl = ttl

    @staticmethod
    def fingerprint(resource_type: str, used: list[tuple[str, str]]) -> str:
        text = resource_type + "?" + urlencode(used)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def token(self, fingerprint: str, after: tuple[Any, ...], backwards: bool) -> str:
        payload = orjson.dumps([fingerprint, list(after), int(backwards)], default=str)
        return self._fernet.encrypt(payload).decode("ascii")

    def load(self, token: str, fingerprint: str) -> tuple[tuple[Any, ...], bool]:
        try:
            fp, after, backwards = orjson.loads(
                self._fernet.decrypt(token.encode("ascii"), ttl=self._ttl)
            )
        except (InvalidToken, UnicodeEncodeError, ValueError, TypeError):
            raise InvalidPageToken("the paging link is not valid (altered or expired)") from None
        if fp != fingerprint:
            raise InvalidPageToken("the paging link belongs to a different search")
        return tuple(after), bool(backwards)


def search_url(base: str, resource_type: str, used: list[tuple[str, str]] | str,
               page: str | None = None) -> str:
    """``used`` as pairs, or already urlencoded (a search's links all share it)."""
    query = used if isinstance(used, str) else urlencode(used)
    if page is not None:
        query += ("&" if query else "") + urlencode([("_page", page)])
    return f"{base}/{resource_type}" + (f"?{query}" if query else "")


def entry(base: str, resource: dict[str, Any], mode: str) -> dict[str, Any]:
    return {
        "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
        "resource": resource,
        "search": {"mode": mode},
    }


def searchset(
    *,
    bundle_id: str,
    links: list[tuple[str, str]],
    entries: list[dict[str, Any]],
    total: int | None,
    last_updated: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"lastUpdated": last_updated},
        "type": "searchset",
    }
    if total is not None:
        out["total"] = total
    out["link"] = [{"relation": rel, "url": url} for rel, url in links]
    if entries:
        out["entry"] = entries
    return out
