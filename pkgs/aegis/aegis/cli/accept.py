"""Accepting connections on a listening socket that several workers share.

Every worker inherits the same listening socket and watches it. Left to the event loop
(uvloop/libuv accepts until the queue is empty), whichever worker wakes first takes a whole
burst: wrk's 32 connections split 29 to 3, and one worker did all the work. So each worker
accepts one connection at a time, and one that holds more connections than another worker
steps back for a moment (:data:`_STEP_BACK`) before taking the next; the counts live in a
few bytes of memory shared across ``fork()`` (:class:`Shares`). A worker that steps back
still accepts after the pause (2 ms per connection it leads by, at most 20 ms), so a stuck or
slow sibling never leaves connections waiting for long.

TLS listeners also tell a plain-HTTP client what went wrong, as Go servers do: each connection
is first read without consuming anything (``MSG_PEEK``); a first byte that starts a TLS
handshake record (0x16) goes on to the handshake on the same socket, anything else is answered
``400 Client sent an HTTP request to an HTTPS server.`` and closed. The read-header deadline
is one deadline from the accept: it covers the wait for that first byte, the handshake and the
first request head together (the protocol gets it from :data:`ProtocolFactory`, so the head
has what the handshake left, not a fresh deadline of its own). The SSL context is used as
given, so certificate rotation (its SNI callback) keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

from .logs import RateLimited
from .process import release_free_memory

__all__ = ["Acceptor", "Connections", "ProtocolFactory", "Shares"]

#: Makes the protocol of a connection whose first request head is due by the given time (the
#: event loop's), counted from the accept.
ProtocolFactory = Callable[[float], asyncio.Protocol]

log = logging.getLogger("aegis.server")

_HANDSHAKE_RECORD = 0x16
_BODY = b"Client sent an HTTP request to an HTTPS server.\n"
_PLAIN_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)
_STEP_BACK = 0.002
_MAX_STEP_BACK = 0.02
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_OUT_OF_FDS_PAUSE = 0.1
_TRIM_DELAY = 1.0
_SLOT = struct.Struct("q")
_ABSENT = -1


class Shares:
    """How many connections each worker holds, in memory shared by the workers."""

    def __init__(self, workers: int) -> None:
        self._memory = mmap.mmap(-1, _SLOT.size * workers)  # anonymous and shared across fork
        self._workers = workers
        for index in range(workers):
            self.leave(index)

    def leave(self, index: int) -> None:
        """The worker at ``index`` is gone (or not started): the others do not wait for it."""
        _SLOT.pack_into(self._memory, index * _SLOT.size, _ABSENT)

    def publish(self, index: int, count: int) -> None:
        _SLOT.pack_into(self._memory, index * _SLOT.size, count)

    def ahead(self, index: int, count: int) -> int:
        """By how many connections ``count`` exceeds the fewest another worker holds (0: not)."""
        lead = 0
        for other in range(self._workers):
            if other != index:
                theirs = _SLOT.unpack_from(self._memory, other * _SLOT.size)[0]
                if theirs >= 0:
                    lead = max(lead, count - theirs)
        return lead


class Connections:
    """This worker's open connections (the Guard of each), published to :class:`Shares`.

    When connections that held large request heads have closed, the C heap's free pages are
    given back to the system, once, a moment later (:data:`_TRIM_DELAY`): otherwise the
    memory they took stays with the worker.
    """

    __slots__ = ("_index", "_members", "_pending", "_shares", "_trim")

    def __init__(self, shares: Shares | None = None, index: int = 0) -> None:
        self._members: set[object] = set()
        self._pending = 0  # accepted, not yet handed to a protocol
        self._trim: asyncio.TimerHandle | None = None
        self._shares = shares
        self._index = index
        if shares is not None:
            shares.publish(index, 0)

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: object) -> None:
        self._members.add(member)
        self._publish()

    def discard(self, member: object) -> None:
        self._members.discard(member)
        self._publish()

    def release_later(self) -> None:
        """A connection that held a large head has closed."""
        if self._trim is None:
            loop = asyncio.get_running_loop()
            self._trim = loop.call_later(_TRIM_DELAY, self._release)

    def _release(self) -> None:
        self._trim = None
        release_free_memory()

    def pending(self, delta: int) -> None:
        self._pending += delta
        self._publish()

    def _publish(self) -> None:
        if self._shares is not None:
            self._shares.publish(self._index, len(self._members) + self._pending)

    def ahead(self) -> int:
        """By how many connections this worker leads the one that holds the fewest."""
        if self._shares is None:
            return 0
        return self._shares.ahead(self._index, len(self._members) + self._pending)


class Acceptor:
    """Accepts on ``sock`` and hands each connection to a protocol from ``factory``."""

    def __init__(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        connections: Connections,
        *,
        context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._sock = sock
        self._factory = factory
        self._connections = connections
        self._context = context
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[socket.socket, asyncio.TimerHandle] = {}
        self._accept_errors = RateLimited(log, level=logging.ERROR)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._watching = False
        self._watch()

    def close(self) -> None:
        """Stop accepting, and drop the TLS connections that have not sent their first byte."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        for conn in list(self._waiting):
            self._forget(conn)
            self._connections.pending(-1)
            conn.close()
        # Connections being handed over are left to finish (a TLS handshake within its
        # deadline): cancelled half-way, one could stay registered with aiohttp and hold the
        # stop for the whole grace period.

    def _watch(self) -> None:
        if not self._closed and not self._watching:
            self._loop.add_reader(self._sock.fileno(), self._ready)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False

    def _ready(self) -> None:
        lead = self._connections.ahead()
        if lead > 0:
            # The further ahead, the longer the pause: a sibling that is slow to wake (a busy
            # machine) still gets its share of a burst.
            self._unwatch()
            self._loop.call_later(min(_STEP_BACK * lead, _MAX_STEP_BACK), self._take)
            return
        self._take()

    def _take(self) -> None:
        if self._closed:
            return
        self._watch()
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            # Out of descriptors, this repeats every pause for as long as it lasts.
            self._accept_errors.log(
                f"cannot accept a connection: {exc.strerror or exc}", {}, stacklevel=2
            )
            if exc.errno in _OUT_OF_FDS:
                # The listening socket stays readable: stop watching it for a moment, not spin.
                self._unwatch()
                self._loop.call_later(_OUT_OF_FDS_PAUSE, self._watch)
            return
        conn.setblocking(False)
        self._connections.pending(1)
        deadline = self._loop.time() + self._timeout
        if self._context is None:
            self._start(self._loop.connect_accepted_socket(self._protocol(deadline), conn))
            return
        self._waiting[conn] = self._loop.call_at(deadline, self._late, conn)
        self._loop.add_reader(conn.fileno(), self._first_byte, conn, deadline)

    def _protocol(self, deadline: float) -> Callable[[], asyncio.Protocol]:
        factory = self._factory
        return lambda: factory(deadline)

    def _start(self, work: Any) -> None:
        task = self._loop.create_task(self._quietly(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, work: Any) -> None:
        try:
            await work
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # The client's mistake or its hang-up, not Aegis's: not worth a log line each.
            log.debug("connection failed before its first request: %s", exc)
        finally:
            self._connections.pending(-1)

    def _forget(self, conn: socket.socket) -> None:
        timer = self._waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(conn.fileno())

    def _late(self, conn: socket.socket) -> None:
        log.debug("closing a connection that sent nothing within %.3g s", self._timeout)
        self._forget(conn)
        self._connections.pending(-1)
        conn.close()

    def _first_byte(self, conn: socket.socket, deadline: float) -> None:
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self._forget(conn)
        if not first or first[0] != _HANDSHAKE_RECORD:
            self._connections.pending(-1)
        if not first:
            conn.close()
        elif first[0] == _HANDSHAKE_RECORD:
            remaining = max(deadline - self._loop.time(), 0.001)
            self._start(
                self._loop.connect_accepted_socket(
                    self._protocol(deadline),
                    conn,
                    ssl=self._context,
                    ssl_handshake_timeout=remaining,
                )
            )
        else:
            _refuse_plain(conn)


def _refuse_plain(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # Read what was sent first: closing with unread bytes would reset the connection, and
        # the reset can reach the client before it reads the answer.
        conn.recv(1 << 16)
        conn.send(_PLAIN_ANSWER)
        conn.shutdown(socket.SHUT_WR)
    conn.close()
    log.debug("400: plain HTTP on a TLS listener")
