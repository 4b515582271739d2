"""FHIR operations (``$validate``, ``$everything``, declared extracts): providers in a registry
of their own, as resource types are.

Each operation declares its name, the levels it runs at (system, type, instance), the types
it applies to, its parameters and the scopes it needs; routes dispatch ``$name`` to it and
the CapabilityStatement lists what is registered here. An operation sees the API through
:class:`gateway.operations.base.Context`, never through gateway.routes (no import circle).
"""

from gateway.operations.base import Context, Operation, OperationRegistry, Parameter

__all__ = ["Context", "Operation", "OperationRegistry", "Parameter"]
