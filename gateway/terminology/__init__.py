"""Terminology services from the code maps and the Care Connect ValueSets and CodeSystems.

A provider kind beside the mapped resource types (gateway.terminology.provider: ConceptMap,
ValueSet, CodeSystem, read and search) and the operations over them
(gateway.terminology.operations: ``$translate``, ``$expand``, ``$validate-code``,
``$lookup``). The registry lists the providers and the operation registry the operations, so
the CapabilityStatement claims them only as they are registered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.terminology.content import Catalogue, catalogue
from gateway.terminology.provider import TerminologyProvider, providers

if TYPE_CHECKING:
    from gateway.operations.base import Operation
    from gateway.registry import Registry

__all__ = ["Catalogue", "TerminologyProvider", "catalogue", "providers", "served_operations"]


def served_operations(registry: Registry) -> list[Operation]:
    """The terminology operations whose type the registry serves as terminology."""
    from gateway.terminology.operations import operations as all_operations

    return [op for op in all_operations()
            if op.resource_types and registry.terminology(op.resource_types[0]) is not None]
