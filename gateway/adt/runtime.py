"""Assembling the ADT feed: mappings → Mapper, the store, the listener and the deliverer."""

from __future__ import annotations

import asyncio
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

    async def stop(self, grace: float = 0.0) -> None:
        """Stop both; with ``grace``, the message being recorded and the notifications being
        sent may finish first — both at once, so ``grace`` bounds the whole stop."""
        results = await asyncio.gather(self.listener.stop(grace), self.deliverer.stop(grace),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


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
                      ready: Any = None, stop: asyncio.Event | None = None,
                      grace: float = 0.0) -> None:
    """Run the feed until ``stop`` is set, then stop it gracefully (at most ``grace``
    seconds: gateway.lifecycle.run_until_stopped); cancelled, it stops at once."""
    feed = build_feed(settings, adt, base_url=base_url)
    await feed.start()
    log.info("adt_listener_started", host=adt.listen_host, port=feed.listener.port)
    if ready is not None:
        ready(feed.listener.port)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        try:  # cancelled before the stop was asked for, or during it: at once
            await feed.stop(grace if stop is not None and stop.is_set() else 0.0)
        except Exception as exc:
            log.error("adt_stop_failed", error=type(exc).__name__)
        finally:
            feed.store.close()
