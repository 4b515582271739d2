"""Which adapter serves a connection: built-ins plus third-party entry points.

A third-party adapter is a package exposing an entry point in the group
``careconnect_gateway.adapters`` whose object is a factory
``(name: str, connection: Connection, mapping_dir: Path) -> Adapter``; the connection's
``url`` is already resolved (from the environment where ``url_env`` is set).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from adapters.base import Adapter, SourceConfigError

ENTRY_POINT_GROUP = "careconnect_gateway.adapters"

Factory = Callable[[str, Any, Path], Adapter]


def _sql(name: str, connection: Any, _directory: Path) -> Adapter:
    from adapters.sql import STATEMENT_CACHE_BYTES, SqlAdapter

    options = dict(connection.options)
    cache = options.pop("statement_cache_bytes", STATEMENT_CACHE_BYTES)
    if options or not isinstance(cache, int) or isinstance(cache, bool) or cache < 0:
        raise SourceConfigError(
            f"connection '{name}': the sql adapter takes one option, statement_cache_bytes "
            "(a whole number of bytes)")
    return SqlAdapter(
        connection.url,
        pool_size=connection.pool_size,
        timeout_seconds=connection.timeout_seconds,
        label=name,
        statement_cache_bytes=cache,
    )


def _hl7v2(name: str, connection: Any, _directory: Path) -> Adapter:
    from adapters.hl7v2.adapter import Hl7v2Adapter

    options = dict(connection.options)
    options.setdefault("reply_timeout", connection.timeout_seconds)
    options.setdefault("pool_size", connection.pool_size)
    return Hl7v2Adapter(connection.url, options=options, label=name)


BUILTIN: dict[str, Factory] = {"sql": _sql, "hl7v2": _hl7v2}


def factories() -> dict[str, Factory]:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.load())
    return found


def create(name: str, connection: Any, directory: Path) -> Adapter:
    available = factories()
    factory = available.get(connection.adapter)
    if factory is None:
        raise SourceConfigError(
            f"connection '{name}': unknown adapter {connection.adapter!r} "
            f"(available: {', '.join(sorted(available))})"
        )
    return factory(name, connection, directory)
