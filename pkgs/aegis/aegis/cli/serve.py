"""Running the proxy as a process: listening sockets, worker processes, signals, graceful stop.

This is the command line's engine, not the library: it installs signal handlers and forks. Other
programs mount :func:`aegis.proxy.make_app` in their own server instead.

Each listener is one socket, bound by this process before any worker starts
(:mod:`aegis.listeners`). Every worker accepts on the sockets it inherited across ``fork()``.
With several workers, this process is worker 0 and also supervises the others
(:mod:`aegis.workers`): it passes SIGTERM/SIGINT on, replaces a worker that died, ignores SIGHUP
(with a log line), and exits 0 once every worker finished its in-flight scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .accept import Acceptor, Connections, Shares
from .stopping import STOPPING_KEY
from .timeouts import ConnectionBounds, Guard
from .workers import Hooks, Workers

log = logging.getLogger("aegis.server")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Held back while a worker starts, until its handlers are in place.
_BLOCKED = (*_STOP_SIGNALS, signal.SIGHUP)
_SIGNAL_POLL = 0.2
# A worker's stop: the grace period, then _ANSWER_TIME for the scrapes it cut to return their
# answer, then (for handlers that did not) cancellation and _ANSWER_TIME again, then aiohttp's
# shutdown, which gives the answers decided by then _LAST_WRITES to be written, twice. The
# supervisor kills workers only _KILL_AFTER seconds past the grace period, well after all that.
_ANSWER_TIME = 0.5
_LAST_WRITES = 0.5
_KILL_AFTER = 5.0
# aiohttp's default; the head's size in bytes is the bound that matters (ConnectionBounds).
_MAX_HEADERS = 128


@dataclass(frozen=True, slots=True)
class Serving:
    """How the workers serve their listeners."""

    shutdown_grace: float = 10.0
    #: TLS on every listener (``--web.config.file``), or plain HTTP.
    ssl_context: ssl.SSLContext | None = None
    #: Head deadline and size, write deadline; the head deadline also bounds the TLS handshake.
    bounds: ConnectionBounds = field(default_factory=ConnectionBounds)
    #: Seconds a connection may wait for its next request.
    idle_timeout: float = 120.0


AppFactory = Callable[[], web.Application]


def serve(
    app_factory: AppFactory,
    socks: list[socket.socket],
    serving: Serving,
    *,
    workers: int = 1,
    on_worker_start: Callable[[], None] | None = None,
    on_worker_exit: Callable[[int], None] | None = None,
    on_orphaned: Callable[[], None] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status.

    With several ``workers`` this process forks the others and supervises them while it serves:
    ``on_worker_start()`` is called in each forked worker right after ``fork()``,
    ``on_worker_exit(pid)`` in this process for each forked worker that ended, and
    ``on_orphaned()`` in a forked worker that outlived this process (SIGKILL), to remove what
    this process would have removed at exit.
    """
    if workers == 1:
        return _run_worker(app_factory, socks, serving)
    # Held back until worker 0's handlers are in place; a forked worker inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    # Ignored by whoever started Aegis, SIGCHLD would have the kernel reap the workers itself,
    # and how each ended would be lost.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # What this process imported is shared with every worker until someone writes to it; the
    # collector's bookkeeping is such a write, so the start-up objects are kept out of its way.
    # The event loop's module is imported here, once, rather than in each worker. (No
    # gc.collect() first: measured, it leaves the workers about 1 MB less to share.)
    _loop_factory()
    gc.freeze()
    family = Workers(
        lambda shares, index: _run_worker(app_factory, socks, serving, shares, index),
        socks,
        workers,
        Hooks(on_worker_start, on_worker_exit, on_orphaned),
    )
    family.start()
    log.info("%d workers: %s", workers, " ".join(map(str, family.pids)))
    code = _run_worker(app_factory, socks, serving, family.shares, 0, family)
    log.info("all workers stopped; exiting with %d", code)
    return code


class _InFlight:
    """The requests being handled in this worker (the task of each), for the stop."""

    __slots__ = ("_none_left", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[object]] = set()
        self._none_left: asyncio.Event | None = None  # only while the stop waits

    def wrap(self, handler: _Handler) -> _Handler:
        async def counted(request: web.BaseRequest) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                return await handler(request)
            finally:
                self.tasks.discard(task)
                if not self.tasks and self._none_left is not None:
                    self._none_left.set()

        return counted

    async def finished(self, deadline: float) -> bool:
        """Whether every handler returned by ``deadline`` (the event loop's time)."""
        self._none_left = asyncio.Event()
        if self.tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._none_left.wait()
        return not self.tasks


_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


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


