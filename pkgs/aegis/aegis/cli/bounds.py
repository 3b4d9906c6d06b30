"""Bounds on each client connection that aiohttp does not enforce: head deadline, head size,
and a deadline on writing to a client that stopped reading.

* **Read-header deadline.** aiohttp's ``keepalive_timeout`` closes a connection that sends
  nothing, but its timer is cancelled by the first byte of a request: a client that dribbles a
  header byte a second (a slowloris) would keep its connection for as long as it likes. As Go's
  ``http.Server.ReadHeaderTimeout`` does, the whole head (request line and headers, up to the
  blank line) must be in within the deadline from the accept (a TLS handshake included: the
  :class:`~aegis.cli.accept.Acceptor` says when the first head is due) or from the first byte of a
  following request, or the connection is closed without an answer. A request pipelined
  behind one still being answered has its deadline from the end of that answer (Go's server
  reads the next request only then): the head may well be unfinished because the client reads
  the answer before sending the rest, and a deadline from its first byte would cut the answer.
* **Head size.** A head larger than the bound is answered ``431`` and the connection closed,
  before aiohttp parses it and so before any authentication: aiohttp alone accepts 128 lines of
  8 KiB each and holds every byte while it waits for the rest.
* **Write deadline.** When the transport's buffer is full (``pause_writing``) and the client
  consumes nothing of the answer for longer than the deadline, it is not reading: the
  connection is aborted, whatever the answer (a whole page, a streamed one, a pipelined queue
  of them), and the kernel frees the socket's buffers. A full buffer alone says nothing: a
  client that reads slowly keeps it full (the kernel holds up to ``TCP_NOTSENT_LOWAT`` unsent
  bytes, and the transport stays paused while they drain) and must not be cut. So while the
  buffer is full, the deadline is checked a few times per period (:data:`_WRITE_CHECKS`)
  against what the client consumed (:func:`_consumed`); any progress starts it again.

It is a thin protocol wrapped around aiohttp's own, so it relies on nothing inside aiohttp: it
watches the bytes go by for the blank line that ends a head and passes everything through
untouched. Bytes after a head that are not a new request (a request body) count as a head too;
Aegis answers GET and HEAD only, and a body it never reads is no reason to keep a connection.
Empty lines before a request line are skipped by the HTTP parser (RFC 9112 §2.2), so they are no
head: they are the beginning of the next one, and its deadline runs from the first of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from .accept import ProtocolFactory
from .process import release_free_memory

__all__ = ["ConnectionBounds", "Connections", "Guard"]

log = logging.getLogger("aegis.server")

_END_OF_HEAD = b"\r\n\r\n"
# An end of head followed by CR or LF: empty lines, which start no request (RFC 9112 §2.2).
_EMPTY_AFTER_HEAD = (b"\r\n\r\n\r", b"\r\n\r\n\n")
_LINE_ENDS = b"\r\n"
# After a 431, what the client still sends is read and dropped for a moment (at most this much):
# closing with unread bytes would make the kernel reset the connection, and the reset can reach
# the client before it has read the answer.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20
# What the TLS layer may hold for a connection before the write deadline is watched.
_TLS_HIGH_WATER = 64 * 1024
# An unfinished head larger than this makes the memory be given back after the connection.
_HEAVY_HEAD = 16 * 1024
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s
# While the write buffer is full, the client's progress is looked at this many times per write
# timeout: a client that stops reading is cut between one and 1 + 1/_WRITE_CHECKS timeouts
# after its last progress.
_WRITE_CHECKS = 4
# struct tcp_info up to tcpi_bytes_acked (a u64 at offset 120, Linux 4.1 and later).
_TCP_INFO_BYTES_ACKED = 120
_TCP_INFO_SIZE = _TCP_INFO_BYTES_ACKED + 8
_TCP = (socket.AF_INET, socket.AF_INET6)
_INT = struct.Struct("i")
# A connection that held a large head gives the C heap's free pages back this long after it closed.
_TRIM_DELAY = 1.0


def _consumed(transport: asyncio.Transport) -> int | None:
    """A number that grows when the client consumes some of the answer (None: unknown).

    TCP: the bytes the client acknowledged (``tcpi_bytes_acked``). Once its receive buffer is
    full, the client acknowledges only what it reads, and the count ignores what Aegis adds
    meanwhile. Under TLS the socket is the one beneath the SSL layer: ciphertext, as good.
    Unix sockets count nothing of the kind: what is still queued, in the kernel (``SIOCOUTQ``:
    bytes the client has not read yet) and in the transport, shrinks only as the client reads,
    so its negative is used. An answer written while the buffer is full can hide progress for
    one check, never fake it.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        if sock.family in _TCP:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            if len(info) >= _TCP_INFO_SIZE:
                return int.from_bytes(info[_TCP_INFO_BYTES_ACKED:_TCP_INFO_SIZE], "little")
        queued: int = _INT.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(_INT.size)))[0]
    except (OSError, ValueError):  # closed meanwhile: fileno() -1
        return None
    return -(queued + transport.get_write_buffer_size())


