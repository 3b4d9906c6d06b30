"""The proxy answers like the service would, and fails visibly: never wrong data."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import logging
import os
import shutil
import socket
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aegisrun import WITHOUT_DAC, Children, free_port, needs_aegis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from test_metrics import scrape
from test_metrics import value as metric_value

from aegis import proxy
from aegis.proxy import LIMITS_KEY, MAX_SCRAPE_TIMEOUT, Config, deadline, make_app
from aegis.upstream import MAX_HEAD
from aegis.webauth import setup_web_config
from aegis.webconfig import load_web_config
from conftest import AegisFactory, Upstreams, raw_http

PAGE = "# TYPE up gauge\nup 1\n"


async def slow(request: web.Request) -> web.Response:
    """An upstream that answers long after any deadline in these tests."""
    await asyncio.sleep(30)
    return web.Response(text=PAGE)


async def test_get_name_reaches_the_socket_at_metrics_with_query_kept(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    seen = await upstreams.metrics(sockdir / "node.sock", PAGE)
    client = await aegis()
    response = await client.get("/node?collect[]=cpu&collect[]=mem")
    assert response.status == 200
    assert await response.text() == PAGE
    assert client.port is not None
    # Byte for byte as the scraper wrote it, encoded or not.
    await raw_http(
        client.port, b"GET /node?collect[]=cpu HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert seen == ["/metrics?collect%5B%5D=cpu&collect%5B%5D=mem", "/metrics?collect[]=cpu"]


async def test_missing_socket_is_404(aegis: AegisFactory) -> None:
    client = await aegis()
    response = await client.get("/absent")
    assert response.status == 404
    assert await response.text() == "no such target\n"


async def test_sockdir_missing_at_start_is_served_once_it_appears(
    aegis: AegisFactory, upstreams: Upstreams, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    later = tmp_path / "later"
    client = await aegis(sockdir=later)
    assert "does not exist" in caplog.text
    assert (await client.get("/svc")).status == 503
    later.mkdir()
    await upstreams.metrics(later / "svc.sock", PAGE)
    response = await client.get("/svc")
    assert (response.status, await response.text()) == (200, PAGE)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_only_get_and_head(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, method: str
) -> None:
    seen = await upstreams.metrics(sockdir / "svc.sock", PAGE)
    client = await aegis()
    response = await client.request(method, "/svc", data=b"x")
    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
    assert (await client.request(method, "/random-name")).status == 405
    assert seen == []
    # Counted, as every request for a target is, without the name as a label.
    text = await scrape(client)
    assert metric_value(text, "aegis_requests_total", target="", code="405") == 2
    assert "random-name" not in text
    assert 'target="svc"' not in text


async def test_an_unknown_expectation_is_417_and_counted(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    seen = await upstreams.metrics(sockdir / "svc.sock", PAGE)
    client = await aegis()
    response = await client.get("/svc", headers={"Expect": "!"})
    assert (response.status, await response.text()) == (
        417,
        "only Expect: 100-continue is understood\n",
    )
    assert seen == []
    # 100-continue is granted: the scrape goes on.
    response = await client.get("/svc", headers={"Expect": "100-continue"})
    assert (response.status, await response.text()) == (200, PAGE)
    text = await scrape(client)
    assert metric_value(text, "aegis_requests_total", target="", code="417") == 1
    assert metric_value(text, "aegis_requests_total", target="svc", code="200") == 1


async def test_head_gives_the_head_without_a_body(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    seen = await upstreams.metrics(sockdir / "svc.sock", PAGE)
    client = await aegis()
    for _ in range(2):  # the second one must not trip over leftovers of the first
        response = await client.head("/svc")
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(PAGE))
        assert await response.read() == b""
    assert (await (await client.get("/svc")).text()) == PAGE
    assert seen == ["/metrics", "/metrics", "/metrics"]


async def test_end_to_end_headers_pass_and_hop_by_hop_do_not(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    received: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        received.append(dict(request.headers))
        return web.Response(text=PAGE)

    await upstreams.http(sockdir / "svc.sock", handler)
    client = await aegis()
    sent = {
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        "Accept-Encoding": "gzip",
        "User-Agent": "Prometheus/2.42.0",
        "X-Prometheus-Scrape-Timeout-Seconds": "10",
        "X-Forwarded-For": "192.0.2.7",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Upgrade": "h2c",
        "X-Keep-Me": "yes",
    }
    response = await client.get("/svc", headers=sent)
    assert response.status == 200
    (headers,) = received
    for name in (
        "Accept",
        "Accept-Encoding",
        "User-Agent",
        "X-Prometheus-Scrape-Timeout-Seconds",
        "X-Keep-Me",
    ):
        assert headers[name] == sent[name]
    for name in ("X-Drop-Me", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
        assert name not in headers
    assert headers["X-Forwarded-For"] == "192.0.2.7, 127.0.0.1"
    # A Unix socket has no host name: the service sees localhost, and the scraper's Host aside.
    assert headers["Host"] == "localhost"
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{client.port}"
    assert headers["Via"] == "1.1 aegis"


async def test_a_service_sees_exactly_these_request_headers(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """What the README promises a service, field by field and in order, for a scraper whose
    Connection names its own X-Forwarded-For and Via (both dropped, as any field it names)."""
    heads = await recording_upstream(upstreams, sockdir / "svc.sock")
    client = await aegis()
    assert client.port is not None
    request = (
        b"GET /svc?x=1 HTTP/1.1\r\nHost: metrics.example:31337\r\nUser-Agent: Prometheus/3.5\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Host: evil.example\r\nVia: 1.1 squid\r\n"
        b"Accept: text/plain\r\nConnection: close, X-Forwarded-For, Via\r\n\r\n"
    )
    assert (await raw_http(client.port, request)).startswith(b"HTTP/1.1 200 OK\r\n")
    assert heads[-1] == (
        b"GET /metrics?x=1 HTTP/1.1\r\nUser-Agent: Prometheus/3.5\r\nAccept: text/plain\r\n"
        b"Host: localhost\r\nX-Forwarded-Host: metrics.example:31337\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nVia: 1.1 aegis\r\n\r\n"
    )
    # Without Connection naming them: the scraper's list goes on, its Via stays beside Aegis's.
    request = request.replace(b", X-Forwarded-For, Via", b"").replace(
        b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1
    )
    assert (await raw_http(client.port, request)).startswith(b"HTTP/1.0 200 OK\r\n")
    assert heads[-1] == (
        b"GET /metrics?x=1 HTTP/1.1\r\nUser-Agent: Prometheus/3.5\r\nVia: 1.1 squid\r\n"
        b"Accept: text/plain\r\nHost: localhost\r\nX-Forwarded-Host: metrics.example:31337\r\n"
        b"X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\nVia: 1.0 aegis\r\n\r\n"
    )


async def test_hop_by_hop_response_headers_stay_behind(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Upstream-Private\r\n"
            b"Keep-Alive: timeout=5\r\nX-Upstream-Private: 1\r\nX-Public: 2\r\n"
            b"Content-Length: 5\r\n\r\nup 1\n"
        )
        await writer.drain()

    await upstreams.raw(sockdir / "svc.sock", serve)
    client = await aegis()
    response = await client.get("/svc")
    assert await response.text() == "up 1\n"
    assert response.headers["X-Public"] == "2"
    for name in ("X-Upstream-Private", "Keep-Alive"):
        assert name not in response.headers
    assert response.headers.get("Connection", "keep-alive").lower() == "keep-alive"


async def test_status_type_and_gzip_encoding_come_back_untouched(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    compressed = gzip.compress(PAGE.encode() * 100)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=203,
            body=compressed,
            headers={
                "Content-Type": "application/openmetrics-text; version=1.0.0; charset=utf-8",
                "Content-Encoding": "gzip",
                "X-Custom": "kept",
            },
        )

    await upstreams.http(sockdir / "svc.sock", handler)
    client = await aegis()
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(client.make_url("/svc")) as response,
    ):
        assert response.status == 203
        assert response.headers["Content-Type"] == (
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        )
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["X-Custom"] == "kept"
        assert await response.read() == compressed  # byte for byte: never recompressed


async def test_upstream_error_status_passes_through(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, text="collector broken\n")

    await upstreams.http(sockdir / "svc.sock", handler)
    client = await aegis()
    response = await client.get("/svc")
    assert (response.status, await response.text()) == (503, "collector broken\n")


async def test_deadline_comes_from_the_scrape_timeout_header(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.http(sockdir / "svc.sock", slow)
    client = await aegis(scrape_timeout=60)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.get("/svc", headers={"X-Prometheus-Scrape-Timeout-Seconds": "1.2"})
    assert response.status == 504
    assert await response.text() == "upstream: upstream deadline exceeded\n"
    # Answered after the offset-reduced deadline (0.7 s), well before the scraper's own 1.2 s
    # would have run out plus slack, and nowhere near the 60 s default.
    assert 0.6 < loop.time() - started < 10


async def test_default_deadline_without_the_header(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.http(sockdir / "svc.sock", slow)
    client = await aegis(scrape_timeout=0.3)
    response = await client.get("/svc")
    assert response.status == 504


def test_deadline_arithmetic() -> None:
    app = make_app(Config(timeout_offset=0.5, scrape_timeout=7))

    def request_with(value: str | None) -> web.Request:
        from aiohttp.test_utils import make_mocked_request

        headers = {} if value is None else {"X-Prometheus-Scrape-Timeout-Seconds": value}
        return make_mocked_request("GET", "/x", headers=headers, app=app)

    config = Config(timeout_offset=0.5, scrape_timeout=7)
    assert deadline(request_with("10"), config) == 9.5
    assert deadline(request_with("0.6"), config) == 0.3  # never below half the scraper's budget
    assert deadline(request_with(None), config) == 7
    for bad in ("soon", "-1", "0", "-0", "inf", "-inf", "nan", "1e999", "", "0x10", "1,5"):
        assert deadline(request_with(bad), config) == 7
    # A scraper cannot hold a slot for longer than the ceiling, however long it says it waits.
    for huge in ("1e9", "121", "99999999999999999999999"):
        assert deadline(request_with(huge), config) == MAX_SCRAPE_TIMEOUT == 120
    patient = Config(timeout_offset=0.5, scrape_timeout=300)
    assert deadline(request_with("1e9"), patient) == 300  # a longer --scrape.timeout raises it
    assert deadline(request_with("1e-9"), config) == 0.5e-9


async def test_stale_socket_file_is_502(aegis: AegisFactory, sockdir: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sockdir / "svc.sock"))
    dead.close()  # the file stays, nobody listens: what a crashed service leaves behind
    client = await aegis()
    response = await client.get("/svc")
    assert response.status == 502
    assert "connection refused" in await response.text()
    assert str(sockdir) not in await response.text()  # paths are for the log only


async def test_bound_but_not_listening_socket_is_502(aegis: AegisFactory, sockdir: Path) -> None:
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(sockdir / "svc.sock"))
    client = await aegis()
    response = await client.get("/svc")
    assert response.status == 502
    bound.close()


async def test_upstream_closing_without_answer_is_502(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    await upstreams.raw(sockdir / "svc.sock", hang_up)
    client = await aegis()
    response = await client.get("/svc")
    assert response.status == 502
    assert "closed before an answer" in await response.text()


def raw_answer(head: bytes, *body_parts: bytes, then_close: bool = True):  # type: ignore[no-untyped-def]
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        for part in body_parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
        if then_close:
            writer.transport.abort()

    return serve


@pytest.mark.parametrize(
    "upstream",
    [
        pytest.param(
            raw_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x" * 70000),
            id="short-body",
        ),
        pytest.param(
            raw_answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"10000\r\n" + b"x" * 0x10000 + b"\r\n",
                b"10\r\nshort",
            ),
            id="chunked-reset",
        ),
        pytest.param(
            raw_answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"10000\r\n" + b"x" * 0x10000 + b"\r\n",
                b"zz-not-a-chunk\r\n",
                then_close=False,
            ),
            id="chunked-garbage",
        ),
    ],
)
async def test_failure_after_the_response_started_aborts_the_client(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, upstream: object
) -> None:
    """A truncated page must never look like a complete 200."""
    await upstreams.raw(sockdir / "svc.sock", upstream)  # type: ignore[arg-type]
    client = await aegis(scrape_timeout=5)
    response = await client.get("/svc")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_truncated_page_is_not_complete_on_the_wire(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """Byte level: fewer bytes than announced, or no closing chunk, then the connection ends."""
    await upstreams.raw(
        sockdir / "svc.sock",
        raw_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x" * 70000),
    )
    client = await aegis()
    assert client.port is not None
    answer = await raw_http(client.port, b"GET /svc HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Length: 100000" in head
    assert len(body) < 100000


async def test_deadline_during_the_body_aborts_the_client(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"x" * 200000)
        await writer.drain()
        await asyncio.sleep(30)

    await upstreams.raw(sockdir / "svc.sock", stalls)
    client = await aegis(scrape_timeout=0.5)
    response = await client.get("/svc")
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_library_mounts_as_a_subapp(upstreams: Upstreams, sockdir: Path) -> None:
    await upstreams.metrics(sockdir / "svc.sock", PAGE)
    outer = web.Application()
    outer.add_subapp("/aegis/", make_app(Config(sockdir=sockdir)))
    async with TestClient(TestServer(outer, host="127.0.0.1")) as client:
        response = await client.get("/aegis/svc")
        assert (response.status, await response.text()) == (200, PAGE)
        assert (await client.get("/aegis/nope")).status == 404


@needs_aegis
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop CAP_DAC_OVERRIDE")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
async def test_permission_denied_is_502_and_the_log_names_file_and_group(
    upstreams: Upstreams, sockdir: Path, children: Children
) -> None:
    """A real Aegis meets a socket it may not connect to. Root ignores file modes, so Aegis runs
    as root without CAP_DAC_OVERRIDE: then a mode-0000 socket refuses it like any user."""
    await upstreams.metrics(sockdir / "svc.sock", PAGE)
    os.chmod(sockdir / "svc.sock", 0)
    port = free_port()
    aegis = children.start(
        "-hostport",
        f"127.0.0.1:{port}",
        "-sockdir",
        str(sockdir),
        prefix=("setpriv", *WITHOUT_DAC),
    )
    await aegis.ready("127.0.0.1", port)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/svc") as response,
    ):
        assert (response.status, await response.text()) == (502, "permission denied\n")
    assert await aegis.stop() == 0
    assert f"{sockdir / 'svc.sock'} is root:root mode 0000" in aegis.output()
    assert "aegis runs as root in groups root" in aegis.output()


# --- fidelity: the head as the upstream sent it, the request head as the scraper sent it ---


def answer_once(answer: bytes, heads: list[bytes] | None = None):  # type: ignore[no-untyped-def]
    """A raw upstream that records each request head and answers it with ``answer``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if heads is not None:
                heads.append(head)
            writer.write(answer)
            await writer.drain()

    return serve


