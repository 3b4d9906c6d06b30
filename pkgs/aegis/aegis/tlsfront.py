"""A TLS listener that tells a plain-HTTP client what went wrong, as Go servers do.

With ``ssl=`` on ``create_server`` a client that speaks plain HTTP to a TLS port gets an
empty reply: the handshake fails on its first byte and the connection is closed. Here each
accepted connection is first read without consuming anything (``MSG_PEEK``): a first byte that
starts a TLS handshake record (0x16) goes on to the TLS handshake on the same socket; anything
else is answered ``400 Client sent an HTTP request to an HTTPS server.`` and closed. The
read-header deadline covers the wait for that first byte and the handshake together.

The SSL context is used as given, so certificate rotation (its SNI callback) keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable

__all__ = ["TLSListener"]

log = logging.getLogger("aegis.server")

_HANDSHAKE_RECORD = 0x16
_BODY = b"Client sent an HTTP request to an HTTPS server.\n"
_PLAIN_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)
# Connections taken per wake-up: the other workers, woken by the same listening socket, get the
# rest of a burst.
_ACCEPT_BATCH = 16
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_OUT_OF_FDS_PAUSE = 0.1


class TLSListener:
    """Accepts on ``sock`` and hands TLS connections to ``factory``'s protocols."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        timeout: float,
    ) -> None:
        self._sock = sock
        self._factory = factory
        self._context = context
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[socket.socket, asyncio.TimerHandle] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and drop the connections not handed over yet."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        for conn in list(self._waiting):
            self._forget(conn)
            conn.close()
        for task in self._handshakes:
            task.cancel()

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_FDS:
                    raise
                # The listening socket stays readable: stop watching it for a moment rather
                # than spin.
                log.error("cannot accept a connection: %s", exc.strerror or exc)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(_OUT_OF_FDS_PAUSE, self._resume)
                return
            conn.setblocking(False)
            deadline = self._loop.time() + self._timeout
            self._waiting[conn] = self._loop.call_at(deadline, self._late, conn)
            self._loop.add_reader(conn.fileno(), self._first_byte, conn, deadline)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

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
            task = self._loop.create_task(self._handshake(conn, deadline))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
        else:
            _refuse_plain(conn)

    async def _handshake(self, conn: socket.socket, deadline: float) -> None:
        remaining = max(deadline - self._loop.time(), 0.001)
        try:
            await self._loop.connect_accepted_socket(
                self._factory, conn, ssl=self._context, ssl_handshake_timeout=remaining
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # The client's mistake (or its hang-up), not Aegis's: not worth a log line each.
            log.debug("TLS handshake failed: %s", exc)


def _refuse_plain(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # Read what was sent first: closing with unread bytes would reset the connection, and
        # the reset can reach the client before it reads the answer.
        conn.recv(1 << 16)
        conn.send(_PLAIN_ANSWER)
        conn.shutdown(socket.SHUT_WR)
    conn.close()
    log.debug("400: plain HTTP on a TLS listener")
