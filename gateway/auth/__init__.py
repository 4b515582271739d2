"""Authentication and authorisation: who is calling (``Principal``) and what they may do.

``principal`` is the stable contract other layers (compartment enforcement, audit, limits)
build on; the rest of the package produces principals (JWT, API keys, mTLS, insecure demo)
and checks them against each interaction.
"""

from gateway.auth.principal import (
    PRINCIPAL_SCOPE_KEY,
    Principal,
    Scope,
    get_principal,
    parse_scopes,
)

__all__ = ["PRINCIPAL_SCOPE_KEY", "Principal", "Scope", "get_principal", "parse_scopes"]
