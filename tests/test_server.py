"""Running Aegis as a process: listener syntax, graceful stop, signals, connection bounds."""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import signal
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
import trustme
from aegisrun import Children, free_port, fresh_get, needs_aegis

from aegis.cli.listeners import Listener
from conftest import Upstreams


@pytest.mark.parametrize(
    ("text", "expected", "shown"),
    [
        ("127.0.0.1:31337", Listener(host="127.0.0.1", port=31337), "127.0.0.1:31337"),
        ("localhost:0", Listener(host="localhost", port=0), "localhost:0"),
        ("[::1]:9100", Listener(host="::1", port=9100), "[::1]:9100"),
        ("[::]:31337", Listener(host="::", port=31337), "[::]:31337"),
        (":9100", Listener(host="", port=9100), ":9100"),
        ("unix:/run/aegis.sock", Listener(unix_path="/run/aegis.sock"), "unix:/run/aegis.sock"),
    ],
)
def test_listener_parse_accepts(text, expected, shown):
    parsed = Listener.parse(text)
    assert parsed == expected
    assert str(parsed) == shown
    assert Listener.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense", "'nonsense' is not host:port (IPv6 in brackets: [::1]:31337)"),
        ("127.0.0.1", "'127.0.0.1' is not host:port"),
        ("127.0.0.1:", "'127.0.0.1:' is not host:port"),
        ("127.0.0.1:http", "'127.0.0.1:http' is not host:port"),
        ("127.0.0.1:-1", "'127.0.0.1:-1' is not host:port"),
        ("127.0.0.1:65536", "'127.0.0.1:65536' is not host:port"),
        ("", "'' is not host:port"),
        ("::1:80", "'::1:80': an IPv6 address goes in brackets, like [::1]:31337"),
        ("[::1:80", "'[::1:80': an IPv6 address goes in brackets"),
        ("unix:", "'unix:': unix: needs a socket path"),
    ],
)
def test_listener_parse_rejects_naming_the_text(text, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Listener.parse(text)


FIRST = b"# HELP slow_value A page that arrives in two parts.\n# TYPE slow_value gauge\n"
REST = b"".join(b'slow_value{part="%d"} %d\n' % (i, i) for i in range(2000))


class SlowUpstream:
    """Sends the head and the first part at once, the rest only when the test says so."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % (
            len(FIRST) + len(REST)
        )
        writer.write(head + FIRST)
        await writer.drain()
        self.asked.set()
        await asyncio.wait_for(self.release.wait(), 60)
        writer.write(REST)
        await writer.drain()
        writer.close()


async def wait_refused(port: int, within: float = 20.0) -> None:
    """Until connecting to the port is refused: nothing listens there any more."""
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            # This probe was queued on the listening socket as its last holder closed it (the
            # kernel drops what waits on a closed one). Not accepted, but not yet the answer
            # either: ask again.
            pass
        else:
            writer.close()
        assert time.monotonic() < deadline, f"port {port} still accepts {within} s after the signal"
        await asyncio.sleep(0.05)


@needs_aegis
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_lets_the_scrape_in_flight_finish(signum, children, upstreams, sockdir):
    upstream = SlowUpstream()
    await upstreams.raw(sockdir / "slow.sock", upstream)
    aegis, port = await children.serve(sockdir, "--shutdown.grace-period", "30s")

    in_flight = asyncio.create_task(fresh_get(f"http://127.0.0.1:{port}/slow"))
    await asyncio.wait_for(upstream.asked.wait(), 20)
    aegis.popen.send_signal(signum)
    # The upstream holds the rest of the page until no new connection can get in.
    await wait_refused(port)
    upstream.release.set()

    assert await in_flight == (200, FIRST + REST), aegis.output()
    assert await aegis.wait(within=30) == 0, aegis.output()
    assert "Traceback" not in aegis.output()


class SilentUpstream:
    """Reads the request and never answers: only the end of the grace period ends the scrape."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.asked.set()
        await reader.read()  # until Aegis gives up on it


# Prometheus' header: a deadline (29.5 s) far past the grace period.
LONG_SCRAPE = {"X-Prometheus-Scrape-Timeout-Seconds": "30"}
GRACE = 4.0


async def get_with(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, await response.read()


@needs_aegis
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_scrape_still_waiting_when_the_grace_period_ends_is_answered_503(
    signum, children, upstreams, sockdir
):
    upstream = SilentUpstream()
    await upstreams.raw(sockdir / "hang.sock", upstream)
    aegis, port = await children.serve(sockdir, "--shutdown.grace-period", f"{GRACE:.0f}s")
    in_flight = asyncio.create_task(get_with(f"http://127.0.0.1:{port}/hang", LONG_SCRAPE))
    await asyncio.wait_for(upstream.asked.wait(), 20)
    signalled = time.monotonic()
    aegis.popen.send_signal(signum)

    answer = await in_flight
    answered = time.monotonic() - signalled
    assert answer == (503, b"aegis is stopping: the grace period ended\n"), aegis.output()
    assert await aegis.wait(within=30) == 0, aegis.output()
    stopped = time.monotonic() - signalled
    # The whole grace period, and not much more (aiohttp alone took twice the grace period).
    assert answered > GRACE - 0.5, aegis.output()
    assert stopped < GRACE + 3, aegis.output()
    out = aegis.output()
    assert "1 scrapes waiting for their service, 1 of them cut at the end of the grace" in out
    assert "503 hang: aegis is stopping: the grace period ended" in out
    assert "killing them" not in out
    assert "Traceback" not in out


@needs_aegis
async def test_a_page_still_arriving_when_the_grace_period_ends_is_cut_off(
    children, upstreams, sockdir
):
    upstream = SlowUpstream()
    await upstreams.raw(sockdir / "slow.sock", upstream)
    aegis, port = await children.serve(sockdir, "--shutdown.grace-period", "2s")
    in_flight = asyncio.create_task(get_with(f"http://127.0.0.1:{port}/slow", LONG_SCRAPE))
    await asyncio.wait_for(upstream.asked.wait(), 20)
    aegis.popen.send_signal(signal.SIGTERM)
    # The status line is out: a page cut short breaks the connection, never a complete 200.
    with pytest.raises(aiohttp.ClientPayloadError):
        await in_flight
    assert await aegis.wait(within=30) == 0, aegis.output()
    out = aegis.output()
    assert "slow: aborted mid-response: the grace period ended" in out
    assert "1 of them cut at the end of the grace period" in out
    assert "Traceback" not in out


@needs_aegis
async def test_sighup_is_logged_and_ignored(children, upstreams, sockdir):
    await upstreams.metrics(sockdir / "svc.sock", "hup_value 1\n")
    aegis, port = await children.serve(sockdir)
    aegis.popen.send_signal(signal.SIGHUP)
    await aegis.wait_for_output("SIGHUP ignored")
    assert await fresh_get(f"http://127.0.0.1:{port}/svc") == (200, b"hup_value 1\n")
    aegis.popen.send_signal(signal.SIGTERM)
    assert await aegis.wait(within=30) == 0, aegis.output()


@needs_aegis
@pytest.mark.parametrize("attempt", range(3))
async def test_a_stop_right_after_start_is_a_clean_exit(attempt, children, sockdir):
    # Signals are held from the start line on: one that comes before the loop takes them must
    # not kill Aegis half-started.
    aegis = children.start("-hostport", f"127.0.0.1:{free_port()}", "-sockdir", str(sockdir))
    await aegis.wait_for_output(" -> ")
    aegis.popen.send_signal(signal.SIGTERM)
    assert await aegis.wait(within=30) == 0, aegis.output()


# --- request heads: the size bound (431) counted exactly, whatever the reads ---

LIMIT = 1024


def head_of(size: int) -> bytes:
    """A GET /-/healthy head of exactly ``size`` bytes, blank line included."""
    start, end = b"GET /-/healthy HTTP/1.1\r\nHost: aegis\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


async def send_in_pieces(port: int, data: bytes, piece: int) -> bytes:
    """Write ``data`` in pieces of ``piece`` bytes (each its own segment), then read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for offset in range(0, len(data), piece):
            writer.write(data[offset : offset + piece])
            await writer.drain()
            await asyncio.sleep(0.001)
        async with asyncio.timeout(20):
            return await reader.read(-1)
    finally:
        writer.close()


@needs_aegis
@pytest.mark.parametrize("piece", [1 << 20, 100, 7])
async def test_a_head_at_the_bound_passes_and_one_byte_more_is_431(piece, children, sockdir):
    _, port = await children.serve(
        sockdir, f"--web.max-header-bytes={LIMIT}", "--web.idle-timeout=1s"
    )
    fits = await send_in_pieces(port, head_of(LIMIT), piece)
    assert fits.startswith(b"HTTP/1.1 200 OK\r\n"), fits
    over = await send_in_pieces(port, head_of(LIMIT + 1), piece)
    assert over.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), over
    assert over.endswith(b"\r\n\r\nrequest head larger than 1024 bytes\n")


@needs_aegis
async def test_pipelined_heads_are_bounded_one_by_one_not_together(children, sockdir):
    _, port = await children.serve(
        sockdir, f"--web.max-header-bytes={LIMIT}", "--web.idle-timeout=1s"
    )
    # 60 heads of 600 bytes in one write: 36 KB together, each under the bound.
    answers = await send_in_pieces(port, head_of(600) * 60, 1 << 20)
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 60
    assert b" 431 " not in answers
    # An oversized head behind an answered one closes the connection: a 431 written then could
    # land inside an answer still being written.
    closed = await send_in_pieces(port, head_of(600) + head_of(LIMIT + 1), 1 << 20)
    assert closed.count(b"HTTP/1.1 200 OK\r\n") == 1
    assert b" 431 " not in closed


# --- pipelining: one answer queued at a time, head deadlines from the end of the answer ---

#: A page the size of a real exporter's (the benchmark's is 33 KB), sent whole in one write.
BIG_PAGE = b"".join(b'pipelined_value{n="%05d"} 1\n' % i for i in range(1000))


class CountingUpstream:
    """Answers every request with :data:`BIG_PAGE` at once and counts the requests: how far
    Aegis has run ahead of a client that reads nothing."""

    def __init__(self) -> None:
        self.asked = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(
            BIG_PAGE
        )
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.asked += 1
                writer.write(head + BIG_PAGE)
                await writer.drain()


async def not_reading(port: int) -> socket.socket:
    """A client connection with a small receive buffer (set before connecting, so the window
    stays small) that the test does not read from until it says so."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def read_all(sock: socket.socket, within: float = 60.0) -> bytes:
    loop = asyncio.get_running_loop()
    parts = []
    async with asyncio.timeout(within):
        while data := await loop.sock_recv(sock, 1 << 16):
            parts.append(data)
    return b"".join(parts)


def pipelined(path: str) -> bytes:
    return b"GET /%s HTTP/1.1\r\nHost: aegis\r\n\r\n" % path.encode()


def pipelined_close(path: str) -> bytes:
    return b"GET /%s HTTP/1.1\r\nHost: aegis\r\nConnection: close\r\n\r\n" % path.encode()


@needs_aegis
async def test_pipelined_scrapes_wait_for_the_client_to_read_the_answer_before(
    children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    upstream = CountingUpstream()
    await upstreams.raw(sockdir / "big.sock", upstream)
    _, port = await children.serve(sockdir, "--web.idle-timeout=5s")
    requests = 300  # 9 MB of answers, were they all queued
    sock = await not_reading(port)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, pipelined("big") * (requests - 1) + pipelined_close("big"))
        await asyncio.sleep(1.5)  # ample time to answer every one, were nothing holding it back
        # About a megabyte is in the kernel's buffers and the transport's (high-water mark plus
        # the answer being written): some twenty pages, not three hundred.
        assert upstream.asked < 60, upstream.asked
        answers = await read_all(sock)
    finally:
        sock.close()
    # Held back, not dropped: every request is answered, in full, once the client reads.
    assert upstream.asked == requests
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == requests
    assert answers.count(BIG_PAGE) == requests


@needs_aegis
@pytest.mark.parametrize("path", ["-/metrics", "-/sd", ""])
async def test_pipelined_own_pages_wait_for_the_client_to_read_too(
    path: str, children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    upstream = CountingUpstream()
    await upstreams.raw(sockdir / "big.sock", upstream)
    # Many (dead) sockets make /-/sd and / pages of several KB, as on a real host.
    for index in range(60):
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(sockdir / f"exporter-with-a-long-name-{index:03d}.sock"))
    _, port = await children.serve(sockdir, "--web.idle-timeout=5s")
    sock = await not_reading(port)
    loop = asyncio.get_running_loop()
    requests = 400
    try:
        # The scrape at the end is reached only once every page before it is out.
        await loop.sock_sendall(sock, pipelined(path) * requests + pipelined_close("big"))
        await asyncio.sleep(1.5)
        assert upstream.asked == 0
        answers = await read_all(sock)
    finally:
        sock.close()
    assert upstream.asked == 1
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == requests + 1


class TrickleUpstream:
    """Answers ``/trickle``'s scrape with a body of :data:`TRICKLE` sent a byte at a time."""

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(TRICKLE))
            for byte in TRICKLE:  # 2.4 s in all: more than twice the head deadline
                await writer.drain()
                await asyncio.sleep(0.4)
                writer.write(bytes([byte]))
            await writer.drain()
            await reader.read()


TRICKLE = b"slow!\n"


@needs_aegis
@pytest.mark.parametrize(
    "rest", [b"", b"Host: aegis\r\nConnection: close\r\n\r\n"], ids=["never-finished", "finished"]
)
@pytest.mark.parametrize("together", [True, False], ids=["one-write", "while-answering"])
async def test_a_pipelined_head_has_its_deadline_from_the_end_of_the_answer_before(
    together: bool, rest: bytes, children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    """As Go's server reads the next request only once it has answered the one before: the
    unfinished head behind a slow answer neither cuts that answer nor is cut before it ends."""
    await upstreams.raw(sockdir / "trickle.sock", TrickleUpstream())
    await upstreams.metrics(sockdir / "ok.sock", "ok_value 1\n")
    _, port = await children.serve(
        sockdir, "--web.read-header-timeout=1s", "--web.idle-timeout=30s"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # The next head begins in the same write, or while the answer is on its way.
        writer.write(pipelined("trickle"))
        if not together:
            await asyncio.sleep(0.3)
        writer.write(b"GET /ok HTTP/1.1\r\n")
        async with asyncio.timeout(20):
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(len(TRICKLE)) == TRICKLE  # whole, not cut at 1 s
            answered = time.monotonic()
            writer.write(rest)
            rest_of_it = await reader.read(-1)
            closed = time.monotonic() - answered
    finally:
        writer.close()
    if rest:
        assert rest_of_it.startswith(b"HTTP/1.1 200 OK\r\n"), rest_of_it
        assert rest_of_it.endswith(b"ok_value 1\n")
    else:
        # Closed without an answer at the head deadline, counted from the end of the answer
        # (loose bounds: the machine is small and shared).
        assert rest_of_it == b""
        assert 0.5 < closed < 5.0, closed


@needs_aegis
@pytest.mark.parametrize(
    "body", [b"ab\r\n\r\ncd", b"\r\n\r\n\r\n\r\n"], ids=["blank-line-inside", "blank-lines-only"]
)
async def test_a_request_with_a_body_closes_its_connection_after_the_answer(
    body: bytes, children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    """Scrapes have no body. One whose body holds a blank line would look like one head more
    to the head deadline's accounting; the connection ends with its answer instead, so a head
    dribbled after it can never outlast the deadline."""
    await upstreams.metrics(sockdir / "ok.sock", "ok_value 1\n")
    _, port = await children.serve(
        sockdir, "--web.read-header-timeout=1s", "--web.idle-timeout=60s"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"GET /ok HTTP/1.1\r\nHost: aegis\r\nContent-Length: %d\r\n\r\n" % len(body)
        writer.write(head + body + b"GET /ok HTTP/1.1\r\nX-Pad: ")
        async with asyncio.timeout(20):
            answer = await reader.read(-1)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert answer.endswith(b"ok_value 1\n")
    assert answer.count(b"HTTP/1.1 ") == 1


# --- the write deadline: time without progress, not time with a full buffer ---

#: A megabyte: half of it waits in Aegis (the kernel takes 512 KiB before it stops the writes)
#: while a slow client reads, so the transport stays paused for seconds at a time.
SLOW_READ_PAGE = "".join(f'slowly_read_value{{n="{i:07d}"}} 1\n' for i in range(32000))


def write_deadline_client(
    where: int | Path, ctx: ssl.SSLContext | None, read: bool
) -> tuple[float, bytes]:
    """Scrape ``/big`` on a connection with a small receive buffer: reading 4 KB every 20 ms
    (steady, far slower than Aegis writes) if ``read``, else nothing. How long until the
    connection ended, and what was read."""
    if isinstance(where, Path):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(where))
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        sock.connect(("127.0.0.1", where))
    sock.settimeout(60)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    started = time.monotonic()
    parts = []
    with sock:
        if not read:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: aegis\r\n\r\n")
            # Wait for the end without reading a byte: a reset (TCP) or a close (Unix).
            poll = select.poll()
            poll.register(sock.fileno(), select.POLLRDHUP)
            poll.poll(30_000)
            return time.monotonic() - started, b""
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: aegis\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := sock.recv(4096):
                parts.append(data)
                time.sleep(0.02)
    return time.monotonic() - started, b"".join(parts)


@needs_aegis
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_the_write_deadline_spares_a_slow_reader_and_cuts_one_that_reads_nothing(
    unix: bool, tls: bool, tmp_path: Path, children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    """The write timeout is time without progress: a client that reads, however slowly, gets
    its whole answer, long after the deadline; one that reads nothing is cut at it."""
    await upstreams.metrics(sockdir / "big.sock", SLOW_READ_PAGE)
    listener = tmp_path / "aegis.sock"
    flags = ["--web.write-timeout=500ms", "--scrape.timeout=60s"]
    ctx = None
    if tls:
        ca = trustme.CA()
        pem = ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem
        pem.write_to_path(str(tmp_path / "s.pem"))
        (tmp_path / "web.yml").write_text(
            "tls_server_config:\n  cert_file: s.pem\n  key_file: s.pem\n"
        )
        flags += ["--web.config.file", str(tmp_path / "web.yml")]
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
    if unix:
        flags += ["--web.listen-address", f"unix:{listener}"]
    child, port = await children.serve(sockdir, *flags)
    if unix:
        await child.ready(None, listener)
    where: int | Path = listener if unix else port
    # Over TLS too: uvloop's TLS layer took the whole answer (1 MB) without ever pausing the
    # connection's protocol, so the deadline never started for a client that read nothing.
    clients = [
        asyncio.to_thread(write_deadline_client, where, ctx, True),
        asyncio.to_thread(write_deadline_client, where, ctx, False),
    ]
    (reading, answer), *others = await asyncio.gather(*clients)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert body == SLOW_READ_PAGE.encode()
    # The slow reader took several times the deadline (loose bounds: the machine is small and
    # shared); the other was cut near the deadline, long before that.
    assert reading > 2.5, reading
    for idle, _ in others:
        assert idle < 10, idle
        assert idle < reading, (idle, reading)
