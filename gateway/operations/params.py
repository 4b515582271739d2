"""An operation's input parameters: the URL's query, and for POST a form or a ``Parameters``
resource (STU3 operations take either)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from gateway import writes
from gateway.errors import BadRequest

MAX_FORM_BYTES = 64 * 1024
_VALUE_KEYS = ("valueString", "valueCode", "valueDate", "valueDateTime", "valueInstant",
               "valueUri", "valueId")


async def input_pairs(request: Request, max_body_bytes: int) -> list[tuple[str, str]]:
    """(name, value) pairs in the order given: the URL's, then the body's."""
    pairs = list(request.query_params.multi_items())
    if request.method != "POST":
        return pairs
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise BadRequest("the operation's form is too large")
        try:
            return pairs + parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise BadRequest("the operation's form is not UTF-8") from None
    if not ctype and not request.headers.get("content-length", "0").strip("0"):
        return pairs  # POST with no body: the URL's parameters only
    resource = await writes.read_body(request, max_body_bytes)
    if resource.get("resourceType") != "Parameters":
        raise BadRequest("the operation takes a Parameters resource (or a form)")
    return pairs + _from_parameters(resource)


def parameter_list(resource: dict[str, Any]) -> list[Any]:
    """``Parameters.parameter``: a list, or absent (anything else is refused, not iterated)."""
    found = resource.get("parameter")
    if found is None:
        return []
    if not isinstance(found, list):
        raise BadRequest("Parameters.parameter is not a list")
    return found


def _from_parameters(resource: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for param in parameter_list(resource):
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            raise BadRequest("every Parameters.parameter needs a name")
        for key in (*_VALUE_KEYS, "valueInteger", "valueBoolean", "valuePositiveInt",
                    "valueUnsignedInt"):
            if key in param:
                value = param[key]
                if value is None or isinstance(value, (dict, list)):
                    raise BadRequest(f"parameter '{param['name'][:64]}' has no simple value")
                if isinstance(value, bool):
                    value = "true" if value else "false"
                out.append((param["name"], str(value)))
                break
        else:
            raise BadRequest(f"parameter '{param['name'][:64]}' has no simple value")
    return out
