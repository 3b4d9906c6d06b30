"""The upstream client: keep-alive per socket, every HTTP/1.1 body framing, flat memory."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from pathlib import Path

import aiohttp
import pytest
from aegisrun import Children, free_port, needs_aegis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_sockdir import until

from aegis.proxy import POOL_KEY
from aegis.upstream import MAX_IDLE_TOTAL, Exchange, UpstreamError, UpstreamPool
from conftest import AegisFactory, Upstreams, raw_http


class KeepAliveService:
    """A raw HTTP/1.1 service that answers many requests per connection and counts connections."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.connections = 0
        self.requests = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.body), self.body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_connections_are_reused_per_socket_and_never_across(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    a, b = KeepAliveService(b"a 1\n"), KeepAliveService(b"b 1\n")
    await upstreams.raw(sockdir / "a.sock", a)
    await upstreams.raw(sockdir / "b.sock", b)
    client = await aegis()
    for _ in range(5):
        assert await (await client.get("/a")).text() == "a 1\n"
        assert await (await client.get("/b")).text() == "b 1\n"
    assert (a.requests, a.connections) == (5, 1)
    assert (b.requests, b.connections) == (5, 1)


async def test_service_restart_with_a_new_socket_file_is_served(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    old = KeepAliveService(b"generation 1\n")
    server = await upstreams.raw(sockdir / "svc.sock", old)
    client = await aegis()
    assert await (await client.get("/svc")).text() == "generation 1\n"
    # The service goes away without closing its idle connection first (it is still open in our
    # pool), and a new one replaces the socket file.
    server.close()
    # Python 3.13's asyncio removes the file of a Unix server it closes; 3.11's leaves it.
    (sockdir / "svc.sock").unlink(missing_ok=True)
    new = KeepAliveService(b"generation 2\n")
    await upstreams.raw(sockdir / "svc.sock", new)
    response = await client.get("/svc")
    assert (response.status, await response.text()) == (200, "generation 2\n")
    assert new.connections == 1


async def test_idle_connection_closed_by_the_service_is_replaced_transparently(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    connections = 0

    async def one_request_then_close_later(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        # Advertises keep-alive, then closes while idle: a keep-alive timer running out.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    await upstreams.raw(sockdir / "svc.sock", one_request_then_close_later)
    client = await aegis()
    for _ in range(3):
        response = await client.get("/svc")
        assert (response.status, await response.text()) == (200, "ok\n")
        await asyncio.sleep(0.1)
    assert connections == 3


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"hello world",
            id="chunked",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close\n",
            b"until the close\n",
            id="delimited-by-close",
        ),
        pytest.param(
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfinal\n",
            b"final\n",
            id="interim-answer-first",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", id="no-content"),
    ],
)
async def test_body_framings(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, answer: bytes, body: bytes
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    await upstreams.raw(sockdir / "svc.sock", serve)
    client = await aegis()
    response = await client.get("/svc")
    assert response.status == int(answer.rsplit(b"HTTP/1.", 1)[1][2:5])
    assert await response.read() == body


async def test_slowly_streamed_chunked_page_arrives_whole(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    parts = [b"line %d\n" % i * 1000 for i in range(20)]

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in parts:
            await response.write(part)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    await upstreams.http(sockdir / "svc.sock", trickle)
    client = await aegis()
    response = await client.get("/svc")
    assert response.status == 200
    assert await response.read() == b"".join(parts)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@needs_aegis
async def test_memory_stays_flat_while_a_100_mb_page_passes(
    upstreams: Upstreams, sockdir: Path, children: Children
) -> None:
    chunk = b"x" * 65535 + b"\n"
    count = 1600  # 100 MiB

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.content_length = len(chunk) * count
        await response.prepare(request)
        for _ in range(count):
            await response.write(chunk)
        await response.write_eof()
        return response

    await upstreams.http(sockdir / "big.sock", huge)
    received = 0
    port = free_port()
    aegis = children.start("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir))
    await aegis.ready("127.0.0.1", port)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        baseline = _status_kib(aegis.pid, "VmRSS")
        async with session.get(f"http://127.0.0.1:{port}/big") as response:
            assert response.status == 200
            async for piece in response.content.iter_chunked(1 << 20):
                received += len(piece)
                # A scraper slower than the service: without back-pressure the difference
                # would pile up inside Aegis.
                await asyncio.sleep(0.01)
        peak = _status_kib(aegis.pid, "VmHWM")
    assert received == len(chunk) * count
    # 100 MiB went through; the process grew by a small buffer's worth, not by the page.
    assert peak - baseline < 24 * 1024, f"peak RSS grew by {peak - baseline} KiB"


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _close_after_partial_head(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
    await writer.drain()
    writer.close()


async def _reset_after_the_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.abort()


async def _reset_without_reading(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.transport.abort()


@pytest.mark.parametrize(
    "upstream",
    [_close_at_once, _close_after_partial_head, _reset_after_the_request, _reset_without_reading],
)
async def test_an_upstream_that_hangs_up_gives_a_counted_502_every_time(
    aegis: AegisFactory,
    upstreams: Upstreams,
    sockdir: Path,
    upstream: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What socat in front of a stopped exporter does: accept, then close."""
    await upstreams.raw(sockdir / "svc.sock", upstream)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    for _ in range(5):
        response = await client.get("/svc")
        assert response.status == 502, await response.text()
    assert registry.get_sample_value("aegis_requests_total", {"target": "svc", "code": "502"}) == 5
    errors = sum(
        registry.get_sample_value("aegis_upstream_errors_total", {"target": "svc", "kind": kind})
        or 0
        for kind in ("reset", "stale", "protocol")
    )
    assert errors == 5
    assert registry.get_sample_value("aegis_requests_in_flight") == 0
    assert "Traceback" not in caplog.text


async def test_a_dead_idle_connection_is_retried_once_on_a_fresh_one(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """The idle connection answers nothing when reused, and every new one closes at once: one
    retry, then a 502, never a loop."""
    connections = 0

    async def serve_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            writer.close()
            return
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the reuse: closed without an answer
        writer.close()

    await upstreams.raw(sockdir / "svc.sock", serve_once)
    client = await aegis()
    assert (await client.get("/svc")).status == 200
    response = await client.get("/svc")
    assert response.status == 502
    assert "closed before an answer" in await response.text()
    assert connections == 2  # the idle one, and a single fresh one


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
async def test_a_streamed_page_reaches_an_http_1_0_client_delimited_by_the_close(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, connection: bytes
) -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"up", b" 1\n"):
            await asyncio.sleep(0.05)  # not whole with the head: the streaming path
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    await upstreams.raw(sockdir / "svc.sock", trickle)
    client = await aegis()
    assert client.port is not None
    answer = await raw_http(client.port, b"GET /svc HTTP/1.0\r\n" + connection + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"up 1\n"  # and then the connection closed: raw_http read to the end


# --- an upstream that answers what nobody asked ---

HI = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"


class Unsolicited:
    """Answers each request with ``hi``, and sends an answer nobody asked for: a moment after
    the first answer (``late=False``: the connection is idle then), or with the second request
    already sent (``late=True``: exactly like an answer to it)."""

    def __init__(self, *, late: bool) -> None:
        self.late = late
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(HI)
            await writer.drain()
            if first and not self.late:
                await asyncio.sleep(0.2)
                writer.write(EVIL)
                await writer.drain()
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if first and self.late:
                    writer.write(EVIL)
                    await writer.drain()
                    await asyncio.sleep(0.05)  # its own answer in a read of its own
                writer.write(HI)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_an_answer_sent_to_an_idle_connection_is_never_served(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    service = Unsolicited(late=False)
    await upstreams.raw(sockdir / "svc.sock", service)
    client = await aegis()
    first = await client.get("/svc")
    assert await first.read() == b"hi"
    await asyncio.sleep(0.6)  # the extra answer comes while the connection sits in the pool
    for _ in range(2):
        again = await client.get("/svc")
        assert await again.read() == b"hi"
    assert service.connections == 2  # the idle connection was closed, not reused


async def test_an_answer_sent_after_the_connection_was_reused_answers_that_scrape_once(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """The limit the README states: HTTP/1.1 cannot tell a late unsolicited answer from the
    answer to the request just sent on that connection (nor can any client, Go's included).
    It is served once; the real answer then comes on top of it, and the connection is closed."""
    service = Unsolicited(late=True)
    await upstreams.raw(sockdir / "svc.sock", service)
    client = await aegis()
    answers = []
    for _ in range(3):
        response = await client.get("/svc")
        answers.append(await response.read())
        await asyncio.sleep(0.2)
    assert answers == [b"hi", b"EVIL!", b"hi"]
    assert service.connections == 2


# --- a body in reads of its own: Content-Length bodies pass the parser by, chunked ones do not ---

PAGE = b"up 1\nup 2\nok"
LENGTH_FRAMED = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE)
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nup 1\n\r\n7\r\nup 2\nok\r\n0\r\n\r\n"
)
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Scripted:
    """A keep-alive service that answers each request with the next script: its pieces written
    one at a time, a pause after each, so that each comes to the client in a read of its own."""

    def __init__(self) -> None:
        self.scripts: deque[list[bytes]] = deque()
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                for piece in self.scripts.popleft():
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.005)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _identity(sock: Path) -> tuple[int, int]:
    stat = sock.stat()
    return stat.st_dev, stat.st_ino


async def _fetch(pool: UpstreamPool, sock: Path) -> tuple[Exchange, bytes]:
    """One exchange through the pool: the connection, and the body read to its end."""
    conn = await pool.send(str(sock), _identity(sock), REQUEST, head_only=False)
    parts = []
    while piece := await conn.read():
        parts.append(piece)
    return conn, b"".join(parts)


def _cut(answer: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(set(cuts)), len(answer)]
    return [answer[a:b] for a, b in itertools.pairwise(edges) if a < b]


@pytest.mark.parametrize("answer", [LENGTH_FRAMED, CHUNKED], ids=["length", "chunked"])
async def test_a_body_split_at_any_boundary_arrives_whole_on_one_kept_connection(
    upstreams: Upstreams, sockdir: Path, answer: bytes
) -> None:
    service = Scripted()
    await upstreams.raw(sockdir / "svc.sock", service)
    scripts = [_cut(answer, [cut]) for cut in range(1, len(answer))]
    scripts.append(_cut(answer, list(range(1, len(answer)))))  # a byte a read
    # The head in a read of its own, then the body a byte a read.
    head_end = answer.index(b"\r\n\r\n") + 4
    scripts.append(_cut(answer, list(range(head_end, len(answer)))))
    service.scripts.extend(scripts)
    pool = UpstreamPool()
    try:
        for pieces in scripts:
            conn, body = await _fetch(pool, sockdir / "svc.sock")
            assert (conn.status, body) == (200, PAGE), pieces
            assert conn.finished, pieces
            assert conn.reusable, pieces
            pool.release(conn)
    finally:
        pool.close()
    # Every answer, however it came, left the connection fit for the next one: after a body
    # read around the parser, the next head was read by a fresh one.
    assert service.connections == 1


_EXAMPLES = itertools.count()


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cuts=st.lists(st.integers(1, len(LENGTH_FRAMED) - 1), max_size=6),
    trailing=st.binary(max_size=12),
)
async def test_bytes_after_a_length_framed_body_in_its_last_read_are_no_answer(
    upstreams: Upstreams, sockdir: Path, cuts: list[int], trailing: bytes
) -> None:
    sock = sockdir / f"svc{next(_EXAMPLES)}.sock"  # a service of its own for each example
    service = Scripted()
    await upstreams.raw(sock, service)
    # The last piece carries the end of the body and what follows it, in one read.
    pieces = _cut(LENGTH_FRAMED, cuts)
    pieces[-1] += trailing
    service.scripts.append(pieces)
    service.scripts.append([LENGTH_FRAMED])
    pool = UpstreamPool()
    try:
        conn, body = await _fetch(pool, sock)
        assert (conn.status, body) == (200, PAGE)
        assert conn.finished
        if trailing.strip(b"\r\n"):  # llhttp skips empty lines between answers; nothing else
            assert not conn.reusable
        elif not trailing:
            assert conn.reusable
        pool.release(conn)
        # Whatever followed the body, the next scrape gets its own answer.
        conn, body = await _fetch(pool, sock)
        assert (conn.status, body) == (200, PAGE)
    finally:
        pool.close()


@pytest.mark.parametrize("cut", range(LENGTH_FRAMED.index(b"\r\n\r\n") + 4, len(LENGTH_FRAMED)))
async def test_a_length_framed_body_cut_short_by_the_close_is_truncated(
    upstreams: Upstreams, sockdir: Path, cut: int
) -> None:
    """Short by one byte, whichever read the head and the body's first bytes came in."""

    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for piece in _cut(LENGTH_FRAMED[:-1], [cut]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.close()

    await upstreams.raw(sockdir / "svc.sock", short)
    pool = UpstreamPool()
    try:
        with pytest.raises(UpstreamError) as failed:
            await _fetch(pool, sockdir / "svc.sock")
    finally:
        pool.close()
    assert failed.value.kind == "truncated"


class CountingService:
    """Answers every request at once when ``gate`` is open; counts its open connections."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.open = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await self.gate.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nup 1")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


async def test_idle_connections_are_few_and_close_on_their_own(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """16 concurrent scrapes of each of 10 targets, then silence: a few idle connections per
    target stay, and those close at their idle timeout with nothing asking for the target (they
    used to stay until the next scrape of the same target, 64 per target)."""
    gate = asyncio.Event()
    services = [CountingService(gate) for _ in range(10)]
    for index, service in enumerate(services):
        await upstreams.raw(sockdir / f"t{index}.sock", service)
    client = await aegis(upstream_idle_timeout=1.0)

    async def scrape(session: aiohttp.ClientSession, name: str) -> int:
        async with session.get(client.make_url(f"/{name}")) as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        scrapes = [
            asyncio.create_task(scrape(session, f"t{index}"))
            for index in range(len(services))
            for _ in range(16)
        ]
        await until(lambda: sum(service.open for service in services) == 160, "all connected")
        gate.set()
        assert await asyncio.gather(*scrapes) == [200] * 160
    await asyncio.sleep(0.2)  # the connections beyond the bound are closed by now
    assert [service.open for service in services] == [4] * 10
    # The timeout is 1 s: well within.
    await until(lambda: not any(service.open for service in services), "every one closed")
    app = client.server.app
    assert app is not None
    assert app[POOL_KEY].idle_count() == 0


async def test_idle_connections_for_all_sockets_together_are_bounded(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """A client that asks each of many targets once leaves at most MAX_IDLE_TOTAL idle."""
    gate = asyncio.Event()
    gate.set()
    services = [CountingService(gate) for _ in range(MAX_IDLE_TOTAL + 20)]
    for index, service in enumerate(services):
        await upstreams.raw(sockdir / f"t{index}.sock", service)
    client = await aegis()
    for index in range(len(services)):
        assert (await client.get(f"/t{index}")).status == 200
    await asyncio.sleep(0.2)
    assert sum(service.open for service in services) == MAX_IDLE_TOTAL
    # The ones idle longest were closed: the first targets asked.
    assert [service.open for service in services[:20]] == [0] * 20
