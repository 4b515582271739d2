"""``Binary/[id]``: the content of a document, in its own media type or as a FHIR Binary.

A Binary has no metadata of its own here: it is the content of the record with the same id of
the one mapped type that declares ``binary:`` (the demo: DocumentReference over the EDMS
``DOCUMENTS`` table). So every Binary read is first a read of that resource, with all that
goes with it: the client needs ``read`` on Binary AND on that type, a ``patient/`` token's
compartment restricts the query (another patient's document is a 404, as for any read), and
the audit record names both, with the patient (gateway.audit).

Representation (FHIR STU3 Binary, the Care Connect explore page api_documents_binary):
``_format`` or an ``Accept`` naming a FHIR media type gives a FHIR Binary resource with the
content base64-encoded (capped at ``binary_fhir_max_bytes``: beyond it 406
``BINARY_TOO_LARGE``, and the native form stays available); anything else (no Accept,
``*/*``, the document's own type) streams the bytes as they are, with their media type.

Ranges (RFC 9110 §14) on the native form: ``Accept-Ranges: bytes`` is advertised; one range
``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` is answered 206 with ``Content-Range``, the slice
streamed like the whole; a range that starts beyond the content (or any range of empty
content) is 416 ``RANGE_NOT_SATISFIABLE`` (an OperationOutcome, with ``Content-Range: bytes
*/<size>``). ``If-Range`` with the strong ETag (or the Last-Modified date) applies the range
only while the content is unchanged; otherwise, and for several ranges, a range in another
unit or one that cannot be parsed, the Range header is ignored and the whole is sent (200),
as the RFC allows. A FHIR Binary is never served in parts.

Streaming never holds a document in memory: files are read in chunks; BLOBs are read a chunk
at a time (SQLite: incremental blob I/O; other databases: ``substring`` per chunk, which
PostgreSQL serves from the stored slices of an uncompressed ``bytea``). A file path from the
database is resolved under the document root and refused if it leads anywhere else.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import sqlalchemy as sa
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from adapters.base import BackendError
from gateway import audit
from gateway.auth import authorize
from gateway.errors import (
    GatewayError,
    InvalidId,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    UnknownResourceType,
    UpstreamError,
)
from gateway.formats import Format, negotiate, render
from gateway.providers import translate_backend_error
from gateway.search import ID_RE

if TYPE_CHECKING:
    from gateway.providers import Provider
    from gateway.registry import Registry
    from gateway.settings import Settings

security_log = structlog.get_logger("gateway.security")
log = structlog.get_logger("gateway.binary")

CHUNK = 256 * 1024
BINARY = "Binary"
_FHIR_TYPES = {
    "application/fhir+json": "json", "application/json+fhir": "json",
    "application/fhir+xml": "xml", "application/xml+fhir": "xml",
}


class BinaryTooLarge(NotAcceptable):
    error_code = "BINARY_TOO_LARGE"


class ContentUnavailable(UpstreamError):
    """The record exists but its content cannot be read (a missing file, a refused path)."""

    error_code = "DOCUMENT_CONTENT_UNAVAILABLE"


class RangeNotSatisfiable(GatewayError):
    """The Range asked for lies outside the content (416, with ``Content-Range: bytes */n``)."""

    status = 416
    issue_code = "invalid"
    error_code = "RANGE_NOT_SATISFIABLE"


class BinaryMisconfigured(GatewayError):
    status = 500
    issue_code = "exception"
    error_code = "BINARY_NOT_CONFIGURED"


@dataclass(frozen=True)
class _Located:
    media_type: str
    size: int
    path: Path | None  # a file under the document root
    blob_key: Any  # else the BLOB row's key


class ContentStore:
    """The bytes behind one mapped type's records (its mapping's ``binary:`` block)."""

    def __init__(self, provider: Provider, document_root: Path | None) -> None:
        from adapters.sql import SqlAdapter

        spec = provider.mapping.spec
        conf = spec.binary
        adapter = provider.mapping.adapter
        if conf is None or not isinstance(adapter, SqlAdapter):
            raise BinaryMisconfigured("binary content is served from SQL sources only")
        self.provider = provider
        self.adapter = adapter
        self.engine = adapter.engine
        self.root = document_root.resolve() if document_root is not None else None
        key = provider.key.split(".", 1)[-1]
        main = sa.table(spec.source["table"], sa.column(key),
                        *(sa.column(c.split(".", 1)[-1]) for c in (conf.media_type, conf.file)
                          if c))
        self._key_col = main.c[key]
        self._media_col = main.c[conf.media_type.split(".", 1)[-1]]
        self._file_col = main.c[conf.file.split(".", 1)[-1]] if conf.file else None
        self._main = main
        self._blob: sa.TableClause | None = None
        if conf.blob is not None:
            self._blob = sa.table(conf.blob.table, sa.column(conf.blob.key),
                                  sa.column(conf.blob.column))
            self._blob_key = self._blob.c[conf.blob.key]
            self._blob_col = self._blob.c[conf.blob.column]
            self._blob_names = (conf.blob.table, conf.blob.column)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking database work on the connection's own workers (its pool size and
        timeout), its errors translated like a search's."""
        try:
            return await self.adapter.run(fn, *args)
        except BackendError as exc:
            raise translate_backend_error(exc) from exc

    # -- where the content is (blocking: run on the connection's workers)

    def locate(self, rid: str) -> _Located | None:
        key = self.provider.parse_keys(self.provider.key, [rid])
        if not key:
            return None
        cols = [self._media_col] + ([self._file_col] if self._file_col is not None else [])
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*cols).where(self._key_col == key[0])).first()
            if row is None:
                return None
            media = str(row[0] or "application/octet-stream")
            rel = row[1] if self._file_col is not None else None
            if rel:
                path = self._resolve(str(rel))
                try:
                    size = path.stat().st_size
                except OSError:
                    raise ContentUnavailable("the document's content is missing from the "
                                             "document store") from None
                return _Located(media, size, path, None)
            if self._blob is None:
                raise ContentUnavailable("the document has no content")
            length = conn.execute(sa.select(sa.func.length(self._blob_col))
                                  .where(self._blob_key == key[0])).scalar()
            if length is None:
                raise ContentUnavailable("the document has no content")
            return _Located(media, int(length), None, key[0])

    def _resolve(self, rel: str) -> Path:
        if self.root is None:
            raise BinaryMisconfigured("no document root is configured (CCG_DOCUMENT_DIR)")
        candidate = (self.root / rel).resolve()
        # An absolute path, "..", or a symlink out of the root: never read.
        if "\x00" in rel or os.path.isabs(rel) or not candidate.is_relative_to(self.root):
            security_log.warning("document_path_refused", resource_type=BINARY)
            raise ContentUnavailable("the document's content location is not in the "
                                     "document store")
        return candidate

    # -- the bytes, a chunk at a time

    async def chunks(self, where: _Located, start: int = 0, length: int | None = None
                     ) -> AsyncIterator[bytes]:
        """The content from byte ``start``, ``length`` bytes (to the end when None)."""
        end = where.size if length is None else min(where.size, start + length)
        if where.path is not None:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
            fd = await anyio.to_thread.run_sync(os.open, where.path, flags)
            with os.fdopen(fd, "rb", buffering=0) as f:
                if start:
                    await anyio.to_thread.run_sync(f.seek, start)
                left = None if length is None else end - start
                while left is None or left > 0:
                    n = CHUNK if left is None else min(CHUNK, left)
                    chunk = await anyio.to_thread.run_sync(f.read, n)
                    if not chunk:
                        break
                    if left is not None:
                        left -= len(chunk)
                    yield chunk
            return
        offset = start
        while offset < end:
            n = min(CHUNK, end - offset)
            chunk = await self.run(self._blob_slice, where.blob_key, offset, n)
            if not chunk:
                break
            yield chunk
            offset += len(chunk)

    def _blob_slice(self, key: Any, offset: int, n: int) -> bytes:
        assert self._blob is not None
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                # Incremental blob I/O: substr() would load the whole BLOB for every chunk.
                table, column = self._blob_names
                rowid = conn.execute(sa.select(sa.literal_column("rowid"))
                                     .select_from(self._blob)
                                     .where(self._blob_key == key)).scalar()
                if rowid is None:
                    return b""
                raw = conn.connection.driver_connection
                assert raw is not None
                with raw.blobopen(table, column, rowid, readonly=True) as blob:
                    blob.seek(offset)
                    return bytes(blob.read(n))
            value = conn.execute(sa.select(sa.func.substring(self._blob_col, offset + 1, n))
                                 .where(self._blob_key == key)).scalar()
            return bytes(value or b"")


