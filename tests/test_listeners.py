"""Listeners of the installed aegis: TCP v4 and v6, Unix sockets, systemd socket activation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import stat
import time
from pathlib import Path

import aiohttp
import pytest
import trustme
from aegisrun import Aegis, Children, free_port, has_ipv6_loopback, needs_aegis

from conftest import Upstreams

pytestmark = needs_aegis

PAGE = "up 1\n"


async def scrape(url: str, unix: Path | None = None) -> tuple[int, str]:
    connector = aiohttp.UnixConnector(path=str(unix)) if unix else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp,
    ):
        return resp.status, await resp.text()


async def test_tcp_v4_v6_and_unix_listeners_serve_and_the_socket_file_goes_at_exit(
    tmp_path: Path, sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    v4 = free_port()
    unix = tmp_path / "aegis.sock"
    args = ["-hostport", f"127.0.0.1:{v4}", "--web.listen-address", f"unix:{unix}"]
    v6 = 0
    if has_ipv6_loopback():
        v6 = free_port("::1")
        args += ["--web.listen-address", f"[::1]:{v6}"]
    # A wide-open umask must not make the socket reachable by everyone.
    child = children.start(
        *args, "-sockdir", str(sockdir), prefix=["sh", "-c", 'umask 000; exec "$0" "$@"']
    )
    await child.ready("127.0.0.1", v4)
    await child.ready(None, unix)
    assert await scrape(f"http://127.0.0.1:{v4}/node") == (200, PAGE)
    assert await scrape("http://aegis/node", unix=unix) == (200, PAGE)
    if v6:
        await child.ready("::1", v6)
        assert await scrape(f"http://[::1]:{v6}/node") == (200, PAGE)
    assert stat.S_IMODE(unix.stat().st_mode) == 0o660
    assert await child.stop() == 0
    assert not unix.exists()


async def test_default_listener_only_when_none_is_given(
    sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    port = free_port()
    child = children.start("--web.listen-address", f"127.0.0.1:{port}", "-sockdir", str(sockdir))
    await child.ready("127.0.0.1", port)
    assert f' msg="127.0.0.1:{port} -> {sockdir}"\n' in child.output()


async def test_systemd_socket_activation_serves_the_passed_socket(
    sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        fd = listening.fileno()
        # What systemd does: the socket at fd 3, and LISTEN_PID naming the process that gets it
        # ($$ survives the exec). bash, not sh: dash takes single-digit descriptors only.
        wrapper = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"'
        child = children.start(
            "--web.systemd-socket",
            "-sockdir",
            str(sockdir),
            prefix=["bash", "-c", wrapper],
            pass_fds=[fd],
        )
        listening.close()  # from here on only aegis holds the socket
        assert await scrape(f"http://127.0.0.1:{port}/node") == (200, PAGE)
        assert await scrape(f"http://127.0.0.1:{port}/node") == (200, PAGE)
        # The passed socket and no default listener beside it.
        assert f' msg="fd:3 -> {sockdir}"\n' in child.output()
        assert await child.stop() == 0


async def test_systemd_socket_without_systemd_stops_aegis_at_start(
    sockdir: Path, children: Children
) -> None:
    child = children.start("--web.systemd-socket", "-sockdir", str(sockdir))
    assert await child.wait() == 2
    assert "--web.systemd-socket: LISTEN_PID does not name this process" in child.output()


async def test_a_second_aegis_on_a_live_unix_listener_exits_1_and_leaves_it_alone(
    tmp_path: Path, sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    unix = tmp_path / "aegis.sock"
    flags = ["--web.listen-address", f"unix:{unix}", "-sockdir", str(sockdir)]
    first = children.start(*flags)
    await first.ready(None, unix)
    inode = unix.stat().st_ino
    second = children.start(*flags)
    assert await second.wait() == 1, second.output()
    assert f"cannot listen on unix:{unix}: Address already in use" in second.output()
    # The first one's socket file is untouched, and it still serves on it.
    assert unix.stat().st_ino == inode
    assert await scrape("http://aegis/node", unix=unix) == (200, PAGE)
    assert await first.stop() == 0
    assert not unix.exists()


def stale_socket_file(path: Path) -> None:
    """What a killed server leaves: a socket file nothing listens on."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


