"""The landing page, /-/sd, /-/healthy and /-/ready."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import socket
import tracemalloc
from pathlib import Path

import pytest
from aegisrun import has_ipv6_loopback
from aiohttp import web
from test_sockdir import until

from aegis.config import Config, ConfigError
from aegis.discovery import MAX_HELD_BYTES, MAX_KEPT_ANSWERS
from aegis.protocol import MAX_HOST
from aegis.proxy import ANSWERS_KEY, make_app
from aegis.targets import Target
from conftest import AegisFactory, Upstreams, raw_http


def meta(path: Path) -> dict[str, str]:
    """The labels /-/sd gives a target whose socket is at ``path``."""
    st = os.stat(path)
    return {
        "__meta_aegis_socket": os.path.realpath(path),
        "__meta_aegis_socket_owner": pwd.getpwuid(st.st_uid).pw_name,
        "__meta_aegis_socket_group": grp.getgrgid(st.st_gid).gr_name,
    }


async def test_health_endpoints_answer_plain_200(aegis: AegisFactory) -> None:
    client = await aegis()
    for path, text in (("/-/healthy", "Aegis is Healthy.\n"), ("/-/ready", "Aegis is Ready.\n")):
        response = await client.get(path)
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.text() == text


async def test_sd_of_an_empty_directory_is_an_empty_list(aegis: AegisFactory) -> None:
    client = await aegis()
    response = await client.get("/-/sd")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.text() == "[]"


async def test_sd_lists_a_socket_created_after_start_on_the_next_request(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "first.sock", "up 1\n")
    client = await aegis()
    port = client.port
    assert [group["labels"]["target"] for group in await (await client.get("/-/sd")).json()] == [
        "first"
    ]
    await upstreams.metrics(sockdir / "second.sock", "up 1\n")
    groups = await (await client.get("/-/sd")).json()
    assert groups == [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {
                "__metrics_path__": "/first",
                "target": "first",
                **meta(sockdir / "first.sock"),
            },
        },
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {
                "__metrics_path__": "/second",
                "target": "second",
                **meta(sockdir / "second.sock"),
            },
        },
    ]


async def test_sd_address_is_the_host_the_client_used(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "app.sock", "up 1\n")
    client = await aegis()
    response = await client.get("/-/sd", headers={"Host": "metrics.example.net:31337"})
    assert (await response.json())[0]["targets"] == ["metrics.example.net:31337"]


async def test_sd_follows_the_external_url(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    await upstreams.metrics(sockdir / "app.sock", "up 1\n")
    elsewhere = tmp_path / "elsewhere.sock"
    await upstreams.metrics(elsewhere, "up 1\n")
    client = await aegis(
        external_url="https://gateway.example.net:8443/aegis/",
        targets={"explicit": Target("explicit", elsewhere)},
    )
    groups = await (await client.get("/-/sd", headers={"Host": "ignored:1"})).json()
    assert groups == [
        {
            "targets": ["gateway.example.net:8443"],
            "labels": {
                "__scheme__": "https",
                "__metrics_path__": f"/aegis/{name}",
                "target": name,
                **meta(path),
            },
        }
        for name, path in (("app", sockdir / "app.sock"), ("explicit", elsewhere))
    ]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket away needs root")


@needs_root
async def test_sd_labels_carry_where_a_link_leads_and_an_owner_without_a_name_by_number(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    elsewhere = sockdir.parent / "elsewhere.sock"
    await upstreams.metrics(elsewhere, "up 1\n")
    nobody = pwd.getpwnam("nobody")
    os.chown(elsewhere, nobody.pw_uid, nobody.pw_gid)
    (sockdir / "linked.sock").symlink_to(elsewhere)
    await upstreams.metrics(sockdir / "numbered.sock", "up 1\n")
    unnamed = next(n for n in range(54321, 60000) if not known_id(n))
    os.chown(sockdir / "numbered.sock", unnamed, unnamed)
    missing = tmp_path / "missing.sock"
    client = await aegis(targets={"gone": Target("gone", missing)})
    labels = {
        group["labels"]["target"]: {
            key: value for key, value in group["labels"].items() if key.startswith("__meta_")
        }
        for group in await (await client.get("/-/sd")).json()
    }
    assert labels == {
        # An explicit target whose socket cannot be looked at: its path, and no owner or group
        # (empty, which Prometheus takes for absent).
        "gone": {
            "__meta_aegis_socket": str(missing),
            "__meta_aegis_socket_owner": "",
            "__meta_aegis_socket_group": "",
        },
        "linked": {
            "__meta_aegis_socket": str(elsewhere),
            "__meta_aegis_socket_owner": "nobody",
            "__meta_aegis_socket_group": grp.getgrgid(nobody.pw_gid).gr_name,
        },
        "numbered": {
            "__meta_aegis_socket": str(sockdir / "numbered.sock"),
            "__meta_aegis_socket_owner": str(unnamed),
            "__meta_aegis_socket_group": str(unnamed),
        },
    }
    # What a link leads to is looked at anew for each answer.
    os.chown(elsewhere, 0, 0)
    groups = await (await client.get("/-/sd")).json()
    [linked] = [group for group in groups if group["labels"]["target"] == "linked"]
    assert linked["labels"]["__meta_aegis_socket_owner"] == pwd.getpwuid(0).pw_name


def known_id(number: int) -> bool:
    try:
        pwd.getpwuid(number)
    except KeyError:
        try:
            grp.getgrgid(number)
        except KeyError:
            return False
    return True


@needs_root
async def test_sd_labels_show_the_owner_a_socket_is_given_just_after_it_appeared(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """A service binds its socket, then hands it to its user: the facts read in between are
    read again once the file has settled, and the answer follows."""
    client = await aegis()
    await upstreams.metrics(sockdir / "app.sock", "up 1\n")

    async def owner() -> str:
        [group] = await (await client.get("/-/sd")).json()
        return str(group["labels"]["__meta_aegis_socket_owner"])

    assert await owner() == pwd.getpwuid(os.geteuid()).pw_name
    nobody = pwd.getpwnam("nobody")
    os.chown(sockdir / "app.sock", nobody.pw_uid, nobody.pw_gid)
    deadline = asyncio.get_running_loop().time() + 5
    while await owner() != "nobody":
        assert asyncio.get_running_loop().time() < deadline, "the new owner never showed"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("ftp://host/", "scheme"),
        ("http:///path", "no host"),
        ("http://user:pw@host/", "only scheme"),
        ("http://host:99999/", "bad port"),
    ],
)
def test_bad_external_urls_are_refused_at_start(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=rf"external_url: .*{complaint}"):
        Config(external_url=url)


async def test_reserved_paths_are_never_targets(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    # Even a socket named like a reserved path is never reachable through a target name.
    await upstreams.metrics(sockdir / "-.sock", "up 1\n")
    client = await aegis()
    assert (await client.get("/-")).status == 400
    assert [g["labels"]["target"] for g in await (await client.get("/-/sd")).json()] == []


async def test_sd_without_host_header_still_names_an_address(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "app.sock", "up 1\n")
    client = await aegis()
    raw = await raw_http(client.port, b"GET /-/sd HTTP/1.0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    groups = json.loads(body)
    assert groups[0]["labels"]["target"] == "app"
    # The listener's address, port included (it was the host alone, which scrapes port 80).
    assert groups[0]["targets"] == [f"127.0.0.1:{client.port}"]


async def test_sd_without_host_names_the_listener_in_ipv4_form_and_never_a_unix_path(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    await upstreams.metrics(sockdir / "app.sock", "up 1\n")
    runner = web.AppRunner(make_app(Config(sockdir=sockdir)), access_log=None)
    await runner.setup()
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    v6.bind(("::", 0))
    await web.SockSite(runner, v6).start()
    await web.UnixSite(runner, str(tmp_path / "aegis.sock")).start()
    port = v6.getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /-/sd HTTP/1.0\r\n\r\n")
        body = (await reader.read(-1)).partition(b"\r\n\r\n")[2]
        writer.close()
        assert json.loads(body)[0]["targets"] == [f"127.0.0.1:{port}"]
        if has_ipv6_loopback():
            reader, writer = await asyncio.open_connection("::1", port)
            writer.write(b"GET /-/sd HTTP/1.0\r\n\r\n")
            body = (await reader.read(-1)).partition(b"\r\n\r\n")[2]
            writer.close()
            assert json.loads(body)[0]["targets"] == [f"[::1]:{port}"]
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "aegis.sock"))
        writer.write(b"GET /-/sd HTTP/1.0\r\n\r\n")
        answer = await reader.read(-1)
        writer.close()
        assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n"), answer
        assert str(tmp_path).encode() not in answer
        # With a Host, a Unix listener's /-/sd names it.
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "aegis.sock"))
        writer.write(b"GET /-/sd HTTP/1.0\r\nHost: gateway:80\r\n\r\n")
        body = (await reader.read(-1)).partition(b"\r\n\r\n")[2]
        writer.close()
        assert json.loads(body)[0]["targets"] == ["gateway:80"]
    finally:
        await runner.cleanup()


def stale_sockets(directory: Path, count: int) -> list[str]:
    names = [f"svc-{index:05d}" for index in range(count)]
    for name in names:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(directory / f"{name}.sock"))
    return names


async def stalled(path: Path, target: str, host: str) -> socket.socket:
    """A client that asks and reads nothing (over a Unix socket, whose buffer the kernel does
    not grow: Aegis's writes stall after a couple of hundred kilobytes)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, str(path))
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()
    await asyncio.get_running_loop().sock_sendall(sock, request)
    return sock


async def test_clients_that_read_nothing_share_one_answer_however_many_and_whatever_host(
    sockdir: Path, tmp_path: Path
) -> None:
    """With thousands of sockets, every /-/sd and / used to be built per request, and a client
    that read nothing held its own copy of it (with a 60 KB Host, 600 MB each). Now one answer
    is built per address and shared; past a few addresses, answers are built as they are sent,
    and no client holds more than a piece of its own."""
    names = stale_sockets(sockdir, 10000)
    app = make_app(Config(sockdir=sockdir))
    answers = app[ANSWERS_KEY]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = tmp_path / "aegis.sock"
    await web.UnixSite(runner, str(listener)).start()
    readers: list[socket.socket] = []
    try:
        reader, writer = await asyncio.open_unix_connection(str(listener))
        writer.write(b"GET /-/sd HTTP/1.0\r\nHost: %s\r\n\r\n" % (b"h" * MAX_HOST))
        whole = (await reader.read(-1)).partition(b"\r\n\r\n")[2]
        writer.close()
        assert len(whole) > 10000 * MAX_HOST
        held = answers.held_bytes
        assert held >= len(whole)
        readers += [await stalled(listener, "/-/sd", "h" * MAX_HOST) for _ in range(50)]
        readers += [await stalled(listener, "/", "aegis") for _ in range(20)]
        await until(lambda: answers.sending == 70, "every client waited for")
        # 50 stalled clients of a 5 MB answer: still the one answer (the landing page keeps
        # its rows, not whole pages: tests/test_landing.py).
        assert answers.held_bytes == held
        # As many distinct addresses as a client likes: whole answers stay within the bound.
        readers += [
            await stalled(listener, "/-/sd", f"{index:03d}" + "h" * (MAX_HOST - 3))
            for index in range(80)
        ]
        await until(lambda: answers.sending == 150, "every client waited for")
        assert answers.held_bytes <= MAX_HELD_BYTES + len(whole)
        for sock in readers:
            sock.close()
        await until(lambda: answers.sending == 0, "every answer ended")
        assert answers.held_bytes <= MAX_KEPT_ANSWERS * len(whole)  # only the kept ones now
        # Every answer, kept or built as it is sent, is the same JSON.
        labels = [
            {"__metrics_path__": f"/{name}", "target": name, **meta(sockdir / f"{name}.sock")}
            for name in names
        ]
        for index in (0, 40, 79):
            host = f"{index:03d}" + "h" * (MAX_HOST - 3)
            reader, writer = await asyncio.open_unix_connection(str(listener))
            writer.write(f"GET /-/sd HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            body = (await reader.read(-1)).partition(b"\r\n\r\n")[2]
            writer.close()
            assert json.loads(body) == [{"targets": [host], "labels": label} for label in labels]
    finally:
        for sock in readers:
            sock.close()
        await runner.cleanup()


async def test_a_client_with_a_host_of_its_own_that_reads_nothing_holds_one_piece(
    sockdir: Path, tmp_path: Path
) -> None:
    """Past the kept answers, each client's /-/sd is built as it is sent: a client that reads
    nothing holds the transport's buffer and one piece. It held four pieces of 256 targets
    (the one waiting, the next built ahead, its chunked copy, its text): 370 KB with a 255-byte
    Host, so 1000 such clients took 370 MB."""
    stale_sockets(sockdir, 3000)
    app = make_app(Config(sockdir=sockdir))
    answers = app[ANSWERS_KEY]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = tmp_path / "aegis.sock"
    await web.UnixSite(runner, str(listener)).start()
    readers: list[socket.socket] = []
    hosts = iter(f"{index:03d}" + "h" * (MAX_HOST - 3) for index in range(1000))
    try:
        for _ in range(MAX_KEPT_ANSWERS):  # the kept answers, read whole
            reader, writer = await asyncio.open_unix_connection(str(listener))
            writer.write(f"GET /-/sd HTTP/1.0\r\nHost: {next(hosts)}\r\n\r\n".encode())
            await reader.read(-1)
            writer.close()
        clients = 40
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            readers += [await stalled(listener, "/-/sd", next(hosts)) for _ in range(clients)]
            server = runner.server
            assert server is not None

            def stalled_writers() -> int:
                # Each writer waits once its transport holds the high-water mark (64 KiB).
                transports = (handler.transport for handler in server.connections)
                return sum(
                    1
                    for transport in transports
                    if transport is not None and transport.get_write_buffer_size() >= 1 << 16
                )

            await until(lambda: answers.sending == clients, "every client waited for")
            await until(lambda: stalled_writers() == clients, "every writer waiting")
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held / clients < 256 * 1024, f"{held / clients / 1024:.0f} KiB per client"
    finally:
        for sock in readers:
            sock.close()
        await runner.cleanup()


async def test_a_kept_answer_is_dropped_when_the_names_change(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "a.sock", "up 1\n")
    client = await aegis()
    for accept in ("application/json", "text/html"):
        for _ in range(2):
            assert "/a" in await (await client.get("/", headers={"Accept": accept})).text()
    assert [g["labels"]["target"] for g in await (await client.get("/-/sd")).json()] == ["a"]
    await upstreams.metrics(sockdir / "b.sock", "up 1\n")
    assert [g["labels"]["target"] for g in await (await client.get("/-/sd")).json()] == [
        "a",
        "b",
    ]
    for accept in ("application/json", "text/html"):
        response = await client.get("/", headers={"Accept": accept})
        assert "/b" in await response.text()
        assert response.headers["Content-Type"] == f"{accept}; charset=utf-8"  # as it always was
    assert (await client.get("/-/sd")).headers["Content-Type"] == "application/json; charset=utf-8"
    head = await client.head("/-/sd")
    assert head.status == 200
    assert int(head.headers["Content-Length"]) == len(await (await client.get("/-/sd")).read())
