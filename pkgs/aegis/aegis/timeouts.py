"""A deadline on reading each request head, so slow clients cannot hold connections open.

aiohttp's ``keepalive_timeout`` closes a connection that sends nothing, but its timer is
cancelled by the first byte of a request: a client that dribbles a header byte a second (a
slowloris) keeps its connection, and its file descriptor, for as long as it likes. Go's
``http.Server.ReadHeaderTimeout`` is the remedy this copies: from the moment a connection is
accepted, or the first byte of a following request arrives, the whole head
(request line and headers, up to the blank line) must be in within the deadline, or the
connection is closed without an answer.

It is a thin protocol wrapped around aiohttp's own, so it relies on nothing inside aiohttp
(the same code works from aiohttp 3.9 to 3.14): it watches the bytes go by for the blank line
that ends a head and passes everything through untouched. Bytes after a head that are not a
new request (a request body) start a deadline too; Aegis answers GET and HEAD only, and a
body it never reads is no reason to keep a connection. Waiting between requests is bounded by
aiohttp's ``keepalive_timeout`` (``--web.idle-timeout``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

__all__ = ["HeadTimeout"]

log = logging.getLogger("aegis.server")

_END_OF_HEAD = b"\r\n\r\n"


class HeadTimeout(asyncio.Protocol):
    """Wraps one connection's protocol; closes the transport when a head is late."""

    __slots__ = ("_inner", "_tail", "_timeout", "_timer", "_transport")

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._tail = b""  # the last bytes of a head in progress: the blank line may be split

    @classmethod
    def factory(
        cls, inner: Callable[[], asyncio.Protocol], timeout: float
    ) -> Callable[[], asyncio.Protocol]:
        return lambda: cls(inner(), timeout)

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + self._timeout, self._expired)
        self._tail = b""

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._transport is not None:
            log.debug("closing a connection whose request head took over %.3g s", self._timeout)
            self._transport.abort()  # nothing to flush: the client has not asked anything yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream server's transport
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is None:
            if data.endswith(_END_OF_HEAD):
                # The usual scrape: a whole request in one read. Nothing is left pending, so
                # there is no deadline to set and cancel.
                self._inner.data_received(data)
                return
            self._arm()  # the first byte of a new request
        seen = self._tail + data if self._tail else data
        end = seen.rfind(_END_OF_HEAD)
        if end < 0:
            self._tail = seen[-3:]
        elif end + 4 == len(seen):
            self._disarm()  # every head so far is complete: the handler takes it from here
        else:
            self._arm()  # a pipelined request has begun behind the complete one
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._transport = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
