"""Limits under load: concurrent scrapes (503 past them), request-head and idle deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from pathlib import Path

import aiohttp
import pytest
from aegisrun import Aegis, Children, needs_aegis
from aiohttp import web
from ownmetrics import own_metrics, total

from aegis.limits import Limits
from aegis.proxy import FAILURE_STATUS
from conftest import AegisFactory, Upstreams

PAGE = "up 1\n"
GET = b"GET /node HTTP/1.1\r\nHost: aegis\r\n\r\n"


class Gate:
    """An upstream that holds every scrape until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0
        self._arrived = asyncio.Condition()

    async def handler(self, _: web.Request) -> web.Response:
        async with self._arrived:
            self.waiting += 1
            self._arrived.notify_all()
        await self.open.wait()
        return web.Response(text=PAGE)

    async def until_waiting(self, count: int) -> None:
        async with asyncio.timeout(10), self._arrived:
            await self._arrived.wait_for(lambda: self.waiting >= count)


async def test_past_the_per_target_limit_scrapes_get_503_at_once(
    sockdir: Path, upstreams: Upstreams, aegis: AegisFactory
) -> None:
    assert FAILURE_STATUS["overloaded"] == 503
    gate = Gate()
    await upstreams.http(sockdir / "slow.sock", gate.handler)
    await upstreams.metrics(sockdir / "fast.sock", PAGE)
    client = await aegis(max_concurrent_per_target=2)
    held = [asyncio.create_task(client.get("/slow")) for _ in range(2)]
    await gate.until_waiting(2)
    refused = await client.get("/slow")
    assert refused.status == 503
    assert await refused.text() == "overloaded: 2 scrapes of this target in flight\n"
    other = await client.get("/fast")  # one slow service does not starve the others
    assert (other.status, await other.text()) == (200, PAGE)
    gate.open.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    again = await client.get("/slow")  # the slots were given back
    assert again.status == 200


async def test_past_the_overall_limit_every_target_gets_503(
    sockdir: Path, upstreams: Upstreams, aegis: AegisFactory
) -> None:
    gate = Gate()
    for name in ("a", "b", "c"):
        await upstreams.http(sockdir / f"{name}.sock", gate.handler)
    client = await aegis(max_concurrent=2)
    held = [asyncio.create_task(client.get(f"/{name}")) for name in ("a", "b")]
    await gate.until_waiting(2)
    refused = await client.get("/c")
    assert (refused.status, await refused.text()) == (503, "overloaded: 2 scrapes in flight\n")
    missing = await client.get("/nope")  # an unknown name is still a 404, not a 503
    assert missing.status == 404
    gate.open.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    assert (await client.get("/c")).status == 200


async def test_failed_and_cancelled_scrapes_give_their_slot_back(
    sockdir: Path, upstreams: Upstreams, aegis: AegisFactory
) -> None:
    gate = Gate()
    await upstreams.http(sockdir / "slow.sock", gate.handler)
    client = await aegis(max_concurrent_per_target=1)
    timeout = {"X-Prometheus-Scrape-Timeout-Seconds": "0.2"}
    assert (await client.get("/slow", headers=timeout)).status == 504
    assert (await client.get("/gone")).status == 404
    cancelled = asyncio.create_task(client.get("/slow"))
    await gate.until_waiting(2)
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    gate.open.set()
    for _ in range(200):  # the server sees the client go a moment later
        if (response := await client.get("/slow")).status != 503:
            break
        await asyncio.sleep(0.05)
    assert response.status == 200


def test_limits_count_per_target_and_forget_idle_names() -> None:
    limits = Limits(total=3, per_target=2)
    assert limits.enter("a") is None
    assert limits.enter("a") is None
    assert limits.enter("a") == "overloaded: 2 scrapes of this target in flight"
    assert limits.enter("b") is None
    assert limits.enter("c") == "overloaded: 3 scrapes in flight"
    limits.leave("a")
    limits.leave("a")
    limits.leave("b")
    assert limits.in_flight() == 0
    assert limits._by_target == {}
    with pytest.raises(ValueError, match="at least 1"):
        Limits(total=0, per_target=1)


