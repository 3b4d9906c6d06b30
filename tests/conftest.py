"""Shared fixtures: real Unix-socket upstreams and Aegis served on real TCP sockets."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aegisrun import Children
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings
from prometheus_client import CollectorRegistry
from prometheusrun import BUILDS, Build, Prometheus

from aegis.proxy import Config, make_app

# No example database: the Nix build runs the suite in a read-only copy of the source, where
# Hypothesis' default directory cannot be written (a warning, and warnings are errors).
settings.register_profile("aegis", database=None)
settings.load_profile("aegis")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """An empty socket directory with a short path of its own: a socket's path must fit 107
    bytes, and ``tmp_path`` grows with the test's name and pytest-xdist's worker directory."""
    base = Path(tempfile.mkdtemp(prefix="aegis-"))
    path = base / "run"
    path.mkdir()
    yield path
    shutil.rmtree(base, ignore_errors=True)


class Upstreams:
    """Starts HTTP services on Unix sockets; everything is stopped when the test ends."""

    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.Server] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def http(self, path: Path, handler: Handler, *, route: str = "/metrics") -> list[str]:
        """An aiohttp service answering ``route`` at ``path``; returns the list of request paths
        (with query strings) it saw, for the test to inspect."""
        seen: list[str] = []

        async def recorded(request: web.Request) -> web.StreamResponse:
            seen.append(request.path_qs)
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", route, recorded)
        # A test's upstream may still be sleeping in a handler at the end: don't wait for it.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        await web.UnixSite(runner, str(path)).start()
        self._runners.append(runner)
        return seen

    async def metrics(self, path: Path, text: str) -> list[str]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(text=text, content_type="text/plain")

        return await self.http(path, handler)

    async def raw(self, path: Path, handler: RawHandler) -> asyncio.Server:
        """A bare stream server, for upstreams that must misbehave in exact ways."""

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.append(writer)
            await handler(reader, writer)

        server = await asyncio.start_unix_server(tracked, str(path))
        self._servers.append(server)
        return server

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        for server in self._servers:
            server.close()
        for writer in self._writers:
            writer.close()
        for server in self._servers:
            await server.wait_closed()


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    started = Upstreams()
    yield started
    await started.close()


AegisFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def aegis(sockdir: Path) -> AsyncIterator[AegisFactory]:
    """``await aegis(**config)``: Aegis on 127.0.0.1 over real TCP, and a client for it."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(
        registry: CollectorRegistry | None = None, **overrides: object
    ) -> TestClient[web.Request, web.Application]:
        settings: dict[str, object] = {"sockdir": sockdir, **overrides}
        app = make_app(Config(**settings), registry=registry)  # type: ignore[arg-type]
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def raw_http(port: int, request: bytes, *, wait: float = 10.0) -> bytes:
    """Send bytes exactly as given and read until the server closes: for what aiohttp's client
    would refuse to send or would paper over."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(wait):
            return await reader.read(-1)
    finally:
        writer.close()


@pytest.fixture
async def children(tmp_path: Path) -> AsyncIterator[Children]:
    """The installed ``aegis`` as child processes, all stopped when the test ends."""
    started = Children(tmp_path)
    yield started
    await started.close()


@pytest.fixture(params=BUILDS, ids=lambda build: build.name)
def prometheus_build(request: pytest.FixtureRequest) -> Build:
    """Each build of Prometheus in turn (prometheusrun.BUILDS): a test that uses ``prometheus``
    or ``promtool`` runs once against each, and skips, saying why, where one is absent."""
    build: Build = request.param
    if build.missing:
        pytest.skip(build.missing)
    return build


@pytest.fixture
def promtool(prometheus_build: Build) -> str:
    """The ``promtool`` of the build under test."""
    assert prometheus_build.promtool is not None
    return prometheus_build.promtool


@pytest.fixture
async def prometheus(
    tmp_path: Path, prometheus_build: Build
) -> AsyncIterator[Callable[[str], Prometheus]]:
    """``prometheus(config_text)`` starts one of the build under test; all are stopped when
    the test ends."""
    started: list[Prometheus] = []

    def start(config: str) -> Prometheus:
        started.append(Prometheus(tmp_path, config, prometheus_build))
        return started[-1]

    try:
        yield start
    finally:
        for server in started:
            await server.stop()