@dataclass(frozen=True, slots=True)
class ConnectionBounds:
    """What each client connection may take; see the module's description."""

    #: Seconds from accept (or a request's first byte) to the end of its head.
    read_header_timeout: float = 10.0
    #: Bytes of one request head (request line, headers, blank line); past it, 431.
    max_head_bytes: int = 64 * 1024
    #: Seconds a full write buffer may wait with the client consuming nothing of it.
    write_timeout: float = 30.0


def _answer_431(limit: int) -> bytes:
    body = f"request head larger than {limit} bytes\n".encode()
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class Connections:
    """The open connections (the Guard of each), for the stop's log line.

    When connections that held large request heads have closed, the C heap's free pages are
    given back to the system, once, a moment later (:data:`_TRIM_DELAY`): otherwise the
    memory they took stays with the process.
    """

    __slots__ = ("_members", "_trim")

    def __init__(self) -> None:
        self._members: set[object] = set()
        self._trim: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: object) -> None:
        self._members.add(member)

    def discard(self, member: object) -> None:
        self._members.discard(member)

    def release_later(self) -> None:
        """A connection that held a large head has closed."""
        if self._trim is None:
            loop = asyncio.get_running_loop()
            self._trim = loop.call_later(_TRIM_DELAY, self._release)

    def _release(self) -> None:
        self._trim = None
        release_free_memory()


