"""The real ``aegis`` under process- and connection-level abuse.

Each test ends with the invariants: no 500 was answered, no traceback in the log, and (where
the test did not stop it) Aegis still serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from aegisrun import Aegis, Children, free_port, fresh_get, needs_aegis

from conftest import Upstreams

# End to end with real processes: deselect with -m 'not slow' for a quick run.
pytestmark = [needs_aegis, pytest.mark.slow]

PAGE = "chaos_value 1\n"
# Prometheus' header: an upstream deadline far past the grace period.
LONG_SCRAPE = {"X-Prometheus-Scrape-Timeout-Seconds": "30"}
_TCP_INFO_STATE = struct.Struct("B")
_TCP_CLOSE = 7


async def start(children: Children, sockdir: Path, *flags: str) -> tuple[Aegis, int]:
    return await children.serve(sockdir, *flags)


async def assert_invariants(aegis: Aegis, port: int | None) -> None:
    """Still answering (if ``port``), never a 500, never a traceback."""
    if port is not None:
        assert await fresh_get(f"http://127.0.0.1:{port}/svc") == (200, PAGE.encode())
        status, page = await fresh_get(f"http://127.0.0.1:{port}/-/metrics")
        assert status == 200
        assert 'code="500"' not in page.decode()
    out = aegis.output()
    assert "Traceback" not in out, out
    assert "Error handling request" not in out, out


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def test_a_second_instance_on_the_same_address_exits_1(
    children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "svc.sock", PAGE)
    first, port = await start(children, sockdir)
    second = children.start("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir))
    assert await second.wait(within=30) == 1, second.output()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in second.output()
    # Nor can any other program join the port, SO_REUSEPORT or not.
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError, match="Address already in use") as refused:
            stranger.bind(("127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE
    # Every answer comes from the first instance (there is no other).
    answers = await asyncio.gather(*(fresh_get(f"http://127.0.0.1:{port}/svc") for _ in range(20)))
    assert answers == [(200, PAGE.encode())] * 20
    await assert_invariants(first, port)


async def test_unfinished_heads_get_431_and_the_memory_comes_back(
    children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "svc.sock", PAGE)
    aegis, port = await start(children, sockdir, "--web.read-header-timeout=60s")
    processes = [aegis.pid]
    await assert_invariants(aegis, port)
    baseline = rss_kib(processes)
    line = b"X-Filler: " + b"f" * 8000 + b"\r\n"
    clients = 400

    async def unfinished() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /svc HTTP/1.1\r\nHost: aegis\r\n" + line * 7)  # 56 KB, no end
        await writer.drain()
        return reader, writer

    async with asyncio.timeout(60):
        opened = await asyncio.gather(*(unfinished() for _ in range(clients)))
    try:
        await asyncio.sleep(1.0)
        holding = rss_kib(processes)
        # Each connection costs about the bytes it sent, not megabytes.
        assert holding - baseline < clients * 256, (baseline, holding)
        for _, writer in opened:
            writer.write(line * 2)  # past 64 KiB
        async with asyncio.timeout(60):
            answers = await asyncio.gather(*(reader.read(-1) for reader, _ in opened))
    finally:
        for _, writer in opened:
            writer.close()
    assert all(a.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n") for a in answers)
    assert answers[0].endswith(b"\r\n\r\nrequest head larger than 65536 bytes\n")
    deadline = time.monotonic() + 20
    while (after := rss_kib(processes)) - baseline > 16 * 1024:
        assert time.monotonic() < deadline, f"RSS {after} KiB, {baseline} KiB before"
        await asyncio.sleep(0.2)
    await assert_invariants(aegis, port)


def server_side_peers(port: int) -> set[int]:
    """The remote ports of the kernel's sockets whose local port is ``port`` (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote = line.split()[1:3]
        if int(local.rpartition(":")[2], 16) == port:
            found.add(int(remote.rpartition(":")[2], 16))
    return found


def tcp_state(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_STATE.size)
    return int(_TCP_INFO_STATE.unpack(info)[0])


async def test_clients_that_never_read_are_cut_at_the_write_deadline(
    children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "svc.sock", PAGE)
    await upstreams.metrics(sockdir / "big.sock", "chaos_big_value 1\n" * 200)
    aegis, port = await start(children, sockdir, "--web.write-timeout=2s")
    await asyncio.gather(*(assert_invariants(aegis, port) for _ in range(4)))
    fds_before = len(os.listdir(f"/proc/{aegis.pid}/fd"))
    # Aegis's own pages and relayed scrapes (written whole, in one write) alike.
    requests = [
        b"GET /%s HTTP/1.1\r\nHost: aegis\r\n\r\n" % path for path in (b"-/metrics", b"big")
    ]
    readers: list[socket.socket] = []
    try:
        for index in range(20):
            sock = socket.create_connection(("127.0.0.1", port))
            # A small receive buffer, never read: the answers pile up on Aegis's side.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(requests[index % 2] * 2000)
            readers.append(sock)
        started = time.monotonic()
        while not all(tcp_state(sock) == _TCP_CLOSE for sock in readers):
            assert time.monotonic() - started < 30, [tcp_state(s) for s in readers]
            await asyncio.sleep(0.2)
        # The kernel holds no socket of these connections on Aegis's side, in any state (a
        # plain close would leave each in FIN-WAIT-1 with its unsent answers for minutes).
        peers = {sock.getsockname()[1] for sock in readers}
        assert not peers & server_side_peers(port)
        # Aegis gave back its descriptors, all but the idle upstream connections the relayed
        # scrapes left in the pool (one per client scraping at the same time, at most).
        deadline = time.monotonic() + 10
        kept = fds_before + 2 + len(readers) // 2
        while len(os.listdir(f"/proc/{aegis.pid}/fd")) > kept:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        for sock in readers:
            sock.close()
    await assert_invariants(aegis, port)


def limits_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


async def test_the_open_files_limit_is_raised_to_the_hard_limit_and_reported(
    children: Children, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "svc.sock", PAGE)
    _, hard = limits_of(os.getpid())
    soft = min(512, hard)
    port = free_port()
    aegis = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir)),
        prefix=["sh", "-c", f'ulimit -Sn {soft} && exec "$0" "$@"'],
    )
    await aegis.ready("127.0.0.1", port)
    assert limits_of(aegis.pid) == (hard, hard)
    status, page = await fresh_get(f"http://127.0.0.1:{port}/-/metrics")
    assert status == 200
    reported = re.search(rb"^process_max_fds ([0-9.e+]+)$", page, re.MULTILINE)
    assert reported is not None, page
    assert float(reported.group(1)) == hard
    await assert_invariants(aegis, port)


@needs_aegis
async def test_a_stop_right_after_the_start_line_is_a_clean_stop(
    sockdir: Path, tmp_path: Path, children: Children, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the start line on, a stop signal waits for the server to take it: one that came
    while the listener was being made left its file behind (and 143)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    listener = tmp_path / "aegis.sock"
    for attempt in range(8):
        aegis = children.start(
            *("--web.listen-address", f"unix:{listener}", "-sockdir", str(sockdir)),
        )
        deadline = time.monotonic() + 30
        while " -> " not in aegis.output():
            assert aegis.popen.poll() is None, aegis.output()
            assert time.monotonic() < deadline, aegis.output()
            await asyncio.sleep(0.001)
        await asyncio.sleep(attempt * 0.002)  # at a different moment of the start each time
        aegis.popen.send_signal(signal.SIGTERM)
        assert await aegis.wait(within=30) == 0, aegis.output()
        assert not listener.exists(), aegis.output()
        assert list(scratch.iterdir()) == [], aegis.output()