@runtime_checkable
class _Live(Protocol):
    """gateway.reload.LiveMappings: the registry of the request being served."""

    @property
    def registry(self) -> Registry: ...


class BinaryEndpoint:
    def __init__(self, registry: Registry | _Live | None, settings: Settings) -> None:
        self.settings = settings
        self._source = registry
        self._stores: tuple[Registry, ContentStore | None] | None = None
        self._store_for(self._registry())  # a misconfiguration refuses to start

    def _registry(self) -> Registry | None:
        src = self._source
        if src is None:
            return None
        # a Registry, or the live mappings (gateway.reload) whose registry a reload replaces
        return src.registry if isinstance(src, _Live) else src

    def _store_for(self, registry: Registry | None) -> ContentStore | None:
        """The content store of ``registry`` (a reload makes a new one, with its providers)."""
        if registry is None:
            return None
        if self._stores is not None and self._stores[0] is registry:
            return self._stores[1]
        # Per source: a type may be several (gateway.multisource); only one may hold content.
        owners = [p for p in registry.sources() if p.mapping.spec.binary is not None]
        if len(owners) > 1:  # Binary ids would be ambiguous
            raise BinaryMisconfigured("more than one mapping declares binary:")
        store = (ContentStore(owners[0], document_root(self.settings, owners[0])) if owners
                 else None)
        self._stores = (registry, store)
        return store

    @property
    def store(self) -> ContentStore | None:
        return self._store_for(self._registry())

    async def handle(self, request: Request) -> Response:
        fhir = _wants_fhir(request)
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed("Binary/[id] supports GET", headers={"Allow": "GET"})
        store = self.store
        if store is None:
            raise UnknownResourceType("this server does not serve resource type 'Binary'")
        owner = store.provider
        authorize.require(request, BINARY, "r")
        authorize.require(request, owner.resource_type, "r")
        rid = request.path_params["id"]
        if not ID_RE.match(rid):
            raise InvalidId("the resource id is not valid (1-64 of A-Z a-z 0-9 - .)")
        resource = await owner.read(rid)  # compartment and audit apply here
        if resource is None:
            raise NotFound("Binary with that id was not found")
        audit.note_alias(owner.resource_type, rid, BINARY, rid)
        where = await store.run(store.locate, rid)
        if where is None:
            raise NotFound("Binary with that id was not found")
        updated = resource.get("meta", {}).get("lastUpdated")
        headers = _validators(resource, where, updated)
        if fhir is not None:
            return await self._fhir(request, store, rid, resource, where, fhir, headers)
        if _not_modified(request, headers):
            return Response(status_code=304, headers=headers)
        if not _accepts(request.headers.get("accept"), where.media_type):
            raise NotAcceptable(f"this document is available as {where.media_type} or as a "
                                "FHIR Binary (application/fhir+json, application/fhir+xml)")
        headers["Accept-Ranges"] = "bytes"
        headers["X-Content-Type-Options"] = "nosniff"
        wanted = _range(request, headers, where.size)
        request.scope.setdefault("state", {})["stream_response"] = True  # gateway.audit
        if wanted is None:
            headers["Content-Length"] = str(where.size)
            return StreamingResponse(store.chunks(where), media_type=where.media_type,
                                     headers=headers)
        first, last = wanted
        headers["Content-Length"] = str(last - first + 1)
        headers["Content-Range"] = f"bytes {first}-{last}/{where.size}"
        return StreamingResponse(store.chunks(where, first, last - first + 1), status_code=206,
                                 media_type=where.media_type, headers=headers)

    async def _fhir(self, request: Request, store: ContentStore, rid: str,
                    resource: dict[str, Any], where: _Located, fmt: Format,
                    headers: dict[str, str]) -> Response:
        limit = self.settings.binary_fhir_max_bytes
        if where.size > limit:
            raise BinaryTooLarge(
                f"the document is {where.size} bytes, more than the {limit} this server "
                f"returns inside a FHIR Binary; ask for {where.media_type} (or */*) to "
                "receive it as it is")
        data = bytearray()
        async for chunk in store.chunks(where):
            data += chunk
            if len(data) > limit:  # grew since it was measured
                raise BinaryTooLarge("the document is larger than this server returns "
                                     "inside a FHIR Binary")
        body: dict[str, Any] = {
            "resourceType": BINARY, "id": rid,
            "meta": {k: v for k, v in resource.get("meta", {}).items() if k == "lastUpdated"},
            "contentType": where.media_type,
            "securityContext": {"reference": f"{store.provider.resource_type}/{rid}"},
            "content": base64.b64encode(bytes(data)).decode("ascii"),
        }
        if not body["meta"]:
            del body["meta"]
        weak = 'W/"' + hashlib.sha256(
            (headers.get("ETag", "") + fmt.kind).encode()).hexdigest()[:16] + '"'
        headers = {**headers, "ETag": weak}
        if _not_modified(request, headers):
            return Response(status_code=304, headers=headers)
        return Response(render(body, fmt), media_type=fmt.content_type, headers=headers)