class Guard(asyncio.Protocol):
    """Wraps one connection's protocol and enforces :class:`ConnectionBounds` on it."""

    __slots__ = (
        "_answered",
        "_bounds",
        "_deferred",
        "_first_due",
        "_head_bytes",
        "_heads",
        "_heavy",
        "_inner",
        "_live",
        "_refused",
        "_started",
        "_tail",
        "_timer",
        "_transport",
        "_write_mark",
        "_write_quiet",
        "_write_timer",
    )

    def __init__(
        self,
        inner: asyncio.Protocol,
        bounds: ConnectionBounds,
        live: Connections | None = None,
        first_due: float | None = None,
    ) -> None:
        self._inner = inner
        # When the first head is due (the event loop's time), if the connection began before
        # connection_made: a TLS handshake takes its time from that head's deadline.
        self._first_due = first_due
        self._bounds = bounds
        self._live = live
        self._timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_mark: int | None = None  # _consumed() at the last check
        self._write_quiet = 0  # checks in a row that saw no progress
        self._transport: asyncio.Transport | None = None
        self._tail = b""  # the last bytes of a head in progress: the blank line may be split
        self._head_bytes = 0  # of the head in progress, empty lines before it included
        self._started = False  # the head in progress has more than empty lines
        self._heads = 0  # complete heads passed on to aiohttp
        self._answered = 0  # answers aiohttp has written out (answered())
        self._deferred = False  # a head is in progress, its deadline waits for answered()
        self._refused = -1  # bytes dropped since a 431, or -1
        self._heavy = False  # held a large unfinished head, or a full write buffer, at some point

    @classmethod
    def factory(
        cls,
        inner: Callable[[], asyncio.Protocol],
        bounds: ConnectionBounds,
        live: Connections | None = None,
    ) -> ProtocolFactory:
        """A protocol factory; ``live`` (if given) holds every connection open at the moment."""
        return lambda first_due: cls(inner(), bounds, live, first_due)

    def _arm(self) -> None:
        """A new head begins: its deadline starts now, or once the answers before it are out."""
        self._disarm()  # the deadline of a head that just completed, in the same read
        self._tail = b""
        self._head_bytes = 0
        self._started = False
        if self._answered < self._heads:
            self._deferred = True
        else:
            self._start_deadline()

    def _start_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + self._bounds.read_header_timeout, self._late)

    def _disarm(self) -> None:
        self._deferred = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def answered(self) -> None:
        """aiohttp has written out an answer (and waited for a full buffer to drain).

        A head deferred behind the answers starts its deadline once the last is out. Should a
        request body hold a blank line (counted here as one more head: aiohttp answers GET and
        HEAD only, so that is no real scrape), the count never catches up and the unfinished
        head is bounded by the idle timeout instead, which aiohttp applies while it waits.
        """
        # Never ahead of the heads: an answer to something not counted as one (aiohttp's own
        # 400) must not let a later head skip its wait.
        self._answered = min(self._answered + 1, self._heads)
        if self._deferred and self._answered >= self._heads and self._transport is not None:
            self._deferred = False
            self._start_deadline()

    def _late(self) -> None:
        self._timer = None
        if self._transport is not None:
            log.debug(
                "closing a connection whose request head took over %.3g s",
                self._bounds.read_header_timeout,
            )
            self._transport.abort()  # nothing to flush: the client has not asked anything yet

    def _check_writing(self) -> None:
        """The write buffer is still full: cut the client if it consumed nothing for a whole
        write timeout."""
        self._write_timer = None
        transport = self._transport
        if transport is None:
            return
        mark = _consumed(transport)
        if mark is not None and self._write_mark is not None and mark > self._write_mark:
            self._write_quiet = 0
        else:
            self._write_quiet += 1
        self._write_mark = mark
        if self._write_quiet >= _WRITE_CHECKS:
            self._not_reading(transport)
        else:
            self._start_write_check()

    def _start_write_check(self) -> None:
        loop = asyncio.get_running_loop()
        self._write_timer = loop.call_at(
            loop.time() + self._bounds.write_timeout / _WRITE_CHECKS, self._check_writing
        )

    def _not_reading(self, transport: asyncio.Transport) -> None:
        log.debug(
            "closing a connection that read nothing of its answer for %.3g s",
            self._bounds.write_timeout,
        )
        # A plain close() leaves the unsent bytes with the kernel, which keeps the socket (and
        # its buffers) while it probes a zero window for minutes; a reset frees them at once.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        transport.abort()

    def _too_large(self) -> None:
        """Answer 431 on a connection's first request; close after the answers in progress
        on a later one."""
        self._disarm()
        transport = self._transport
        if transport is None:
            return
        limit = self._bounds.max_head_bytes
        self._refused = 0
        if self._heads:
            # An earlier request may still be being answered: a 431 written now could land in
            # the middle of that answer. aiohttp's handler closes the connection once it has
            # answered what it already has (RequestHandler.close); a plain protocol, at once.
            log.debug("closing a connection whose request head is over %d bytes", limit)
            close = getattr(self._inner, "close", None)
            if callable(close):
                close()
            else:
                transport.close()
            return
        log.debug("431: a request head over %d bytes", limit)
        transport.write(_answer_431(limit))
        if transport.can_write_eof():
            transport.write_eof()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + _LINGER_SECONDS, transport.abort)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream server's transport
        if transport.get_extra_info("ssl_object") is not None:
            # uvloop's TLS layer would take a whole answer of a megabyte or so before pausing
            # the protocol, and a client that reads none of it would never start the write
            # deadline; with this bound it pauses, as a plain TCP transport does.
            self._transport.set_write_buffer_limits(high=_TLS_HIGH_WATER)
        if self._live is not None:
            self._live.add(self)
        if self._first_due is None:
            self._arm()
        else:
            # Already past due (a handshake that used the whole deadline) fires at once.
            self._timer = asyncio.get_running_loop().call_at(self._first_due, self._late)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused >= 0:
            self._refused += len(data)
            if self._refused > _LINGER_BYTES and self._transport is not None:
                self._transport.abort()
            return
        if self._timer is None and not self._deferred:
            if (
                data.endswith(_END_OF_HEAD)
                and len(data) <= self._bounds.max_head_bytes
                and data[0] not in _LINE_ENDS
                and not any(empty in data for empty in _EMPTY_AFTER_HEAD)
            ):
                # The usual scrape: a whole request in one read (or several, pipelined), each
                # head beginning with its request line. Nothing is left pending, so there is no
                # deadline to set and cancel.
                self._heads += data.count(_END_OF_HEAD)
                self._inner.data_received(data)
                return
            self._arm()  # the first byte of a new request, or of empty lines before one
        complete = self._count(data)
        if complete < 0:
            self._inner.data_received(data)
            return
        if complete:
            self._inner.data_received(data[:complete])  # the heads before the one too large
        self._too_large()

    def _count(self, data: bytes) -> int:
        """Follow the heads in ``data``: -1 if all is well, else how many of its bytes came
        before the head that is over the bound.

        Only a head with a request line counts: a blank line ending nothing but empty lines is
        skipped by the parser, which answers nothing for it, so counting it would leave the
        next head waiting for an answer that never comes, with no deadline. Empty lines belong
        to the head after them: its deadline and its size count them."""
        limit = self._bounds.max_head_bytes
        carried = len(self._tail)  # already counted in _head_bytes
        seen = self._tail + data if carried else data
        size = self._head_bytes
        started = self._started
        start = 0
        after_head = -1  # where the last complete head ended in ``seen``
        while (found := seen.find(_END_OF_HEAD, start)) >= 0:
            end = found + len(_END_OF_HEAD)
            size += end - max(start, carried)
            if size > limit:
                return max(start - carried, 0)
            if started or seen[start:found].strip(_LINE_ENDS):
                self._heads += 1
                size = 0
                started = False
                after_head = end
            start = end
        size += len(seen) - max(start, carried)
        if size > limit:
            return max(start - carried, 0)
        if after_head == len(seen):
            self._disarm()  # every head so far is complete: the handler takes it from here
            self._started = False
        else:
            if after_head > 0:
                # A pipelined request (or empty lines before one) has begun behind the complete
                # one: its deadline starts now, or once the answers before it are out.
                self._arm()
                size = len(seen) - after_head
            self._started = started or bool(seen[max(start, after_head) :].strip(_LINE_ENDS))
        self._head_bytes = size
        self._tail = seen[-3:]
        if size > _HEAVY_HEAD:
            self._heavy = True
        return -1

    def eof_received(self) -> bool | None:
        if self._refused >= 0:
            return False
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._transport = None
        if self._live is not None:
            self._live.discard(self)
            if self._heavy or self._refused >= 0:
                self._live.release_later()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        # A full buffer holds up to an answer and the high-water mark: like a large head, it
        # is given back to the system after the connection (a hundred such connections hold
        # megabytes that the C heap would otherwise keep).
        self._heavy = True
        if self._write_timer is None and self._transport is not None:
            self._write_mark = _consumed(self._transport)
            self._write_quiet = 0
            self._start_write_check()
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._inner.resume_writing()