async def recording_upstream(upstreams: Upstreams, path: Path) -> list[bytes]:
    """A good upstream at ``path``; returns the request heads it receives, as bytes."""
    heads: list[bytes] = []
    await upstreams.raw(
        path, answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nup 1\n", heads)
    )
    return heads


def split_answer(answer: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *fields = head.split(b"\r\n")
    return status_line, fields, body


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_the_response_head_goes_out_as_the_upstream_sent_it(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, framing: str
) -> None:
    if framing == "length":
        body_framing, body = b"Content-Length: 5\r\n", b"up 1\n"
    else:
        body_framing, body = b"Transfer-Encoding: chunked\r\n", b"5\r\nup 1\n\r\n0\r\n\r\n"
    await upstreams.raw(
        sockdir / "svc.sock",
        answer_once(
            b"HTTP/1.1 299 Caf\xe9 \xe2\x82\xac\r\nX-Latin: caf\xe9\r\nx-lower-CASE: As Is\r\n"
            b"X-Raw: \x80\xff\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            + body_framing
            + b"\r\n"
            + body
        ),
    )
    client = await aegis()
    assert client.port is not None
    answer = await raw_http(
        client.port, b"GET /svc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    status_line, fields, got = split_answer(answer)
    assert status_line == b"HTTP/1.1 299 Caf\xe9 \xe2\x82\xac"  # reason bytes untouched
    assert fields[:5] == [
        b"X-Latin: caf\xe9",
        b"x-lower-CASE: As Is",
        b"X-Raw: \x80\xff",
        b"Set-Cookie: a=1",
        b"Set-Cookie: b=2",
    ]
    names = [field.split(b":")[0].lower() for field in fields]
    # No invented Content-Type or Server; a Date, as RFC 9110 asks of a proxy.
    assert b"content-type" not in names
    assert b"server" not in names
    assert names.count(b"date") == 1
    assert got.endswith(b"up 1\n") or b"up 1\n" in got


async def test_the_upstreams_date_is_kept_and_none_added(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    date = b"Date: Tue, 01 Jan 2030 00:00:00 GMT"
    await upstreams.raw(
        sockdir / "svc.sock",
        answer_once(b"HTTP/1.1 200 OK\r\n" + date + b"\r\nContent-Length: 5\r\n\r\nup 1\n"),
    )
    client = await aegis()
    assert client.port is not None
    request = b"GET /svc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    _, fields, body = split_answer(await raw_http(client.port, request))
    assert [field for field in fields if field.lower().startswith(b"date:")] == [date]
    assert b"Content-Length: 5" in fields
    assert b"Connection: close" in fields
    assert body == b"up 1\n"


async def test_odd_bytes_in_every_request_header_go_to_the_upstream_as_they_came(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    heads = await recording_upstream(upstreams, sockdir / "svc.sock")
    registry = CollectorRegistry()
    client = await aegis(registry=registry, max_concurrent_per_target=2)
    assert client.port is not None
    odd = [b"\xe2\x82\xac", b"\xff", b"\x80\xfe", b"caf\xe9, \xff"]
    names = [
        b"Connection",
        b"Host",
        b"User-Agent",
        b"Accept",
        b"X-Forwarded-For",
        b"X-Prometheus-Scrape-Timeout-Seconds",
        b"Authorization",
        b"X-\xe9",
    ]
    sent = 0
    for value in odd:
        for name in names:
            host = b"" if name == b"Host" else b"Host: aegis\r\n"
            request = b"GET /svc?q=%%ff&x=[] HTTP/1.1\r\n%s%s: %s\r\nConnection: close\r\n\r\n"
            request %= (host, name, value)
            answer = await raw_http(client.port, request)
            sent += 1
            if name == b"X-\xe9":  # not a token: the HTTP parser refuses it, not the proxy
                assert answer.startswith(b"HTTP/1.0 400 "), answer[:100]
                sent -= 1
                continue
            if name == b"Host":  # no host name: refused by Aegis, and counted (target="")
                assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:100]
                assert answer.endswith(b"\r\n\r\nbad Host header\n")
                continue
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), (name, value, answer[:200])
            head = heads[-1]
            assert head.startswith(b"GET /metrics?q=%ff&x=[] HTTP/1.1\r\n")
            assert b"\r\nHost: localhost\r\n" in head
            assert b"\r\nX-Forwarded-Host: aegis\r\n" in head
            if name == b"X-Forwarded-For":
                assert b"\r\nX-Forwarded-For: %s, 127.0.0.1\r\n" % value in head
            elif name != b"Connection":
                assert b"\r\n%s: %s\r\n" % (name, value) in head
    # Every slot given back (the first defect leaked one per odd Connection header).
    app = client.server.app
    assert app is not None
    assert app[LIMITS_KEY].in_flight() == 0
    assert registry.get_sample_value("aegis_requests_in_flight") == 0
    total = sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "aegis_requests"
        for sample in metric.samples
        if sample.name == "aegis_requests_total"
    )
    assert total == sent


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "protocol", id="not-http"),
        pytest.param(b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", "protocol", id="000"),
        pytest.param(b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", "protocol", id="099"),
        pytest.param(b"HTTP/1.1 600 High\r\nContent-Length: 0\r\n\r\n", "protocol", id="600"),
        pytest.param(b"HTTP/1.1 999 High\r\nContent-Length: 0\r\n\r\n", "protocol", id="999"),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nxx",
            "protocol",
            id="101",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n",
            "too_large",
            id="huge-head",
        ),
        pytest.param(
            (b"HTTP/1.1 103 Early Hints\r\nLink: " + b"b" * 1000 + b"\r\n\r\n") * 100,
            "too_large",
            id="many-interim-answers",
        ),
        # llhttp reads a body on an interim answer; it was relayed before the page.
        pytest.param(
            b"HTTP/1.1 150 Hmm\r\nContent-Length: 5\r\n\r\nEVIL!"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nup 1\n",
            "protocol",
            id="interim-answer-with-a-body",
        ),
        pytest.param(
            b"HTTP/1.1 199 Hmm\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nEVIL!\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nup 1\n",
            "protocol",
            id="interim-answer-with-a-chunked-body",
        ),
        # llhttp takes any number of digits; Python's int() refuses more than 4300.
        pytest.param(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 1" + b"0" * 5000 + b"\r\n\r\n",
            "protocol",
            id="204-with-a-content-length-of-5001-digits",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 18 + b"\r\n\r\nup 1\n",
            "protocol",
            id="content-length-of-19-digits",
        ),
    ],
)
async def test_nonsense_answers_are_a_counted_502(
    aegis: AegisFactory,
    upstreams: Upstreams,
    sockdir: Path,
    answer: bytes,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await upstreams.raw(sockdir / "svc.sock", answer_once(answer))
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    response = await client.get("/svc")
    assert response.status == 502
    assert registry.get_sample_value("aegis_upstream_errors_total", {"target": "svc", "kind": kind})
    assert registry.get_sample_value("aegis_requests_total", {"target": "svc", "code": "502"})
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_content_length_of_5000_zeros_is_0_and_one_of_5001_digits_a_502(
    aegis: AegisFactory,
    upstreams: Upstreams,
    sockdir: Path,
    method: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # llhttp lets both through; Python's int() refused them (a traceback, counted "internal").
    zeros = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 5000 + b"\r\n\r\n"
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 5000 + b"\r\n\r\n"
    await upstreams.raw(sockdir / "zeros.sock", answer_once(zeros))
    await upstreams.raw(sockdir / "huge.sock", answer_once(huge))
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    response = await client.request(method, "/zeros")
    assert (response.status, await response.read()) == (200, b"")
    response = await client.request(method, "/huge")
    assert response.status == 502
    assert registry.get_sample_value(
        "aegis_upstream_errors_total", {"target": "huge", "kind": "protocol"}
    )
    assert "Traceback" not in caplog.text


async def test_a_204s_content_length_is_not_relayed(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    # RFC 9110: a 204 has no Content-Length; a 304's tells the page's length, and is kept.
    answers = {
        "nothing": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        "same": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    }
    for name, answer in answers.items():
        await upstreams.raw(sockdir / f"{name}.sock", answer_once(answer))
    client = await aegis()
    response = await client.get("/nothing")
    assert (response.status, await response.read()) == (204, b"")
    assert "Content-Length" not in response.headers
    response = await client.get("/same")
    assert (response.status, response.headers["Content-Length"]) == (304, "5")


async def test_an_endless_response_head_is_cut_off(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(100000):  # 2.5 MB, far past the bound
                writer.write(b"X-Line-%d: %s\r\n" % (i, b"x" * 16))
                await writer.drain()

    await upstreams.raw(sockdir / "svc.sock", endless)
    client = await aegis(scrape_timeout=30)
    response = await client.get("/svc")
    assert (response.status, await response.text()) == (
        502,
        f"upstream: response head over {MAX_HEAD} bytes\n",
    )


async def test_bytes_after_a_complete_answer_are_dropped_with_the_connection(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    connections = 0

    async def two_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nup 1\n"
            b"HTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 5\r\n\r\nup 0\n"
        )
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")

    await upstreams.raw(sockdir / "svc.sock", two_answers)
    client = await aegis()
    for _ in range(2):
        response = await client.get("/svc")
        assert (response.status, await response.text()) == (200, "up 1\n")
        assert "X-Injected" not in response.headers
    assert connections == 2  # the connection was not kept for the next scrape


async def test_an_unexpected_error_is_a_counted_502_logged_once(
    aegis: AegisFactory,
    upstreams: Upstreams,
    sockdir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the proxy path (injected here) is still answered, counted and logged."""
    await upstreams.metrics(sockdir / "svc.sock", PAGE)

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(proxy, "relayed_fields", broken)
    caplog.set_level(logging.DEBUG, "aegis.proxy")
    registry = CollectorRegistry()
    client = await aegis(registry=registry, max_concurrent_per_target=1)
    for _ in range(3):
        response = await client.get("/svc")
        assert (response.status, await response.text()) == (502, "internal error\n")
    assert (
        registry.get_sample_value(
            "aegis_upstream_errors_total", {"target": "svc", "kind": "internal"}
        )
        == 3
    )
    assert registry.get_sample_value("aegis_requests_total", {"target": "svc", "code": "502"}) == 3
    assert registry.get_sample_value("aegis_requests_in_flight") == 0
    # Once with its traceback; the same failure again within the minute only at debug level,
    # so that whatever makes it happen cannot flood the log.
    logged = [record for record in caplog.records if record.exc_info is not None]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert caplog.text.count("RuntimeError: injected bug") == 1
    quiet = [r for r in caplog.records if "internal error in the proxy" in r.getMessage()]
    assert [r.levelno for r in quiet] == [logging.ERROR, logging.DEBUG, logging.DEBUG]


async def test_failures_any_client_can_repeat_are_logged_once_a_minute_per_target(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale socket, a deadline no service can meet, a name that is not allowed: as fast as a
    client asks, one line per kind and target, the rest at debug level."""
    await upstreams.metrics(sockdir / "svc.sock", PAGE)
    for stale in ("stale", "other"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(sockdir / f"{stale}.sock"))
    client = await aegis()
    caplog.set_level(logging.DEBUG, "aegis.proxy")
    tiny = {"X-Prometheus-Scrape-Timeout-Seconds": "1e-9"}
    for _ in range(20):
        assert (await client.get("/stale")).status == 502
        assert (await client.get("/other")).status == 502
        assert (await client.get("/svc", headers=tiny)).status == 504
        assert (await client.get("/a%20b")).status == 400
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(loud) == 3, loud
    assert sum(m.startswith("502 stale: ") for m in loud) == 1
    assert sum(m.startswith("502 other: ") for m in loud) == 1  # not held back by "stale"
    assert sum(m.startswith("504 svc: ") for m in loud) == 1
    held = [
        r for r in caplog.records if r.levelno == logging.DEBUG and "502 stale" in r.getMessage()
    ]
    assert len(held) == 19


async def test_with_basic_auth_odd_header_bytes_pass_and_credentials_do_not(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    heads = await recording_upstream(upstreams, sockdir / "svc.sock")
    hashed = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode()
    users = tmp_path / "web.yml"
    users.write_text(f"basic_auth_users:\n  alice: '{hashed}'\n")
    app = make_app(Config(sockdir=sockdir))
    setup_web_config(app, load_web_config(users))
    token = base64.b64encode(b"alice:wonderland")
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert client.port is not None
        for value in (b"\xff", b"\xe2\x82\xac", b"caf\xe9"):
            request = b"GET /svc HTTP/1.1\r\nHost: a\r\nAuthorization: Basic %s\r\nX-Odd: %s\r\n"
            answer = await raw_http(
                client.port, request % (token, value) + b"Connection: close\r\n\r\n"
            )
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
            assert b"\r\nX-Odd: %s\r\n" % value in heads[-1]
            assert b"authorization" not in heads[-1].lower()


async def test_endless_trailers_are_cut_off_at_the_bound(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    trailer = b"X-Trailer: " + b"t" * 200_000  # never ends: the upstream then waits
    await upstreams.raw(
        sockdir / "svc.sock",
        raw_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"10000\r\n" + b"x" * 0x10000 + b"\r\n0\r\n",
            trailer,
            then_close=False,
        ),
    )
    registry = CollectorRegistry()
    client = await aegis(registry=registry, scrape_timeout=30)
    response = await client.get("/svc")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    labels = {"target": "svc", "kind": "too_large"}
    assert registry.get_sample_value("aegis_upstream_errors_total", labels) == 1


async def test_a_scraper_too_slow_for_its_own_deadline_is_not_the_services_timeout(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """The service streams its page at once; the scraper reads none of it before its deadline:
    the page is cut, and counted as the scraper's doing."""
    piece = b"big_metric 1\n" * 5000

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(200):  # 13 MB, far past every buffer on the way
            await response.write(piece)
        await response.write_eof()
        return response

    await upstreams.http(sockdir / "big.sock", big)
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    with socket.create_connection(("127.0.0.1", client.port)) as scraper:
        scraper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        scraper.sendall(
            b"GET /big HTTP/1.1\r\nHost: aegis\r\nX-Prometheus-Scrape-Timeout-Seconds: 1.5\r\n\r\n"
        )
        await asyncio.sleep(3)  # the 1 s deadline passes while nothing is read
    errors = {"target": "big", "kind": "client_slow"}
    for _ in range(100):
        if registry.get_sample_value("aegis_upstream_errors_total", errors) == 1:
            break
        await asyncio.sleep(0.05)
    assert registry.get_sample_value("aegis_upstream_errors_total", errors) == 1
    timeout = {"target": "big", "kind": "timeout"}
    assert registry.get_sample_value("aegis_upstream_errors_total", timeout) is None


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308, 399])
@pytest.mark.parametrize("framing", ["length", "chunked", "none"])
async def test_an_upstream_redirect_is_a_counted_502_never_followed(
    aegis: AegisFactory,
    upstreams: Upstreams,
    sockdir: Path,
    status: int,
    framing: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A service that answers with a redirect would send the scraper, with the credentials it
    has for Aegis, wherever it likes: a real client that follows redirects never gets there."""
    stolen: list[dict[str, str]] = []

    async def attacker(request: web.Request) -> web.Response:
        stolen.append(dict(request.headers))
        return web.Response(text="up 1\n")

    elsewhere = web.Application()
    elsewhere.router.add_get("/steal", attacker)
    runner = web.AppRunner(elsewhere, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    body = {
        "length": b"Content-Length: 5\r\n\r\nmoved",
        "chunked": b"Transfer-Encoding: chunked\r\n\r\n5\r\nmoved\r\n0\r\n\r\n",
        "none": b"Content-Length: 0\r\n\r\n",
    }[framing]
    location = b"Location: http://127.0.0.1:%d/steal\r\n" % port
    answer = b"HTTP/1.1 %d Moved\r\n%s%s" % (status, location, body)
    await upstreams.raw(sockdir / "svc.sock", answer_once(answer))
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    try:
        auth = {"Authorization": "Basic " + base64.b64encode(b"prometheus:secret").decode()}
        async with aiohttp.ClientSession() as session:
            response = await session.get(client.make_url("/svc"), headers=auth)  # follows them
            assert response.status == 502
            text = await response.text()
        assert "Location" not in response.headers
        assert "steal" not in text
        assert stolen == []
        assert registry.get_sample_value(
            "aegis_upstream_errors_total", {"target": "svc", "kind": "redirect"}
        )
        assert registry.get_sample_value("aegis_requests_total", {"target": "svc", "code": "502"})
        assert "Traceback" not in caplog.text
    finally:
        await runner.cleanup()


async def test_a_304_is_still_relayed(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    """Not a redirect: only ever the answer to the scraper's own conditional request."""
    await upstreams.raw(
        sockdir / "svc.sock", answer_once(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n')
    )
    client = await aegis()
    response = await client.get("/svc", headers={"If-None-Match": '"x"'})
    assert response.status == 304
    assert response.headers["ETag"] == '"x"'
