"""FHIR formats: content negotiation and rendering of JSON and XML.

JSON (the hot path) is rendered straight from plain dicts with orjson. XML is rendered by
fhir.resources' STU3 models, which know the element order FHIR XML requires; it is slower,
which is acceptable for the format few clients use. The response echoes the media type
flavour the client asked for (STU3-era ``application/json+fhir`` or ``application/fhir+json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from gateway.errors import NotAcceptable

JSON_TYPES = ("application/fhir+json", "application/json+fhir", "application/json", "text/json")
XML_TYPES = ("application/fhir+xml", "application/xml+fhir", "application/xml", "text/xml")
_FORMAT_PARAM = {
    "json": "application/fhir+json",
    "xml": "application/fhir+xml",
    **{t: t for t in JSON_TYPES + XML_TYPES},
}


@dataclass(frozen=True, slots=True)
class Format:
    kind: str  # "json" | "xml"
    media_type: str
    pretty: bool = False

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; charset=utf-8"


DEFAULT = Format("json", "application/fhir+json")


def _kind(media_type: str) -> str | None:
    if media_type in JSON_TYPES:
        return "json"
    if media_type in XML_TYPES:
        return "xml"
    return None


@lru_cache(maxsize=256)  # clients send a handful of distinct Accept headers, again and again
def negotiate(accept: str | None, format_param: str | None, pretty_param: str | None) -> Format:
    pretty = pretty_param == "true"
    if format_param:
        media = _FORMAT_PARAM.get(format_param.strip().replace(" ", "+"))
        if media is None:
            raise NotAcceptable("_format must be json, xml or a FHIR media type")
        return Format(_kind(media) or "json", media, pretty)
    if not accept:
        return Format("json", DEFAULT.media_type, pretty)
    offers: list[tuple[float, int, str]] = []
    refused: set[str] = set()
    for order, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        media = media.lower()
        if q <= 0:
            refused.add(media)
        else:
            offers.append((q, order, media))
    best: tuple[float, int, str] | None = None
    for q, order, media in offers:
        if media in ("*/*", "application/*", "text/*"):
            # A wildcard takes the first type we produce that was not refused by name.
            preferred = ("text/xml",) if media == "text/*" else (
                DEFAULT.media_type, "application/fhir+xml")
            media = next((m for m in preferred if m not in refused), "")
        if _kind(media) is None:
            continue
        if best is None or (q, -order) > (best[0], -best[1]):
            best = (q, order, media)
    if best is None:
        raise NotAcceptable(
            "this server produces application/fhir+json and application/fhir+xml"
        )
    return Format(_kind(best[2]) or "json", best[2], pretty)


def render(resource: dict[str, Any], fmt: Format) -> bytes:
    if fmt.kind == "json":
        return orjson.dumps(resource, option=orjson.OPT_INDENT_2 if fmt.pretty else 0)
    return to_xml(resource, fmt.pretty)


def to_xml(resource: dict[str, Any], pretty: bool = False) -> bytes:
    from fhir.resources.STU3 import get_fhir_model_class

    model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    out = model.model_dump_xml(pretty_print=pretty)
    return out if isinstance(out, bytes) else out.encode("utf-8")


def wants_html(accept: str | None, format_param: str | None) -> bool:
    """``_format=html`` or an Accept header that prefers HTML to the FHIR formats."""
    if format_param is not None:
        return format_param.strip().lower() in ("html", "text/html")
    accept = accept or ""
    best: tuple[float, int] | None = None
    html: tuple[float, int] | None = None
    for order, part in enumerate(accept.split(",")):
        media, *params = (p.strip().lower() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        key = (q, -order)
        if media in ("text/html", "application/xhtml+xml"):
            html = max(html, key) if html else key
        elif "fhir" in media or media in ("application/json", "application/xml"):
            best = max(best, key) if best else key
    return html is not None and (best is None or html > best)
