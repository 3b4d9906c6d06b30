"""What every request must be (HTTP/1.x, one valid Host), what Aegis's own answers never say
(Server), how a client's address is written, and how a request that loops back is refused."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
from pathlib import Path

import bcrypt
import pytest
from aegisrun import Children, free_port, fresh_get, needs_aegis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from test_proxy import answer_once, recording_upstream

from aegis.protocol import MAX_HOST, valid_host
from aegis.proxy import Config, make_app
from aegis.targets import socket_file_identity
from aegis.webauth import setup_web_config
from aegis.webconfig import WebConfig
from conftest import AegisFactory, Upstreams, raw_http

PATHS = ["/svc", "/-/sd", "/", "/-/metrics", "/-/healthy", "/-/ready", "/no/such/path"]


def requests_total(registry: CollectorRegistry) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "aegis_requests"
        for sample in metric.samples
        if sample.name == "aegis_requests_total"
    )


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
@pytest.mark.parametrize("path", PATHS)
async def test_a_version_other_than_1x_is_505_on_every_path(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, version: bytes, path: str
) -> None:
    heads = await recording_upstream(upstreams, sockdir / "svc.sock")
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    assert client.port is not None
    answer = await raw_http(
        client.port, b"GET %s %s\r\nHost: aegis\r\n\r\n" % (path.encode(), version)
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    line = b"HTTP/1.1" if version == b"HTTP/2.0" else b"HTTP/1.0"
    assert head.startswith(line + b" 505 HTTP Version Not Supported\r\n"), answer[:200]
    assert b"\r\nConnection: close" in head
    assert body == b"only HTTP/1.0 and HTTP/1.1\n"
    assert heads == []
    # A request for a name is counted, under target="": the name never becomes a label.
    counted = registry.get_sample_value("aegis_requests_total", {"target": "", "code": "505"})
    assert counted == (1 if path == "/svc" else None)
    assert requests_total(registry) == (1 if path == "/svc" else 0)


GOOD_HOSTS = [
    "aegis",
    "aegis:31337",
    "10.99.0.2:31337",
    "[::1]:31337",
    "[2001:db8::7]",
    "[::ffff:10.0.0.1]:1",
    "metrics.example.net",
    "x-y.z_~!$&'()*+,;=%41",
    "h" * MAX_HOST,
]
BAD_HOSTS = [
    "h" * (MAX_HOST + 1),
    "a b",
    "a/b",
    "a@b",
    "a:",
    ":80",
    "a:0",
    "a:65536",
    "a:123456",
    "a:8x",
    "[::1",
    "[::1]x",
    "[zz::1]",
    "[fe80::1%eth0]",
    "::1",
    'a"b',
    "a\\b",
    "%4",
    "caf\xe9",
    "a\tb",
]


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_hosts_as_rfc_3986_writes_them_are_valid(host: str) -> None:
    assert valid_host(host)


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_anything_else_is_no_host(host: str) -> None:
    assert not valid_host(host)


@pytest.mark.parametrize("path", PATHS)
async def test_a_bad_host_is_400_on_every_path_and_counted_for_a_name(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, path: str
) -> None:
    heads = await recording_upstream(upstreams, sockdir / "svc.sock")
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    assert client.port is not None
    for host in [h.encode("utf-8", "surrogateescape") for h in BAD_HOSTS if "\t" not in h]:
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
            path.encode(),
            host,
        )
        answer = await raw_http(client.port, request)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (host, answer[:200])
        assert answer.endswith(b"\r\n\r\nbad Host header\n")
    assert heads == []
    refused = len([h for h in BAD_HOSTS if "\t" not in h])
    counted = registry.get_sample_value("aegis_requests_total", {"target": "", "code": "400"})
    assert counted == (refused if path == "/svc" else None)
    for host in GOOD_HOSTS:
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
        answer = await raw_http(client.port, request % (path.encode(), host.encode()))
        assert not answer.startswith(b"HTTP/1.1 400"), (host, answer[:200])


@needs_aegis
async def test_a_60_kb_host_is_refused_by_the_real_command(
    sockdir: Path, upstreams: Upstreams, children: Children
) -> None:
    """The command lets heads of up to 64 KiB through its parser: the Host bound is Aegis's."""
    await upstreams.metrics(sockdir / "svc.sock", "up 1\n")
    _, port = await children.serve(sockdir)
    for path in (b"/-/sd", b"/", b"/svc"):
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
        answer = await raw_http(port, request % (path, b"h" * 60_000))
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
        assert len(answer) < 1000


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_no_server_header_on_any_of_aegiss_own_answers(
    upstreams: Upstreams, sockdir: Path
) -> None:
    """Exporters send none, and the versions of Python and aiohttp are nobody's business. The
    service's own Server, if it sends one, is the service's answer and passes."""
    await upstreams.raw(
        sockdir / "svc.sock",
        answer_once(b"HTTP/1.1 200 OK\r\nServer: exporter\r\nContent-Length: 5\r\n\r\nup 1\n"),
    )
    await upstreams.raw(sockdir / "broken.sock", answer_once(b"garbage\r\n\r\n"))
    app = make_app(Config(sockdir=sockdir))
    users = {"prometheus": bcrypt.hashpw(b"secret", bcrypt.gensalt(4))}
    setup_web_config(app, WebConfig(users=users))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        good = basic("prometheus", "secret")
        answers = {
            "401": await client.get("/svc"),
            "svc": await client.get("/svc", headers=good),
            "404": await client.get("/nothing", headers=good),
            "400": await client.get("/.hidden", headers=good),
            "405": await client.post("/svc", headers=good),
            "417": await client.get("/svc", headers={**good, "Expect": "later"}),
            "502": await client.get("/broken", headers=good),
            "sd": await client.get("/-/sd", headers=good),
            "landing": await client.get("/", headers=good),
            "metrics": await client.get("/-/metrics", headers=good),
            "healthy": await client.get("/-/healthy", headers=good),
            "no-route": await client.get("/a/b", headers=good),
        }
        for what, response in answers.items():
            await response.read()
            if what == "svc":
                assert response.headers.getall("Server") == ["exporter"]
            else:
                assert "Server" not in response.headers, (what, response.headers)
        assert client.port is not None
        answer = await raw_http(client.port, b"GET /svc HTTP/2.0\r\nHost: a\r\n\r\n")
        assert b"\r\nServer:" not in answer.partition(b"\r\n\r\n")[0]
    finally:
        await client.close()