def _run_worker(
    app_factory: AppFactory,
    socks: list[socket.socket],
    serving: Serving,
    shares: Shares | None = None,
    index: int = 0,
    family: Workers | None = None,
) -> int:
    """Serve as one worker until SIGTERM or SIGINT; worker 0 of several (``family``) also
    supervises the others, and returns 1 if one of them did not stop cleanly."""

    async def main() -> None:
        runner = web.AppRunner(
            app_factory(),
            handle_signals=False,
            # No access log is written: the logger class only tells the Guard (_Answered).
            access_log=log,
            access_log_class=_Answered,
            # Only for the answers decided when the grace period ended: see main() below.
            shutdown_timeout=_LAST_WRITES,
            keepalive_timeout=serving.idle_timeout,
            # A scraper that hangs up cancels its handler, so the upstream exchange, its
            # connection and its concurrency slot are given back at once.
            handler_cancellation=True,
            # The head's size is bounded (431) by the Guard before aiohttp parses it; aiohttp's
            # own line limits are set to that bound so it never answers a different error first.
            max_line_size=serving.bounds.max_head_bytes,
            max_field_size=serving.bounds.max_head_bytes,
            max_headers=_MAX_HEADERS,
        )
        await runner.setup()
        assert runner.server is not None
        server = runner.server
        in_flight = _InFlight()
        server.request_handler = in_flight.wrap(server.request_handler)
        grace = runner.app.get(STOPPING_KEY)
        live = Connections(shares, index)
        # Not web.SockSite: it cannot wrap the connection's protocol (the bounds), and it
        # would listen() again with a backlog of 128. Not loop.create_server either: see
        # aegis.accept for why each worker accepts one connection at a time.
        protocol = Guard.factory(server, serving.bounds, live)
        acceptors = [
            Acceptor(
                sock,
                protocol,
                live,
                context=serving.ssl_context,
                timeout=serving.bounds.read_header_timeout,
            )
            for sock in socks
        ]
        loop = asyncio.get_running_loop()
        # Everything built so far lives as long as the worker: keep the collector off it.
        gc.freeze()
        stop = asyncio.Event()
        _watch_signals(loop, stop, family)
        await stop.wait()
        end = loop.time() + serving.shutdown_grace
        # The forked workers were told by now: _watch_signals passes the stop on as it sets it.
        connections, requests = len(live), len(in_flight.tasks)
        for acceptor in acceptors:
            acceptor.close()
        # Refused from now on, rather than queued for nobody (the supervisor closes its copies).
        for sock in socks:
            sock.close()
        # Idle keep-alive connections close now, the others after their answer: no new request
        # starts during the grace period.
        server.pre_shutdown()
        # The grace period is kept here, not by aiohttp: its shutdown(timeout) waits the
        # timeout, cancels, then waits the timeout again, so a stop took twice the grace period.
        # Scrapes waiting for their upstream end at `end`, answered 503 (aegis.stopping).
        if grace is not None:
            grace.begin(end)
        cut = 0
        if not await in_flight.finished(end + _ANSWER_TIME):
            # Whatever still runs (a handler that is not a scrape's wait) is cancelled.
            cut = len(in_flight.tasks)
            for task in in_flight.tasks:
                task.cancel()
            await in_flight.finished(loop.time() + _ANSWER_TIME)
        if grace is not None:
            cut += grace.cut
        # The answers decided by now are written within _LAST_WRITES (twice, see above).
        await runner.cleanup()
        log.info(
            "worker %d stopped: %d connections were open, %d requests in flight, %d of them cut "
            "at the end of the grace period",
            os.getpid(),
            connections,
            requests,
            cut,
            extra={"connections": connections, "in_flight": requests, "cut": cut},
        )
        if family is not None:
            await family.stopped(within=serving.shutdown_grace + _KILL_AFTER)

    # The worker's signals stay blocked and are taken from the pending set (_watch_signals): a
    # stop signal that comes while the worker starts cannot kill it half-started.
    signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
    return 1 if family is not None and family.failed else 0


def _watch_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, family: Workers | None
) -> None:
    """Take the blocked signals as they come pending, every ``_SIGNAL_POLL`` seconds, and
    collect the forked workers that ended (``family``).

    Not ``loop.add_signal_handler``: with uvloop, a SIGTERM that arrived while a worker was
    busy accepting was sometimes seen only at the next signal, and the worker never stopped.
    """
    who = "worker" if family is None else "supervisor"

    def take() -> None:
        try:
            while (info := signal.sigtimedwait(_BLOCKED, 0)) is not None:
                if info.si_signo == signal.SIGHUP:
                    _ignore_hangup(who)
                else:
                    stop.set()
            if family is not None:
                # A worker that the same stop signal ended (a whole process group signalled)
                # is not replaced.
                if stop.is_set():
                    family.stop()
                family.reap()
        finally:
            loop.call_later(_SIGNAL_POLL, take)

    take()


def _ignore_hangup(who: str) -> None:
    log.info(
        "%s: SIGHUP ignored; Aegis reads its configuration at start only, restart it to apply "
        "changes",
        who,
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return None
    return uvloop.new_event_loop
