"""What Aegis relies on in aiohttp beyond its public API, checked on its own, so that an aiohttp
that changes it fails here with a message saying where to look, not somewhere in the proxy.

There is one such thing: :class:`aegis.relay.Relayed` writes the upstream's head as bytes by
overriding ``StreamResponse._write_headers``, which aiohttp's ``prepare()`` calls once, after it
has framed the answer and run the ``on_response_prepare`` hooks, and before anything is sent.
``pkgs/aegis/pyproject.toml`` bounds aiohttp above; raise the bound only once this passes with
the new release.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aegis.relay import Relayed

WHERE = (
    f"aiohttp {aiohttp.__version__} no longer calls StreamResponse._write_headers as "
    "pkgs/aegis/aegis/relay.py expects"
)


class Recording(web.StreamResponse):
    def __init__(self, seen: list[str]) -> None:
        super().__init__(status=299)
        self.seen = seen
        self.request: web.BaseRequest | None = None

    async def prepare(self, request: web.BaseRequest) -> object:
        self.request = request
        return await super().prepare(request)

    async def _write_headers(self) -> None:
        self.seen.append("write_headers")
        # Framed for this connection by now: what Relayed copies into its own head.
        self.seen.extend(sorted(k for k in self.headers if k in ("Content-Length", "Date")))
        assert self.request is not None
        assert self.request.transport is not None
        self.request.transport.write(
            b"HTTP/1.1 299 Raw\r\nContent-Length: 2\r\nX-Byte: \xe9\r\n\r\n"
        )


async def test_prepare_calls_write_headers_once_after_the_hooks_and_sends_nothing_itself() -> None:
    seen: list[str] = []

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        seen.append("hook")

    async def handler(request: web.Request) -> web.StreamResponse:
        response = Recording(seen)
        response.content_length = 2
        await response.prepare(request)
        await response.write(b"ok")
        return response

    app = web.Application()
    app.on_response_prepare.append(hook)
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client:
        assert client.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
    assert seen == ["hook", "write_headers", "Content-Length", "Date"], WHERE
    assert answer == b"HTTP/1.1 299 Raw\r\nContent-Length: 2\r\nX-Byte: \xe9\r\n\r\nok", WHERE


def test_relayed_overrides_a_method_aiohttp_still_has() -> None:
    assert "_write_headers" in vars(web.StreamResponse), WHERE
    assert Relayed._write_headers is not web.StreamResponse._write_headers
