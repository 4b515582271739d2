"""Terminology services from the code maps and the Care Connect ValueSets and CodeSystems.

A provider kind beside the mapped resource types (gateway.terminology.provider: ConceptMap,
ValueSet, CodeSystem, read and search) and the operations over them
(gateway.terminology.operations: ``$translate``, ``$expand``, ``$validate-code``,
``$lookup``, and ``served_operations``; not imported here, so the registry can import the
providers without an import circle). The registry lists the providers and the operation
registry the operations, so the CapabilityStatement claims them only as they are registered.
"""

from __future__ import annotations

from gateway.terminology.content import Catalogue, catalogue
from gateway.terminology.provider import TerminologyProvider, providers

__all__ = ["Catalogue", "TerminologyProvider", "catalogue", "providers"]