def _wants_fhir(request: Request) -> Format | None:
    """The FHIR format asked for (``_format``, or a FHIR media type in Accept), else None."""
    params = request.query_params
    if params.get("_format"):
        fmt = negotiate(None, params.get("_format"), params.get("_pretty"))
        request.state.format = fmt
        return fmt
    best: tuple[float, str] | None = None
    native = 0.0
    for part in (request.headers.get("accept") or "").split(","):
        media, *rest = (p.strip() for p in part.split(";"))
        q = _q(rest)
        kind = _FHIR_TYPES.get(media.lower())
        if kind is not None and q > 0 and (best is None or q > best[0]):
            best = (q, media.lower())
        elif kind is None and media:
            native = max(native, q)
    if best is None or best[0] < native:
        return None
    fmt = negotiate(best[1], None, params.get("_pretty"))
    request.state.format = fmt
    return fmt


def _q(params: list[str]) -> float:
    for p in params:
        if p.startswith("q="):
            try:
                return float(p[2:])
            except ValueError:
                return 0.0
    return 1.0


def _accepts(accept: str | None, media_type: str) -> bool:
    if not accept:
        return True
    main = media_type.split("/", 1)[0]
    for part in accept.split(","):
        media, *rest = (p.strip().lower() for p in part.split(";"))
        if media in ("*/*", f"{main}/*", media_type.lower()) and _q(rest) > 0:
            return True
    return False


