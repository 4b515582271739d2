"""Searchset Bundles and their stateless, signed paging links.

A paging link carries everything needed to serve the next page: the position (the sort-key
values of the last record shown) and a fingerprint of the query, signed with the gateway's
paging secret. Any replica sharing the secret can serve it; a tampered link, or one pasted
onto a different query, is rejected with 400. Nothing is stored server-side.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlencode

from itsdangerous import BadData, URLSafeSerializer

from gateway.errors import InvalidPageToken


class Pager:
    def __init__(self, secret: str) -> None:
        self._s = URLSafeSerializer(secret, salt="careconnect-gateway.page",
                                    serializer_kwargs={"default": str, "separators": (",", ":")})

    @staticmethod
    def fingerprint(resource_type: str, used: list[tuple[str, str]]) -> str:
        text = resource_type + "?" + urlencode(used)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def token(self, fingerprint: str, after: tuple[Any, ...], backwards: bool) -> str:
        return self._s.dumps([fingerprint, list(after), int(backwards)])

    def load(self, token: str, fingerprint: str) -> tuple[tuple[Any, ...], bool]:
        try:
            fp, after, backwards = self._s.loads(token)
        except (BadData, ValueError, TypeError):
            raise InvalidPageToken("the paging link is not valid (altered or expired)") from None
        if fp != fingerprint:
            raise InvalidPageToken("the paging link belongs to a different search")
        return tuple(after), bool(backwards)


def search_url(base: str, resource_type: str, used: list[tuple[str, str]],
               page: str | None = None) -> str:
    params = list(used)
    if page is not None:
        params.append(("_page", page))
    query = urlencode(params)
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
