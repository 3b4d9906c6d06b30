"""A lean HTTP/1.1 client for Unix-socket upstreams.

Why not ``aiohttp.ClientSession``: measured on a 33 KB page, its per-request machinery costs about
half of a proxied scrape. This client does only what a scrape needs — send one request head, parse
the answer with llhttp (``httptools``), stream the body with back-pressure — and keeps idle
keep-alive connections per socket *identity* (device and inode), so connections are never shared
across sockets and a service that replaced its socket file gets fresh ones.

Everything an upstream sends is bounded or refused: a response head (interim answers included)
over :data:`MAX_HEAD` bytes, a status outside 100-599, a switch of protocol (101), a redirect
(any 3xx but 304: a metrics endpoint never redirects, and a scraper that followed one would take
its credentials for Aegis wherever the service pointed it), and bytes that do not parse are each
an :class:`UpstreamError`; bytes after a complete answer, in the same
read or while the connection is idle, are never read as part of any answer (the connection is
dropped instead of reused). An unsolicited answer that arrives only after the connection was
reused cannot be told from the answer to the new request (HTTP/1.1 has no request ids): it is
taken for it, and the real answer, coming on top, then closes the connection.

A body framed by ``Content-Length`` goes through llhttp only as far as the read that carried the
end of the head: the reads after it are the body as they come, queued for the handler as they are
(llhttp would hand each over as a fresh copy). Such a connection gets a fresh parser for its next
exchange, llhttp still waiting for the body it was not given.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import NoReturn, cast

import httptools

# Body bytes buffered from the upstream before reading from it pauses: memory stays flat however
# large the page, because the client side drains at its own pace.
_HIGH_WATER = 64 * 1024
_LOW_WATER = 16 * 1024
#: Bytes of response head (status lines and header fields of the final answer and any interim
#: ones) accepted from an upstream; also the most bytes it may send without the parser making
#: progress (chunk extensions, trailers). A real exporter's head is a few hundred bytes.
MAX_HEAD = 64 * 1024

# A Content-Length of more digits is refused (an exabyte).
_MAX_LENGTH_DIGITS = 18
#: Idle keep-alive connections kept per socket, by default: a scraper asks each target once per
#: interval, so a few serve it; a burst of concurrent scrapes leaves no more open than this in
#: Aegis and in the service once it is over.
MAX_IDLE_PER_SOCKET = 4
#: Idle connections kept for all sockets together: a client that asks each of thousands of
#: targets once leaves no more than this many descriptors open.
MAX_IDLE_TOTAL = 128


class UpstreamError(Exception):
    """The upstream failed. ``kind`` is a short word for metrics; the message is for people."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Stop(Exception):
    """Raised in a parser callback to stop parsing: the exchange's outcome is already decided."""