async def test_a_stale_unix_socket_file_is_replaced(
    tmp_path: Path, sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    unix = tmp_path / "aegis.sock"
    stale_socket_file(unix)
    child = children.start("--web.listen-address", f"unix:{unix}", "-sockdir", str(sockdir))
    await child.ready(None, unix)
    assert await scrape("http://aegis/node", unix=unix) == (200, PAGE)
    assert await child.stop() == 0
    assert not unix.exists()


@pytest.mark.parametrize("kind", ["file", "symlink"])
async def test_a_unix_listener_path_that_is_not_a_socket_is_left_alone(
    kind: str, tmp_path: Path, sockdir: Path, children: Children
) -> None:
    unix = tmp_path / "aegis.sock"
    if kind == "file":
        unix.write_text("not a socket\n")
    else:
        stale = tmp_path / "elsewhere.sock"
        stale_socket_file(stale)
        unix.symlink_to(stale)
    child = children.start("--web.listen-address", f"unix:{unix}", "-sockdir", str(sockdir))
    assert await child.wait() == 1, child.output()
    assert f"cannot listen on unix:{unix}: Address already in use" in child.output()
    if kind == "file":
        assert unix.read_text() == "not a socket\n"
    else:
        assert unix.is_symlink()
        assert stat.S_ISSOCK(unix.stat().st_mode)


async def test_a_failed_start_removes_the_socket_files_it_created(
    tmp_path: Path, sockdir: Path, children: Children
) -> None:
    unix = tmp_path / "aegis.sock"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        child = children.start(
            "--web.listen-address",
            f"unix:{unix}",
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "-sockdir",
            str(sockdir),
        )
        assert await child.wait() == 1, child.output()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in child.output()
    assert not unix.exists()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("::1:80", "an IPv6 address goes in brackets"),
        ("localhost", "is not host:port"),
        ("unix:", "unix: needs a socket path"),
    ],
)
async def test_bad_listen_address_is_an_error(
    sockdir: Path, children: Children, address: str, message: str
) -> None:
    child = children.start("--web.listen-address", address, "-sockdir", str(sockdir))
    assert await child.wait() == 2
    assert message in child.output()


PLAIN_ON_TLS = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 48\r\n"
    b"Connection: close\r\n\r\n"
    b"Client sent an HTTP request to an HTTPS server.\n"
)


async def read_all(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(20):
            return await reader.read(-1)
    finally:
        writer.close()


async def served_certificate(port: int, ctx: ssl.SSLContext) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


async def tls_aegis(
    tmp_path: Path, sockdir: Path, children: Children, *flags: str
) -> tuple[trustme.CA, ssl.SSLContext, Aegis, int]:
    """aegis serving TLS with a throwaway CA's certificate (s.pem, rotatable), and a client
    context that trusts that CA."""
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "s.pem"))
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: s.pem\n  key_file: s.pem\n")
    port = free_port()
    child = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir)),
        *("--web.config.file", str(config), *flags),
    )
    await child.ready("127.0.0.1", port)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ca, ctx, child, port


async def test_a_tls_listener_answers_plain_http_with_400_and_still_serves_tls(
    tmp_path: Path, sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    ca, ctx, child, port = await tls_aegis(
        tmp_path, sockdir, children, "--web.read-header-timeout=1s"
    )

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{port}/node", ssl=ctx) as resp,
    ):
        assert (resp.status, await resp.text()) == (200, PAGE)
    for request in (b"GET /node HTTP/1.1\r\nHost: aegis\r\n\r\n", b"G"):
        assert await read_all(port, request) == PLAIN_ON_TLS
    # Silence, or a handshake begun and never finished, is cut at the read-header deadline.
    for request in (b"", b"\x16\x03\x01"):
        started = time.monotonic()
        assert await read_all(port, request) == b""
        assert time.monotonic() - started < 10
    # A rotated certificate is picked up on the next handshake.
    first = await served_certificate(port, ctx)
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "n.pem"))
    os.replace(tmp_path / "n.pem", tmp_path / "s.pem")
    assert await served_certificate(port, ctx) != first
    assert "Traceback" not in child.output()
    assert await child.stop() == 0


async def test_the_tls_handshake_takes_from_the_head_deadline_not_adds_to_it(
    tmp_path: Path, sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    """One deadline from the accept to the end of the first head, however much of it the
    handshake took: a client that waits before its handshake does not get a fresh one after."""
    await upstreams.metrics(sockdir / "node.sock", PAGE)
    _, ctx, child, port = await tls_aegis(
        tmp_path,
        sockdir,
        children,
        "--web.read-header-timeout=3s",
        "--web.idle-timeout=60s",
    )
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    connected = time.monotonic()
    await asyncio.sleep(2.7)  # most of the deadline, before the handshake begins
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="127.0.0.1")
    head = b"GET /node HTTP/1.1\r\nHost: aegis\r\nX-Padding: " + b"x" * 400 + b"\r\n\r\n"
    try:
        for byte in head:  # a slowloris: 20 s for the whole head
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
    except (ConnectionError, ssl.SSLError):
        pass  # cut while writing
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        async with asyncio.timeout(20):
            assert await reader.read() == b""
    closed = time.monotonic() - connected
    writer.close()
    # Closed at the deadline from connecting (3 s), not 3 s after the handshake (5.7 s); the
    # bounds are loose because the machine is small and shared.
    assert 2.5 < closed < 4.5, closed
    assert await child.stop() == 0
