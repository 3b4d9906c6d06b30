"""A real aiohttp server behind ``setup_web_config`` (TLS when the config has it), for the web
config and web auth tests: an ``echo`` route shows what a proxy handler would receive."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from aegis.webauth import setup_web_config
from aegis.webconfig import WebConfig, server_ssl_context


def write(tmp_path: Path, text: str) -> Path:
    """``text`` as ``tmp_path/web.yml``."""
    path = tmp_path / "web.yml"
    path.write_text(text)
    return path


async def echo(request: web.Request) -> web.Response:
    """What a proxy handler would forward: every header it can see."""
    return web.json_response(
        {
            "headers": dict(request.headers),
            "raw": [k.decode() for k, _ in request.raw_headers],
            "name": request.match_info["name"],
        }
    )


@asynccontextmanager
async def serve(config: WebConfig) -> AsyncIterator[str]:
    """``echo`` at ``/{name}/metrics`` on a free loopback port; yields the base URL."""
    app = web.Application()
    app.router.add_get("/{name}/metrics", echo)
    setup_web_config(app, config)
    runner = web.AppRunner(app)
    await runner.setup()
    ssl_context = server_ssl_context(config.tls) if config.tls else None
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"{'https' if ssl_context else 'http'}://{host}:{port}"
    finally:
        await runner.cleanup()


async def get(url: str, ctx: ssl.SSLContext | None = None, **kw: Any) -> tuple[int, Any, Any]:
    """GET ``url/node/metrics``: status, headers and the echoed JSON (text when not 200)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/node/metrics", ssl=ctx or False, **kw) as resp,
    ):
        body = await resp.json() if resp.status == 200 else await resp.text()
        return resp.status, resp.headers, body
