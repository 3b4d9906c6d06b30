"""Serving the application on the listening sockets, in one process and one event loop, until a
stop signal; then a graceful stop.

This is the program's engine, not the library's: it takes signals. Other programs mount
:func:`aegis.proxy.make_app` in their own server instead. A crash is systemd's to restart, as for
every exporter: nothing here supervises or forks.

At SIGTERM or SIGINT: the listeners close (new connections are refused, not queued for nobody),
idle keep-alive connections close, and the scrapes in flight have the grace period to finish;
one still waiting for its upstream then is answered 503 (:mod:`aegis.stopping`). aiohttp's own
shutdown then waits for the handlers, bounded by the same period. SIGHUP is ignored with a log
line: Aegis reads its configuration at start only.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..stopping import STOPPING_KEY
from .accept import Acceptor
from .bounds import ConnectionBounds, Connections, Guard

__all__ = ["HELD_SIGNALS", "Serving", "serve"]

log = logging.getLogger("aegis.server")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Blocked from before the listeners are made to the end: taken from the pending set, so a stop
#: signal that comes while Aegis starts cannot kill it half-started (leaving its socket files).
HELD_SIGNALS = frozenset({*_STOP_SIGNALS, signal.SIGHUP})
_SIGNAL_POLL = 0.2
# After the grace period, the time the handlers it cut have to write their answer before aiohttp
# cancels them.
_ANSWER_TIME = 0.5
# aiohttp's default; the head's size in bytes is the bound that matters (ConnectionBounds).
_MAX_HEADERS = 128


@dataclass(frozen=True, slots=True)
class Serving:
    """How the listeners are served."""

    shutdown_grace: float = 10.0
    #: TLS on every listener (``--web.config.file``), or plain HTTP.
    ssl_context: ssl.SSLContext | None = None
    #: Head deadline and size, write deadline; the head deadline also bounds the TLS handshake.
    bounds: ConnectionBounds = field(default_factory=ConnectionBounds)
    #: Seconds a connection may wait for its next request.
    idle_timeout: float = 120.0


class _Answered(AbstractAccessLogger):
    """Not a log: aiohttp calls an access logger once each answer is written out (after
    ``write_eof``, its drain included), on every path, its own error pages too. That is when a
    request pipelined behind the answer starts its head deadline (:meth:`Guard.answered`).

    A request with a body (never a scrape's: GET and HEAD only) closes its connection after its
    answer: the Guard tells heads apart by their blank line, and a body holding one would leave
    it a head ahead of aiohttp for good, waiting for an answer that never comes instead of
    timing the next head."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        transport = request.transport
        if transport is not None:
            guard = transport.get_protocol()
            if isinstance(guard, Guard):
                guard.answered()
        if request.body_exists:
            request.protocol.close()


def serve(app: web.Application, socks: list[socket.socket], serving: Serving) -> int:
    """Serve ``app`` on ``socks`` until SIGTERM or SIGINT; returns the exit status (0)."""
    # Taken from the pending set (_watch_signals); the caller may have blocked them already.
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(app, socks, serving))
    return 0


async def _serve(app: web.Application, socks: list[socket.socket], serving: Serving) -> None:
    runner = web.AppRunner(
        app,
        handle_signals=False,
        # No access log is written: the logger class only tells the Guard (_Answered).
        access_log=log,
        access_log_class=_Answered,
        # The scrapes' own deadlines end them by the end of the grace period (aegis.stopping);
        # this bounds whatever else a handler waits for (a client that reads slowly).
        shutdown_timeout=serving.shutdown_grace + _ANSWER_TIME,
        keepalive_timeout=serving.idle_timeout,
        # A scraper that hangs up cancels its handler, so the upstream exchange, its connection
        # and its concurrency slot are given back at once.
        handler_cancellation=True,
        # The head's size is bounded (431) by the Guard before aiohttp parses it; aiohttp's own
        # line limits are set to that bound so it never answers a different error first.
        max_line_size=serving.bounds.max_head_bytes,
        max_field_size=serving.bounds.max_head_bytes,
        max_headers=_MAX_HEADERS,
    )
    await runner.setup()
    server = runner.server
    assert server is not None
    live = Connections()
    protocol = Guard.factory(server, serving.bounds, live)
    acceptors = [
        Acceptor(
            sock, protocol, context=serving.ssl_context, timeout=serving.bounds.read_header_timeout
        )
        for sock in socks
    ]
    # What was built so far lives as long as the process: keep the collector's passes off it.
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _watch_signals(loop, stop.set)
    await stop.wait()
    end = loop.time() + serving.shutdown_grace
    connections = len(live)
    for acceptor in acceptors:
        acceptor.close()
    for sock in socks:
        sock.close()
    grace = app.get(STOPPING_KEY)
    waiting = grace.begin(end) if grace is not None else 0
    # Idle keep-alive connections close now, the others after their answer (no new request
    # starts during the grace period); then the handlers have until the end of the grace period.
    await runner.cleanup()
    cut = grace.cut if grace is not None else 0
    log.info(
        "stopped: %d connections were open, %d scrapes waiting for their service, %d of them cut "
        "at the end of the grace period",
        connections,
        waiting,
        cut,
        extra={"connections": connections, "waiting": waiting, "cut": cut},
    )


def _watch_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """Take the blocked signals as they come pending, every ``_SIGNAL_POLL`` seconds.

    Not ``loop.add_signal_handler``: with uvloop, a SIGTERM that arrived while the loop was busy
    accepting was sometimes seen only at the next signal, and Aegis never stopped.
    """

    def take() -> None:
        try:
            while (info := signal.sigtimedwait(HELD_SIGNALS, 0)) is not None:
                if info.si_signo == signal.SIGHUP:
                    log.info(
                        "SIGHUP ignored; Aegis reads its configuration at start only, restart it "
                        "to apply changes"
                    )
                else:
                    stop()
        finally:
            loop.call_later(_SIGNAL_POLL, take)

    take()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return None
    return uvloop.new_event_loop