# --- the installed command under a burst and under a slowloris ---


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int) -> int:
    """The descriptor count once it stops moving (connections just closed are being reaped)."""
    last = open_fds(pid)
    for _ in range(50):
        await asyncio.sleep(0.1)
        now = open_fds(pid)
        if now == last:
            return now
        last = now
    return last


async def start_aegis(children: Children, sockdir: Path, *flags: str) -> tuple[Aegis, int]:
    return await children.serve(sockdir, *flags)


async def exchange(port: int, request: bytes = GET) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await reader.readuntil(b"\n")
    finally:
        writer.close()


@needs_aegis
async def test_descriptors_return_to_baseline_after_a_burst_of_1000_clients(
    sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    gate = Gate()
    await upstreams.http(sockdir / "node.sock", gate.handler)
    child, port = await start_aegis(
        children,
        sockdir,
        "--limit.concurrent-requests-per-target=8",
        "--web.read-header-timeout=1s",
        "--web.idle-timeout=1s",
    )
    # Warm up to the most upstream connections the pool can hold at this limit: 8 at once.
    warm = [asyncio.create_task(exchange(port)) for _ in range(8)]
    await gate.until_waiting(8)
    gate.open.set()
    assert {line for line in await asyncio.gather(*warm)} == {b"HTTP/1.1 200 OK\r\n"}
    baseline = await settled_fds(child.pid)

    # 1000 clients at once: 700 scrape and then linger on keep-alive, 200 connect and say
    # nothing, 100 send half a request head. The test keeps every one of its ends open: only
    # Aegis' deadlines can give the descriptors back.
    held: list[asyncio.StreamWriter] = []
    statuses: list[bytes] = []

    async def client(kind: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append(writer)
        if kind < 700:
            writer.write(GET)
            statuses.append((await reader.readuntil(b"\n"))[9:12])
        elif kind < 900:
            pass
        else:
            writer.write(b"GET /node HTTP/1.1\r\nHost: ae")

    async with asyncio.timeout(30):
        await asyncio.gather(*(client(kind) for kind in range(1000)))
    assert len(held) == 1000
    assert set(statuses) <= {b"200", b"503"}
    assert b"200" in statuses
    try:
        for _ in range(100):  # 10 s at most
            if (now := open_fds(child.pid)) <= baseline:
                break
            await asyncio.sleep(0.1)
        assert now <= baseline, f"{now} descriptors open, {baseline} before the burst"
    finally:
        for writer in held:
            writer.close()
    assert child.popen.poll() is None


@needs_aegis
async def test_a_slowloris_is_cut_off_at_the_read_header_timeout(
    sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    child, port = await start_aegis(
        children, sockdir, "--web.read-header-timeout=1s", "--web.idle-timeout=30s"
    )
    head = GET

    async def dribble() -> float:
        """Seconds the connection stayed open while a header byte went out each second."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        try:
            for byte in head:  # far longer than the deadline, if nothing cut it short
                writer.write(bytes([byte]))
                try:
                    if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                        break
                except TimeoutError:
                    continue
                except ConnectionError:
                    break
                raise AssertionError("a half-sent request got an answer")
        finally:
            writer.close()
        return time.monotonic() - start

    loris = [asyncio.create_task(dribble()) for _ in range(50)]
    await asyncio.sleep(0.5)
    url = f"http://127.0.0.1:{port}/node"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        assert (r.status, await r.text()) == (200, PAGE)  # a real scrape is served meanwhile
    held_open = await asyncio.gather(*loris)
    # Closed at the 1 s deadline, not after the ~30 s the dribble would take: bounds are loose
    # because the machine is small and shared, but far below what a slowloris needs.
    assert max(held_open) < 5.0, held_open
    assert child.popen.poll() is None


@needs_aegis
async def test_keep_alive_requests_after_a_pause_are_served(
    sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    """The head deadline starts at a request's first byte, not at the previous response."""
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    _, port = await start_aegis(
        children, sockdir, "--web.read-header-timeout=500ms", "--web.idle-timeout=10s"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):
            writer.write(GET)
            assert await reader.readuntil(b"\n") == b"HTTP/1.1 200 OK\r\n"
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(len(PAGE)) == PAGE.encode()
            await asyncio.sleep(1.0)  # idle for twice the head deadline: still open
        # Two requests in one write (pipelined) are both answered.
        writer.write(GET + GET)
        body = b""
        async with asyncio.timeout(10):
            while body.count(b"HTTP/1.1 200 OK") < 2:
                body += await reader.read(65536)
    finally:
        writer.close()


async def _open_seconds(port: int, first: bytes, trickled: bytes) -> float:
    """Seconds a connection stays open that sends ``first`` at once, reads whatever answer it
    gets, then trickles ``trickled`` a byte every 0.2 s (far longer than the deadline)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    try:
        writer.write(first)
        if first.strip(b"\r\n"):  # a whole request: its answer first
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(len(PAGE))
        for byte in trickled:
            writer.write(bytes([byte]))
            try:
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                break
            raise AssertionError("a half-sent request got an answer")
    finally:
        writer.close()
    return time.monotonic() - start


@needs_aegis
@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"\r\n\r\n", id="a-blank-line-pair"),
        pytest.param(b"\r\n\r\n\r\n\r\n\n\n", id="empty-lines"),
        pytest.param(GET + b"\r\n\r\n", id="empty-lines-after-a-request"),
        pytest.param(b"\r\n\r\n" + GET, id="empty-lines-before-a-request"),
    ],
)
async def test_empty_lines_before_a_trickled_head_do_not_lift_its_deadline(
    first: bytes, sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    """The HTTP parser skips empty lines before a request line and answers nothing for them:
    taken for a head, they left the next head waiting for that answer, with no deadline, until
    the idle timeout (here 60 s). The deadline holds whatever bytes precede the head."""
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    child, port = await children.serve(
        sockdir, "--web.read-header-timeout=1s", "--web.idle-timeout=60s"
    )
    held = await asyncio.gather(*(_open_seconds(port, first, GET * 3) for _ in range(3)))
    # Cut at the 1 s deadline, not after the ~20 s the trickle takes (loose: a shared machine).
    assert max(held) < 6.0, held
    # A request after empty lines is still served, and counted once.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n\r\n\n" + GET)
        assert await reader.readuntil(b"\n") == b"HTTP/1.1 200 OK\r\n"
    finally:
        writer.close()
    assert child.popen.poll() is None


class HangingService:
    """Reads each request and never answers; counts the connections Aegis holds open to it."""

    def __init__(self) -> None:
        self.open = 0
        self.changed = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            self.open += 1
            self.changed.set()
            try:
                await reader.read()  # until Aegis lets go of the connection
            finally:
                self.open -= 1
                self.changed.set()

    async def until_open(self, count: int, within: float) -> None:
        async with asyncio.timeout(within):
            while self.open != count:
                self.changed.clear()
                await self.changed.wait()


@needs_aegis
async def test_a_scraper_that_hangs_up_gives_back_its_slot_and_connection_at_once(
    sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    """Whatever timeout it announced, a scraper that leaves cancels its upstream exchange."""
    hanging = HangingService()
    await upstreams.raw(sockdir / "hang.sock", hanging)
    _, port = await start_aegis(children, sockdir, "--limit.concurrent-requests-per-target=2")
    values = ("1e9", "inf", "-inf", "nan", "-1", "0", "soon", "120", "\xff")
    for value in values:
        request = (
            b"GET /hang HTTP/1.1\r\nHost: aegis\r\nX-Prometheus-Scrape-Timeout-Seconds: %s\r\n\r\n"
        )
        writers = []
        for _ in range(2):  # every slot of the target
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request % value.encode("latin-1"))
            writers.append(writer)
        await hanging.until_open(2, within=10)
        for writer in writers:
            writer.close()
        # Given back within a second or so (generous: the machine is shared), not at the
        # 10 s default deadline, let alone the 120 s ceiling.
        await hanging.until_open(0, within=5)
    samples = await own_metrics(port)
    assert total(samples, "aegis_requests_in_flight") == 0
    assert total(samples, "aegis_requests_total", code="499", target="hang") == 2 * len(values)