class Exchange(asyncio.Protocol):
    """One upstream connection, carrying one request/response exchange at a time.

    The handler sees it after the response head arrived: ``status``, ``reason``, ``headers``,
    then :meth:`read` until it returns ``b""``, then :meth:`UpstreamPool.release`.
    """

    def __init__(self, identity: tuple[int, int], socket: str) -> None:
        self.identity = identity
        self.socket = socket
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.on_idle_lost: Callable[[Exchange], None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None  # closes it when idle too long
        # One parser for the connection's life: llhttp reads consecutive keep-alive answers by
        # itself, and building one binds every callback anew.
        self._parser = httptools.HttpResponseParser(self)
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # Bytes received since the parser last produced something (a final head, body bytes):
        # what an endless head, endless trailers or endless chunk extensions pile up.
        self._unproductive = 0
        self._head_size = 0
        self._active = False
        self._head_only = False
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._got_bytes = False
        self._framed = False
        # Body bytes still due by the final answer's Content-Length; -1 without one (or before
        # the head). Once the head's read is parsed, the rest is taken around the parser.
        self._left = -1
        self._around = False
        self._complete = False
        self._keep_alive = False
        self._error: UpstreamError | None = None

    # -- the exchange, as the handler drives it ------------------------------------------------

    async def start(self, request_head: bytes, *, head_only: bool) -> None:
        """Send the request and wait for the response head."""
        loop = asyncio.get_running_loop()
        self._reset_exchange()
        self._head_only = head_only
        self._active = True
        self._head = loop.create_future()
        assert self.transport is not None
        if self.closed or self.transport.is_closing():
            if self.reused:
                raise UpstreamError("stale", "reused connection closed")
            raise UpstreamError("reset", "connection closed before an answer")
        self.transport.write(request_head)
        await self._head
        if self._error is not None:
            raise self._error

    async def read(self) -> bytes:
        """The next piece of the body; ``b""`` once it is complete. Raises :class:`UpstreamError`
        when the upstream breaks off, so a partial page is never taken for a whole one."""
        while True:
            if self._body:
                data = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._buffered = 0
                if self._paused and self.transport is not None and not self.closed:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    @property
    def finished(self) -> bool:
        """The whole body has been received and read."""
        return self._complete and not self._body and self._error is None

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.closed and not self._body

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        for fut in (self._head, self._waiter):
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active or self._complete:
            # Bytes nobody asked for: this connection can't be trusted for another exchange.
            self._keep_alive = False
            self.close()
            return
        self._got_bytes = True
        if self._around:
            self._body_around(data)
            return
        self._unproductive += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # Usually a callback stopped the parser, having decided the outcome (then this is a
            # no-op); anything else raised in a callback still ends the exchange.
            self._fail(UpstreamError("protocol", f"upstream answer refused: {exc.__context__!r}"))
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"invalid HTTP from upstream: {exc}"))
        else:
            if self._unproductive <= MAX_HEAD or self._complete:
                self._around = self._left > 0 and not self._complete
                return
            what = "response head" if self.status == 0 else "chunk framing or trailers"
            self._fail(UpstreamError("too_large", f"{what} over {MAX_HEAD} bytes"))
        # Whatever the answer came to, this connection is done: an error, or bytes after a
        # complete answer (they belong to no request; reused, they would answer the next one).
        self._keep_alive = False
        self.abort()

    def _body_around(self, data: bytes) -> None:
        """The next read of a body framed by Content-Length, the parser left out."""
        left = self._left
        size = len(data)
        if size < left:
            self._left = left - size
            self._queue(data)
            return
        self._left = 0
        self._around = False
        self._complete = True
        self._keep_alive = size == left and self._parser.should_keep_alive()
        if self._keep_alive:
            # llhttp is still in the middle of this body: the next answer needs a parser of its
            # own.
            self._parser = httptools.HttpResponseParser(self)
        self._queue(data if size == left else data[:left])
        self._wake()
        if size > left:
            # Bytes after the complete answer belong to no request: the connection is done.
            self.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_idle_lost is not None:
            self.on_idle_lost(self)
        if not self._active or self._complete:
            return
        head_seen = self._head is not None and self._head.done()
        if not head_seen:
            if self.reused and not self._got_bytes:
                self._fail(UpstreamError("stale", "reused connection closed"))
            else:
                self._fail(UpstreamError("reset", "connection closed before an answer"))
        elif not self._framed and exc is None:
            # No Content-Length and not chunked: the body is delimited by the close.
            self._complete = True
            self._wake()
        else:
            self._fail(UpstreamError("truncated", "upstream closed the connection mid-body"))

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Stop  # a second answer to one request: never merged into the first

    def on_status(self, status: bytes) -> None:
        self.reason = status
        self._head_size += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            return  # trailer fields after a chunked body: nothing a scrape relays
        self.headers.append((name, value))
        self._head_size += len(name) + len(value)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101 or not 100 <= status < 600:
            self._stop(UpstreamError("protocol", f"upstream answered with status {status:03d}"))
        if self._head_size > MAX_HEAD:
            self._stop(UpstreamError("too_large", f"response head over {MAX_HEAD} bytes"))
        if 300 <= status < 400 and status != 304:
            # Never relayed: Prometheus follows redirects, with the credentials it has for Aegis.
            self._stop(
                UpstreamError(
                    "redirect",
                    f"upstream answered {status}: a metrics endpoint does not redirect",
                )
            )
        if status < 200:
            # An interim answer (e.g. 103 Early Hints); the real one follows. Its bytes still
            # count towards the head's bound, so endless interim answers are refused too.
            self.headers = []
            return
        self._unproductive = 0
        self.status = status
        try:
            length = _content_length(self.headers)
        except ValueError as exc:
            self._stop(UpstreamError("protocol", str(exc)))
        self._framed = status in (204, 304) or any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers
        )
        if self._framed and not self._head_only and status not in (204, 304):
            self._left = length
        if self._head_only:
            # llhttp does not know this answered a HEAD and would wait for the announced body;
            # the exchange ends here and the connection is not reused.
            self._complete = True
            self._keep_alive = False
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        if self.status == 0:
            # llhttp reads a body framed on an interim answer (a 1xx other than 100, 102 and
            # 103): relayed, it would come before the page, as part of it.
            self._stop(UpstreamError("protocol", "an interim (1xx) answer with a body"))
        self._unproductive = 0
        if self._left > 0:
            self._left -= len(body)
        self._queue(body)

    def _queue(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self.status == 0 or self._complete:  # end of an interim answer, or of a HEAD's head
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    def _stop(self, error: UpstreamError) -> NoReturn:
        self._fail(error)
        raise _Stop


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The body's length as Content-Length announces it, or -1 when another framing (chunked)
    applies or none is given. Every Content-Length value is checked (:func:`content_length`,
    ValueError), whatever the framing: a HEAD's or a 204's is relayed as a number too."""
    length, chunked = -1, False
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            chunked = True
        elif lower == b"content-length":
            length = content_length(value)
    return -1 if chunked else length


def content_length(value: bytes) -> int:
    """A Content-Length value llhttp accepted (digits, maybe leading zeros), as a number.

    ValueError past 18 significant digits: no page is an exabyte, and Python's ``int()`` refuses
    strings of more than 4300 digits, leading zeros included, which llhttp lets through.
    """
    digits = value.strip().lstrip(b"0")
    if len(digits) > _MAX_LENGTH_DIGITS:
        raise ValueError(f"Content-Length of {len(digits)} digits")
    return int(digits or b"0")


class UpstreamPool:
    """Idle keep-alive connections, per socket identity; one pool per application.

    Invariant: an idle connection is closed by its own timer ``idle_timeout`` seconds after it
    was handed back, whether or not anything asks for that socket again, and at most
    ``max_idle_per_socket`` per socket and ``max_idle_total`` in all are kept (past either, the
    connection handed back, or the one idle longest, is closed). So whatever clients do, the
    descriptors idle connections hold, in Aegis and in every service, are bounded in number
    and in time.
    """

    def __init__(
        self,
        *,
        max_idle_per_socket: int = MAX_IDLE_PER_SOCKET,
        idle_timeout: float = 60.0,
        max_idle_total: int = MAX_IDLE_TOTAL,
    ) -> None:
        self._max_idle = max_idle_per_socket
        self._max_total = max_idle_total
        self._idle_timeout = idle_timeout
        # Keyed by the socket file's identity alone: the address a connection was made through
        # may be a /proc/self/fd name (aegis.targets), which changes while the file stays.
        self._idle: dict[tuple[int, int], deque[Exchange]] = {}
        # Every idle connection, the one idle longest first.
        self._by_age: dict[Exchange, None] = {}

    async def send(
        self, socket: str, identity: tuple[int, int], request_head: bytes, *, head_only: bool
    ) -> Exchange:
        """Send a request to the socket and return the exchange once its response head arrived.

        On any failure or cancellation the connection is aborted here, so the caller owns a
        connection only once this returns. An idle connection the service closed as it was
        picked up is retried once, on a fresh connection.
        """
        conn = self._take_idle(identity)
        if conn is not None:
            try:
                await conn.start(request_head, head_only=head_only)
                return conn
            except UpstreamError as exc:
                conn.abort()
                if exc.kind != "stale":
                    raise
                # The service closed it (it restarted, or its keep-alive timer ran out): a GET
                # is safe to send again.
            except BaseException:
                conn.abort()
                raise
        conn = await self._connect(socket, identity)
        try:
            await conn.start(request_head, head_only=head_only)
        except BaseException:
            conn.abort()
            raise
        return conn

    def release(self, conn: Exchange) -> None:
        """Hand back a finished exchange: kept for reuse when the upstream allows it."""
        if not conn.reusable or self._max_idle == 0 or self._max_total == 0:
            conn.close()
            return
        idle = self._idle.setdefault(conn.identity, deque())
        if len(idle) >= self._max_idle:
            conn.close()
            return
        if len(self._by_age) >= self._max_total:
            self._expire(next(iter(self._by_age)))
        conn.reused = True
        conn.on_idle_lost = self._forget
        loop = asyncio.get_running_loop()
        conn.idle_timer = loop.call_later(self._idle_timeout, self._expire, conn)
        idle.append(conn)
        self._by_age[conn] = None

    def close(self) -> None:
        for conn in list(self._by_age):
            self._expire(conn)

    def idle_count(self) -> int:
        return len(self._by_age)

    def _expire(self, conn: Exchange) -> None:
        self._forget(conn)
        conn.close()

    def _forget(self, conn: Exchange) -> None:
        """``conn`` is idle no more: taken, expired, or closed by the service."""
        conn.on_idle_lost = None
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        self._by_age.pop(conn, None)
        key = conn.identity
        idle = self._idle.get(key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[key]

    def _take_idle(self, identity: tuple[int, int]) -> Exchange | None:
        idle = self._idle.get(identity)
        while idle:
            conn = idle[-1]  # the most recently used: the least likely to be timed out
            self._forget(conn)
            if not conn.closed:
                return conn
        return None

    async def _connect(self, socket: str, identity: tuple[int, int]) -> Exchange:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_unix_connection(lambda: Exchange(identity, socket), socket)
        except ConnectionRefusedError:
            raise UpstreamError(
                "refused", "connection refused (nothing listens on the socket: stale socket file?)"
            ) from None
        except PermissionError:
            raise  # the handler explains which file and group
        except FileNotFoundError:
            raise UpstreamError("gone", "socket disappeared") from None
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect: {exc.strerror or exc}") from None
        return conn
