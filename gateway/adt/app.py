"""What the ADT feed adds to the gateway application (gateway/app.py), by CCG_ADT_MODE:

- ``off`` (default): nothing — no Subscription type, no merge layer.
- ``api``: the Subscription type, the merge layer and Subscription in the CapabilityStatement;
  a separate ``careconnect-gateway adt-listener`` process (same store) feeds them.
- ``serve``: as ``api``, and the listener and delivery worker run inside ``serve``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from gateway.adt.api import SubscriptionApi, subscription_routes
from gateway.adt.config import AdtSettings
from gateway.adt.merges import MergeLayer
from gateway.adt.store import AdtStore
from gateway.settings import Settings

ID_SYSTEM = "https://fhir.demo-trust.nhs.uk/Id/pas-number"

CAPABILITY: dict[str, Any] = {
    "type": "Subscription",
    "profile": {"reference": "http://hl7.org/fhir/StructureDefinition/Subscription"},
    "documentation": "rest-hook notifications of the PAS's ADT feed: criteria on Patient "
                     "(_id, identifier) or Encounter (_id, identifier, patient, subject, "
                     "status, class); payload application/fhir+json or none; endpoints "
                     "limited to the configured allow-list; channel headers are write-only "
                     "(answers show their names, meta.security REDACTED)",
    "interaction": [{"code": "create"}, {"code": "read"}, {"code": "search-type"},
                    {"code": "update"}, {"code": "delete"}],
    "versioning": "versioned-update",
    "updateCreate": False,
    "searchParam": [{"name": "status", "type": "token",
                     "documentation": "requested | active | error | off"}],
}


@dataclass
class AdtPart:
    settings: Settings
    adt: AdtSettings
    store: AdtStore | None = None
    feed: Any = None

    @classmethod
    def build(cls, settings: Settings) -> AdtPart:
        adt = AdtSettings.from_env(settings)
        if adt.mode == "off":
            return cls(settings, adt)
        return cls(settings, adt, AdtStore(adt.store_url,
                                            sqlite_synchronous=adt.sqlite_synchronous))

    def routes(self) -> list[BaseRoute]:
        if self.store is None:
            return []
        api = SubscriptionApi(self.store, self.adt, self.settings.max_body_bytes)
        return subscription_routes(api, self.settings.base_path.rstrip("/"))

    def middleware(self) -> list[Middleware]:
        if self.store is None:
            return []
        return [Middleware(MergeLayer, store=self.store, base_path=self.settings.base_path,
                           id_system=os.environ.get("CCG_ADT_PATIENT_ID_SYSTEM", ID_SYSTEM))]

    def capability(self) -> list[dict[str, Any]]:
        return [] if self.store is None else [CAPABILITY]

    async def start(self) -> None:
        if self.store is not None and self.adt.mode == "serve":
            from gateway.adt.runtime import build_feed

            base = self.settings.public_base_url or \
                f"http://{self.settings.host}:{self.settings.port}{self.settings.base_path}"
            self.feed = build_feed(self.settings, self.adt, self.store, base_url=base)
            await self.feed.start()

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()
        if self.store is not None:
            self.store.close()
