"""Assembling the ADT feed: mappings → Mapper, the store, the listener and the deliverer."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog

from adapters import registry as adapter_registry
from gateway.adt.config import AdtSettings
from gateway.adt.delivery import Deliverer
from gateway.adt.events import Mapper, load_events
from gateway.adt.listener import AdtListener
from gateway.adt.store import AdtStore
from gateway.providers import Provider
from gateway.settings import Settings

log = structlog.get_logger("gateway.adt")


def build_mapper(settings: Settings, adt: AdtSettings) -> Mapper:
    from gateway.app import demo_database_url
    from gateway.mapping.loader import load_directory

    loaded = load_directory(adt.mappings_dir, adapter_registry.create,
                            demo_url=lambda: demo_database_url(settings),
                            urls=settings.connection_urls)
    providers = {m.resource_type: Provider(m) for m in loaded.mappings}
    return Mapper.from_providers(providers, load_events(adt.mappings_dir), adt.processing_ids)


@dataclass
class Feed:
    listener: AdtListener
    deliverer: Deliverer
    store: AdtStore

    async def start(self) -> None:
        await self.deliverer.start()
        await self.listener.start()

    async def stop(self) -> None:
        await self.listener.stop()
        await self.deliverer.stop()


def build_feed(settings: Settings, adt: AdtSettings, store: AdtStore | None = None,
               *, base_url: str = "") -> Feed:
    store = store or AdtStore(adt.store_url, sqlite_synchronous=adt.sqlite_synchronous)
    mapper = build_mapper(settings, adt)
    listener = AdtListener(mapper, store, host=adt.listen_host, port=adt.listen_port,
                           ssl=adt.ssl_context())
    import socket

    deliverer = Deliverer(store, adt, base_url=base_url,
                          holder=f"{socket.gethostname()}:{adt.listen_host}:{adt.listen_port}")
    listener.on_recorded.append(deliverer.wake)
    return Feed(listener, deliverer, store)


async def run_forever(settings: Settings, adt: AdtSettings, *, base_url: str = "",
                      ready: Any = None) -> None:
    feed = build_feed(settings, adt, base_url=base_url)
    await feed.start()
    log.info("adt_listener_started", host=adt.listen_host, port=feed.listener.port)
    if ready is not None:
        ready(feed.listener.port)
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await feed.stop()
        feed.store.close()
