"""--web.route-prefix: every endpoint under the prefix, as Prometheus serves, for a reverse proxy
that passes paths on unchanged."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import pytest
from aegisrun import AEGIS, Children, child_env, free_port, needs_aegis
from prometheusrun import Prometheus

from aegis.config import Config, ConfigError
from conftest import AegisFactory, Upstreams


@pytest.mark.parametrize(
    ("given", "prefix"),
    [("/", "/"), ("", "/"), ("/aegis", "/aegis"), ("aegis/", "/aegis"), ("/a/b/", "/a/b")],
)
def test_the_prefix_is_normalized_as_prometheus_does(given: str, prefix: str) -> None:
    assert Config(route_prefix=given).route_prefix == prefix


@pytest.mark.parametrize("given", ["/a b", "/{name}", "/a//b", "/a/../b", "/a?x", "/%41"])
def test_a_prefix_that_is_not_a_plain_path_is_refused(given: str) -> None:
    with pytest.raises(ConfigError, match=r"route prefix .*must be a plain path"):
        Config(route_prefix=given)


async def test_every_endpoint_answers_under_the_prefix_and_only_there(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "node.sock", "node_up 1\n")
    client = await aegis(route_prefix="/aegis")
    for path, status in [
        ("/aegis/node", 200),
        ("/aegis/-/healthy", 200),
        ("/aegis/-/ready", 200),
        ("/aegis/-/metrics", 200),
        ("/aegis/-/sd", 200),
        ("/aegis/", 200),
        ("/aegis/absent", 404),
        ("/node", 404),
        ("/-/healthy", 404),
        ("/-/metrics", 404),
    ]:
        response = await client.get(path, allow_redirects=False)
        assert response.status == status, path
    assert await (await client.get("/aegis/node")).text() == "node_up 1\n"
    for path in ("/", "/aegis"):
        response = await client.get(path, allow_redirects=False)
        assert (response.status, response.headers["Location"]) == (302, "/aegis/"), path
    response = await client.get("/aegis?x=1", allow_redirects=False)
    assert response.headers["Location"] == "/aegis/?x=1"


async def test_the_landing_pages_links_lead_under_the_prefix(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "node.sock", "node_up 1\n")
    client = await aegis(route_prefix="/deep/aegis")
    page_url = str(client.make_url("/deep/aegis"))
    async with aiohttp.ClientSession() as session:
        async with session.get(page_url) as page:  # redirected to the slash
            base = str(page.url)
            links = re.findall(r'href="([^"]+)"', await page.text())
        assert links == ["node", "-/metrics", "-/sd", "-/healthy", "-/ready"]
        for link in links:
            async with session.get(urljoin(base, link)) as followed:
                assert followed.status == 200, link
                assert followed.url.path.startswith("/deep/aegis/")


async def test_service_discovery_names_the_prefixed_path(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "node.sock", "node_up 1\n")
    client = await aegis(route_prefix="/aegis")
    groups = await (await client.get("/aegis/-/sd")).json()
    assert [group["labels"]["__metrics_path__"] for group in groups] == ["/aegis/node"]


@needs_aegis
@pytest.mark.parametrize(
    ("flags", "served", "metrics_path"),
    [
        # The external URL's path is the prefix by default, as in Prometheus.
        (["--web.external-url", "http://gateway.example:8080/aegis/"], "/aegis", "/aegis/node"),
        # A reverse proxy that strips the prefix: serve at the root, still tell the full path.
        (
            ["--web.external-url", "http://gateway.example:8080/aegis/", "--web.route-prefix=/"],
            "",
            "/aegis/node",
        ),
        (["--web.route-prefix", "/inner"], "/inner", "/inner/node"),
    ],
)
async def test_the_command_serves_under_the_route_prefix(
    tmp_path: Path,
    sockdir: Path,
    upstreams: Upstreams,
    flags: list[str],
    served: str,
    metrics_path: str,
) -> None:
    await upstreams.metrics(sockdir / "node.sock", "node_up 1\n")
    children = Children(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        child = children.start("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir), *flags)
        await child.ready("127.0.0.1", port)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}{served}/node") as response:
                assert (response.status, await response.text()) == (200, "node_up 1\n")
            async with session.get(f"{base}{served}/-/sd") as response:
                groups = await response.json()
            assert groups[0]["labels"]["__metrics_path__"] == metrics_path
            if served:
                async with session.get(f"{base}/node") as response:
                    assert response.status == 404
    finally:
        await children.close()


@needs_aegis
def test_a_bad_route_prefix_stops_the_command_naming_it(tmp_path: Path) -> None:
    assert AEGIS is not None
    done = subprocess.run(
        [AEGIS, "--web.route-prefix", "/a b"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "route prefix '/a b'" in done.stderr.splitlines()[-1]


@needs_aegis
async def test_prometheus_finds_and_scrapes_everything_under_the_prefix(
    children: Children,
    prometheus: Callable[[str], Prometheus],
    upstreams: Upstreams,
    sockdir: Path,
) -> None:
    """A real Prometheus: targets from /aegis/-/sd, and Aegis's own /aegis/-/metrics, which it
    asks for as OpenMetrics."""
    await upstreams.metrics(sockdir / "node.sock", "node_up 1\n")
    port = free_port()
    child = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir)),
        *("--web.external-url", f"http://127.0.0.1:{port}/aegis"),
    )
    await child.ready("127.0.0.1", port)
    server = prometheus(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
        f"  - job_name: sd\n    http_sd_configs:\n      - url: http://127.0.0.1:{port}/aegis/-/sd\n"
        "        refresh_interval: 1s\n"
        f"  - job_name: aegis\n    metrics_path: /aegis/-/metrics\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )

    def both_up(result: list[dict[str, Any]]) -> bool:
        return {r["metric"]["job"] for r in result if r["value"][1] == "1"} >= {"sd", "aegis"}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await server.wait_for_up(session, both_up, within=60)
        up = {r["metric"]["job"]: r["metric"] for r in await server.query(session, "up")}
        assert up["sd"]["target"] == "node"
        assert (await server.query(session, "node_up"))[0]["value"][1] == "1"
        # Aegis counts the node scrape; its own next scrape (every second) reports it.
        query = 'aegis_requests_total{target="node",code="200"}'
        deadline = time.monotonic() + 30
        while not (served := await server.query(session, query)):
            assert time.monotonic() < deadline, server.output()
            await asyncio.sleep(0.2)
        assert served[0]["metric"]["job"] == "aegis"
