"""The README's promises that code can check: its library example runs as shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from conftest import Upstreams

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md lost its marked library example"
    return match.group(1)


async def test_readme_library_example_serves_sockets(
    upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the example's sockdir is ./run
    (tmp_path / "run").mkdir()
    await upstreams.metrics(tmp_path / "run" / "node.sock", "node_up 1\n")
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, web.Application)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert await (await client.get("/")).text() == "my own application\n"
        response = await client.get("/sockets/node")
        assert (response.status, await response.text()) == (200, "node_up 1\n")
        assert (await client.get("/sockets/absent")).status == 404