def _validators(resource: dict[str, Any], where: _Located, updated: str | None
                ) -> dict[str, str]:
    headers: dict[str, str] = {}
    content = resource.get("content") or [{}]
    digest = (content[0].get("attachment") or {}).get("hash")
    if digest:  # the EDMS's SHA-1 of the content: a strong validator of these bytes
        headers["ETag"] = '"' + digest.rstrip("=").replace("/", "_").replace("+", "-") + '"'
    if updated:
        headers["Last-Modified"] = format_datetime(
            dt.datetime.fromisoformat(updated).astimezone(dt.UTC), usegmt=True)
    return headers


_RANGE = re.compile(r"^bytes=(?:(\d{1,18})-(\d{0,18})|-(\d{1,18}))$")


def _range(request: Request, headers: dict[str, str], size: int) -> tuple[int, int] | None:
    """The one byte range to send (first, last, inclusive), or None for the whole content;
    :class:`RangeNotSatisfiable` for a range outside it."""
    text = request.headers.get("range")
    if text is None or request.method not in ("GET", "HEAD"):
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and not _if_range_holds(if_range.strip(), headers):
        return None  # the content changed since the client's part: all of it, afresh
    m = _RANGE.match(text.strip().replace(" ", ""))
    if m is None:  # another unit, several ranges, or not a range at all: ignored (RFC 9110)
        return None
    first, last, suffix = m.groups()
    if suffix is not None:
        n = int(suffix)
        if n == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # not a valid range: ignored
    if start >= size:
        raise _unsatisfiable(size)
    return start, min(int(last) if last else size - 1, size - 1)


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(f"the range asked for is outside the content ({size} bytes)",
                               headers={"Content-Range": f"bytes */{size}"})


def _if_range_holds(validator: str, headers: dict[str, str]) -> bool:
    """If-Range: a strong ETag equal to the current one, or the Last-Modified date."""
    if validator.startswith(('"', "W/")):
        etag = headers.get("ETag")
        return bool(etag) and not validator.startswith("W/") and validator == etag
    return validator == headers.get("Last-Modified")


def _not_modified(request: Request, headers: dict[str, str]) -> bool:
    inm = request.headers.get("if-none-match")
    etag = headers.get("ETag")
    if inm is not None and etag:
        return any(t.strip() in (etag, "*") for t in inm.split(","))
    return False


def binary_capability(registry: Registry) -> dict[str, Any] | None:
    """The CapabilityStatement entry for Binary: read only, and only when a mapping serves it."""
    owner = next((p for p in registry.sources() if p.mapping.spec.binary is not None), None)
    if owner is None:
        return None
    return {
        "type": BINARY,
        "profile": {"reference": "http://hl7.org/fhir/StructureDefinition/Binary"},
        "documentation": (f"The content of {owner.resource_type} [id] (read on Binary and on "
                          f"{owner.resource_type} needed). Without _format or a FHIR media type "
                          "in Accept, the document itself in its own media type; otherwise a "
                          "FHIR Binary, for content up to the configured size."),
        "interaction": [{"code": "read"}],
        "versioning": "no-version",
        "readHistory": False,
        "updateCreate": False,
        "conditionalCreate": False,
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
    }


def document_root(settings: Settings, provider: Provider) -> Path | None:
    """``document_dir`` if set; otherwise, for a SQLite source, the demo's documents beside
    the database file (``<file>.documents``, where the demo build writes them)."""
    if settings.document_dir is not None:
        return settings.document_dir
    engine = getattr(provider.mapping.adapter, "engine", None)
    url = getattr(engine, "url", None)
    if url is not None and url.get_backend_name() == "sqlite" and url.database:
        from gateway.demo_pas import demo_documents_dir

        return demo_documents_dir(Path(url.database))
    return None
