"""Accepting connections on a listening socket, and the plain-HTTP answer on a TLS listener.

Not ``loop.create_server``: that cannot tell a plain-HTTP client on a TLS listener what went
wrong, and it would ``listen()`` again with a backlog of its own. TLS listeners answer such a
client as Go servers do: each connection is first read without consuming anything
(``MSG_PEEK``); a first byte that starts a TLS handshake record (0x16) goes on to the handshake on
the same socket, anything else is answered ``400 Client sent an HTTP request to an HTTPS
server.`` and closed. The read-header deadline is one deadline from the accept: it covers the
wait for that first byte, the handshake (asyncio's ``ssl_handshake_timeout``) and the first
request head together (the protocol gets it from :data:`ProtocolFactory`, so the head has what
the handshake left, not a fresh deadline of its own). The SSL context is used as given, so
certificate rotation (its SNI callback) keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from ..logs import RateLimited

__all__ = ["Acceptor", "ProtocolFactory"]

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
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_OUT_OF_FDS_PAUSE = 0.1


class Acceptor:
    """Accepts on ``sock`` and hands each connection to a protocol from ``factory``."""

    def __init__(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        *,
        context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._sock = sock
        self._factory = factory
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
            conn.close()
        # Connections being handed over are left to finish (a TLS handshake within its
        # deadline): cancelled half-way, one could stay registered with aiohttp and hold the
        # stop for the whole grace period.

    def _watch(self) -> None:
        if not self._closed and not self._watching:
            self._loop.add_reader(self._sock.fileno(), self._take)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False

    def _take(self) -> None:
        if self._closed:
            return
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

    @staticmethod
    async def _quietly(work: Any) -> None:
        try:
            await work
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # The client's mistake or its hang-up, not Aegis's: not worth a log line each.
            log.debug("connection failed before its first request: %s", exc)

    def _forget(self, conn: socket.socket) -> None:
        timer = self._waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(conn.fileno())

    def _late(self, conn: socket.socket) -> None:
        log.debug("closing a connection that sent nothing within %.3g s", self._timeout)
        self._forget(conn)
        conn.close()

    def _first_byte(self, conn: socket.socket, deadline: float) -> None:
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self._forget(conn)
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
