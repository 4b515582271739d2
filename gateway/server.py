"""How uvicorn serves the gateway: the HTTP protocol with a deadline for request headers, and
the server options ``serve`` (and the tests' real servers) start it with.

uvicorn closes idle kept-alive connections (``timeout_keep_alive``) and refuses headers over
``h11_max_incomplete_event_size``, but a client that sends the first bytes of a request and
then a byte now and then keeps its connection, and a file descriptor, for ever. The protocol
here gives every request ``seconds`` from its first byte to complete its headers; past that
it answers 408 ``REQUEST_TIMEOUT`` and closes the connection. (Bodies have their own
deadline in the application: gateway.limits.BodyLimit.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from gateway.errors import RequestTimeout

KEEP_ALIVE_SECONDS = 5


def _timeout_response(seconds: float) -> bytes:
    body = orjson.dumps(RequestTimeout(
        f"the request headers did not arrive within {seconds:g} seconds").outcome())
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/fhir+json\r\n"
            b"connection: close\r\ncache-control: no-store\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def with_header_deadline(base: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    """``base`` (a uvicorn HTTP protocol: h11 or httptools) with the header deadline."""
    if seconds <= 0:
        return base
    response = _timeout_response(seconds)
    parent: Any = base

    class HeaderDeadline(parent):  # type: ignore[misc]
        _timer: asyncio.TimerHandle | None = None
        _waiting_after: Any = None
        """The request cycle that was current when the timer started: a new one means the
        headers are complete."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._start()

        def _start(self) -> None:
            self._waiting_after = self.cycle
            self._timer = self.loop.call_later(seconds, self._late)

        def data_received(self, data: bytes) -> None:
            if self._timer is not None or not (self.cycle is None
                                               or self.cycle.response_complete):
                super().data_received(data)
                if self._timer is not None and self.cycle is not self._waiting_after:
                    self._timer.cancel()
                    self._timer = None
                return
            # The first bytes of the next request on a kept-alive connection. Nearly always
            # they hold all its headers (a new cycle once parsed): no timer then; one is
            # started only when the headers are still incomplete after this chunk (the
            # deadline then counts from now, microseconds after their first byte).
            before = self.cycle
            super().data_received(data)
            if self.cycle is before and not self.transport.is_closing():
                self._start()

        def _late(self) -> None:
            self._timer = None
            transport = self.transport
            if self.cycle is self._waiting_after and not transport.is_closing():
                transport.write(response)
                transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


def uvicorn_options(header_timeout: float, http: type[asyncio.Protocol] | None = None
                    ) -> dict[str, Any]:
    """Options for ``uvicorn.run`` / ``uvicorn.Config`` that bound what one connection holds."""
    return {
        "http": with_header_deadline(http or AutoHTTPProtocol, header_timeout),
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "h11_max_incomplete_event_size": 16 * 1024,  # headers beyond 16 KiB: 400 (h11)
    }
