"""The CapabilityStatement's ``rest.security``: what a client needs to know to authenticate.

* JWT mode: ``service`` SMART-on-FHIR, and — only when ``CCG_OAUTH_TOKEN_URL`` /
  ``CCG_OAUTH_AUTHORIZE_URL`` are set — the SMART ``oauth-uris`` extension with them.
* mTLS mode: ``service`` Certificates. API-key mode: a description only.
* insecure-demo: no ``security`` element (there is none).
"""

from __future__ import annotations

from typing import Any

from gateway.settings import Settings

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SERVICE_SYSTEM = "http://hl7.org/fhir/restful-security-service"


def _service(code: str, text: str) -> dict[str, Any]:
    return {"coding": [{"system": SERVICE_SYSTEM, "code": code, "display": code}], "text": text}


def security_section(settings: Settings) -> dict[str, Any] | None:
    mode = settings.auth_mode.strip().lower() or "jwt"  # unset: the demo's dev-key JWT
    if mode == "jwt":
        security: dict[str, Any] = {
            "service": [_service("SMART-on-FHIR", "OAuth2 bearer access tokens (RFC 9068) "
                                 "with SMART on FHIR v1/v2 scopes")],
            "description": "Send 'Authorization: Bearer <access token>'. Scopes "
                           "patient/, user/ and system/ [type|*].[read|write|*|cruds].",
        }
        uris = [{"url": name, "valueUri": url} for name, url in
                (("token", settings.oauth_token_url),
                 ("authorize", settings.oauth_authorize_url)) if url]
        if uris:
            security["extension"] = [{"url": OAUTH_URIS, "extension": uris}]
        return security
    if mode == "mtls":
        return {"service": [_service("Certificates", "Mutual TLS client certificates")],
                "description": "Connect with a client certificate issued by the trusted CA."}
    if mode == "api-key":
        return {"description": "Application-restricted API key in the X-API-Key header."}
    return None


def with_security(statement: dict[str, Any], settings: Settings) -> dict[str, Any]:
    security = security_section(settings)
    if security is not None:
        for rest in statement.get("rest") or ():
            rest["security"] = security
    return statement