def dual_stack_listener() -> socket.socket:
    """``[::]:port`` taking IPv4 clients too, as the command's default listener does."""
    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    return sock


async def test_an_ipv4_client_of_an_ipv6_listener_is_written_in_ipv4_form(
    upstreams: Upstreams, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    heads = await recording_upstream(upstreams, sockdir / "svc.sock")
    app = make_app(Config(sockdir=sockdir))
    setup_web_config(app, WebConfig(users={"p": bcrypt.hashpw(b"secret", bcrypt.gensalt(4))}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = dual_stack_listener()
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    try:
        good = b"Authorization: Basic %s\r\n" % base64.b64encode(b"p:secret")
        request = b"GET /svc HTTP/1.1\r\nHost: aegis\r\n%sConnection: close\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request % good)
        assert (await reader.read(-1)).startswith(b"HTTP/1.1 200 OK\r\n")
        writer.close()
        assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in heads[-1], heads[-1]
        with caplog.at_level(logging.WARNING, logger="aegis.webauth"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request % b"Authorization: Basic %s\r\n" % base64.b64encode(b"p:wrong"))
            assert (await reader.read(-1)).startswith(b"HTTP/1.1 401 ")
            writer.close()
        (refusal,) = [r for r in caplog.records if r.getMessage() == "refused credentials"]
        assert refusal.__dict__["remote"] == "127.0.0.1"
    finally:
        await runner.cleanup()


async def test_a_request_that_came_through_an_aegis_is_refused_508(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    heads = await recording_upstream(upstreams, sockdir / "svc.sock")
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    for via in ("1.1 aegis", "1.0 squid, 1.1 AEGIS", "HTTP/1.1 aegis (comment)"):
        response = await client.get("/svc", headers={"Via": via})
        assert (response.status, await response.text()) == (
            508,
            "request already came through an aegis\n",
        )
    assert heads == []
    labels = {"target": "", "kind": "loop"}
    assert registry.get_sample_value("aegis_upstream_errors_total", labels) == 3
    # Another proxy's Via is no loop: passed on, with Aegis's after it.
    response = await client.get("/svc", headers={"Via": "1.1 squid, 1.1 aegis-not"})
    assert response.status == 200
    assert b"\r\nVia: 1.1 squid, 1.1 aegis-not\r\n" in heads[-1]
    assert heads[-1].endswith(b"\r\nVia: 1.1 aegis\r\n\r\n")


async def test_a_target_that_is_one_of_aegiss_own_listeners_is_refused_by_identity(
    upstreams: Upstreams, sockdir: Path
) -> None:
    """Aegis on a Unix socket in its own socket directory: the name for it is refused before
    any connection (the program gives the library its listeners' identities)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sockdir / "self.sock"))
    identity = socket_file_identity(listener)
    assert identity == (
        os.stat(sockdir / "self.sock").st_dev,
        os.stat(sockdir / "self.sock").st_ino,
    )
    registry = CollectorRegistry()
    app = make_app(Config(sockdir=sockdir, listener_sockets={identity}), registry=registry)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, listener).start()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = runner.addresses[-1][1]
    try:
        answer = await raw_http(port, b"GET /self HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 508 Loop Detected\r\n"), answer[:200]
        assert answer.endswith(b"the target is one of aegis's own listeners\n")
        assert requests_total(registry) == 1  # the one request, not a second one to itself
        labels = {"target": "self", "kind": "loop"}
        assert registry.get_sample_value("aegis_upstream_errors_total", labels) == 1
    finally:
        await runner.cleanup()


@needs_aegis
@pytest.mark.parametrize("activated", [False, True], ids=["unix-listener", "socket-activation"])
async def test_the_real_command_never_proxies_to_itself(
    sockdir: Path, children: Children, activated: bool
) -> None:
    """A link to, or a listener in, the socket directory that is Aegis's own: one GET became
    129 hops. Now it ends at once, answered 508."""
    port = free_port()
    listener = sockdir / "self.sock"
    if activated:
        with socket.socket(socket.AF_UNIX) as passed:
            passed.bind(str(listener))
            passed.listen()
            fd = passed.fileno()
            wrapper = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"'
            child = children.start(
                *("--web.systemd-socket", "--web.listen-address", f"127.0.0.1:{port}"),
                *("-sockdir", str(sockdir)),
                prefix=["bash", "-c", wrapper],
                pass_fds=[fd],
            )
    else:
        child = children.start(
            *("--web.listen-address", f"127.0.0.1:{port}"),
            *("--web.listen-address", f"unix:{listener}", "-sockdir", str(sockdir)),
        )
    await child.ready("127.0.0.1", port)
    for _ in range(5):
        status, body = await fresh_get(f"http://127.0.0.1:{port}/self")
        assert status == 508, body
    status, text = await fresh_get(f"http://127.0.0.1:{port}/-/metrics")
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith("aegis_requests_total{")
    )
    # The program tells the library its own listeners: every scrape is refused before any
    # connection, so each is counted once and nothing comes back through the listener.
    assert counted == 5, text.decode()
    assert 'kind="loop"' in text.decode()
    assert await child.stop() == 0
    assert "Traceback" not in child.output()


@needs_aegis
async def test_the_real_command_writes_an_ipv4_client_of_its_default_listener_as_ipv4(
    upstreams: Upstreams, sockdir: Path, children: Children
) -> None:
    """The default listener is [::]: an IPv4 client's address is ::ffff:10.99.0.2 there, and
    was written so in X-Forwarded-For and in the log."""
    heads = await recording_upstream(upstreams, sockdir / "svc.sock")
    port = free_port()
    child = children.start(
        *("-hostport", f"[::]:{port}", "-sockdir", str(sockdir), "--log.level", "debug")
    )
    await child.ready("127.0.0.1", port)
    assert (await fresh_get(f"http://127.0.0.1:{port}/svc"))[0] == 200
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in heads[-1], heads[-1]
    answer = await raw_http(port, b"GET /x HTTP/1.1\r\nHost: x\r\nX Y: 1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400 "), answer
    assert await child.stop() == 0
    lines = [line for line in child.output().splitlines() if "malformed request" in line]
    assert lines, child.output()
    assert all(" client=127.0.0.1 " in line for line in lines), lines


async def test_a_loop_through_an_unknown_listener_ends_at_via_and_then_by_identity(
    upstreams: Upstreams, sockdir: Path
) -> None:
    """Not told of its listeners (a library user's program), Aegis ends a loop one hop in, at
    its own Via, and from then on refuses that listener's name before connecting."""
    registry = CollectorRegistry()
    runner = web.AppRunner(make_app(Config(sockdir=sockdir), registry=registry), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(sockdir / "self.sock")).start()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[-1][1]
    request = b"GET /self HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    try:
        first = await raw_http(port, request)
        assert first.startswith(b"HTTP/1.1 508 Loop Detected\r\n"), first[:200]
        assert requests_total(registry) == 2  # Aegis's request to itself, refused, and its own
        for _ in range(3):
            again = await raw_http(port, request)
            assert again.endswith(b"the target is one of aegis's own listeners\n"), again
        assert requests_total(registry) == 5
    finally:
        await runner.cleanup()
