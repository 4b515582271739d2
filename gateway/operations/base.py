"""What an operation is, what it may use of the API, and the registry of them."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from gateway.bundle import Pager
    from gateway.formats import Format
    from gateway.registry import Registry, TypeProvider
    from gateway.settings import Settings

Level = Literal["system", "type", "instance"]


class Context(Protocol):
    """What an operation may use of the API (gateway.routes.Api provides it)."""

    settings: Settings
    pager: Pager

    @property
    def registry(self) -> Registry:
        """The registry of the request's mapping generation (a reload may swap it)."""
        ...

    def fmt(self, request: Request) -> Format: ...

    def respond(self, body: dict[str, Any], fmt: Format, status: int = 200,
                headers: dict[str, str] | None = None) -> Response: ...

    def base_url(self, request: Request) -> str: ...

    def strict(self, request: Request) -> bool:
        """Unknown parameters are refused (``Prefer: handling``, else the server's default)."""
        ...

    def whole(self, request: Request) -> bool:
        """A source that does not answer fails the request with its 502/503/504, rather than
        leaving a gap the answer names: only on the client's explicit ``Prefer:
        handling=strict`` (STU3 defines ``handling`` for unknown parameters; the gateway reads
        an explicit ``strict`` as "all or nothing" for sources too, as multi-source search
        does)."""
        ...


@dataclass(frozen=True)
class Parameter:
    """One parameter of an operation, as its OperationDefinition states it."""

    name: str
    type: str
    """A FHIR type: boolean, integer, date, instant, code, string, Resource, Bundle, ..."""
    use: Literal["in", "out"] = "in"
    min: int = 0
    max: str = "1"
    documentation: str = ""

    def definition(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "use": self.use, "min": self.min,
                               "max": self.max}
        if self.documentation:
            out["documentation"] = self.documentation
        out["type"] = self.type
        return out


@dataclass(frozen=True)
class Invocation:
    """One call of an operation, as routed."""

    request: Request
    level: Level
    provider: TypeProvider | None
    """The type's provider (type and instance level)."""
    rid: str | None
    """The instance id (instance level)."""


class Operation(abc.ABC):
    name: str
    """Without the ``$``: ``everything``."""
    levels: frozenset[Level]
    resource_types: tuple[str, ...] | None = None
    """The types it applies to at type/instance level (None: every served type)."""
    methods: tuple[str, ...] = ("GET", "POST")
    parameters: tuple[Parameter, ...] = ()
    scopes: str = ""
    """The SMART permissions it needs, for people (checked in ``run``)."""
    definition_url: str
    """The canonical URL of its OperationDefinition."""
    idempotent: bool = True

    def applies(self, level: Level, resource_type: str | None) -> bool:
        if level not in self.levels:
            return False
        return (level == "system" or self.resource_types is None
                or resource_type in self.resource_types)

    def definition_reference(self, base_url: str) -> str:
        """Where its OperationDefinition is (the CapabilityStatement points there)."""
        return self.definition_url

    def definition(self, base_url: str) -> dict[str, Any] | None:
        """The OperationDefinition this server serves for it, or None (a core one)."""
        return None

    @abc.abstractmethod
    async def run(self, ctx: Context, call: Invocation) -> Response: ...


class OperationRegistry:
    def __init__(self, operations: Iterable[Operation]) -> None:
        self._ops: dict[str, list[Operation]] = {}
        for op in operations:
            self._ops.setdefault(op.name, []).append(op)

    def __iter__(self) -> Iterator[Operation]:
        return iter(sorted((o for ops in self._ops.values() for o in ops),
                           key=lambda o: (o.name, o.definition_url)))

    def find(self, name: str, level: Level, resource_type: str | None) -> Operation | None:
        for op in self._ops.get(name, ()):
            if op.applies(level, resource_type):
                return op
        return None

    def known(self, name: str) -> bool:
        return name in self._ops

    def definition(self, op_id: str, base_url: str) -> dict[str, Any] | None:
        """The OperationDefinition with this id, if one of ours serves it."""
        for op in self:
            found = op.definition(base_url)
            if found is not None and found.get("id") == op_id:
                return found
        return None
