"""A real Prometheus scrapes two Unix-socket services through the installed ``aegis`` command."""

from __future__ import annotations

import asyncio
import gzip
import subprocess

import aiohttp
import pytest
from aegisrun import needs_aegis
from aiohttp import web
from prometheusrun import Series

# End to end with real processes: deselect with -m 'not slow' for a quick run.
pytestmark = [needs_aegis, pytest.mark.slow]

TIMEOUT = aiohttp.ClientTimeout(total=10)

ALPHA = """\
# HELP fake_alpha_value A gauge only service alpha has.
# TYPE fake_alpha_value gauge
fake_alpha_value 42
# HELP fake_alpha_requests_total Requests alpha has handled.
# TYPE fake_alpha_requests_total counter
fake_alpha_requests_total{code="200"} 1234
fake_alpha_requests_total{code="500"} 5
# HELP fake_alpha_latency_seconds How long alpha's requests took.
# TYPE fake_alpha_latency_seconds histogram
fake_alpha_latency_seconds_bucket{le="0.1"} 3
fake_alpha_latency_seconds_bucket{le="0.5"} 8
fake_alpha_latency_seconds_bucket{le="+Inf"} 10
fake_alpha_latency_seconds_sum 2.75
fake_alpha_latency_seconds_count 10
"""

BETA = """\
# HELP fake_beta_value A gauge only service beta has.
# TYPE fake_beta_value gauge
fake_beta_value 7.5
# HELP fake_beta_restarts_total Times beta restarted.
# TYPE fake_beta_restarts_total counter
fake_beta_restarts_total 3
"""


class Service:
    """A metrics page on a Unix socket; gzip-encoded when the client accepts it and ``gzip``."""

    def __init__(self, text: str, *, gzip: bool) -> None:
        self.text = text
        self.gzip = gzip
        self.encodings: list[str] = []

    async def __call__(self, request: web.Request) -> web.Response:
        headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        body = self.text.encode()
        if self.gzip and "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self.encodings.append(headers.get("Content-Encoding", "identity"))
        return web.Response(body=body, headers=headers)


def prometheus_config(aegis_port: int, names: list[str]) -> str:
    jobs = "".join(
        f"""
  - job_name: {name}
    metrics_path: /{name}
    static_configs:
      - targets: ["127.0.0.1:{aegis_port}"]
"""
        for name in names
    )
    return f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:{jobs}"""


async def promtool_check(promtool: str, page: bytes) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=page,
        capture_output=True,
        timeout=30,
        check=False,
    )


async def test_prometheus_scrapes_two_sockets_through_aegis(
    children, prometheus, promtool, upstreams, sockdir
):
    alpha = Service(ALPHA, gzip=True)
    beta = Service(BETA, gzip=False)
    await upstreams.http(sockdir / "alpha.sock", alpha)
    await upstreams.http(sockdir / "beta.sock", beta)

    _, aegis_port = await children.serve(sockdir)

    server = prometheus(prometheus_config(aegis_port, ["alpha", "beta"]))

    def all_up(result: Series) -> bool:
        return {r["metric"]["job"] for r in result if r["value"][1] == "1"} >= {"alpha", "beta"}

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await server.wait_for_up(session, all_up, within=60)

        async def value(expr: str) -> dict[str, str]:
            """Each series' value by job, e.g. {"alpha": "42"}."""
            return {r["metric"]["job"]: r["value"][1] for r in await server.query(session, expr)}

        assert await value("fake_alpha_value") == {"alpha": "42"}
        assert await value("fake_beta_value") == {"beta": "7.5"}
        assert await value('fake_alpha_requests_total{code="200"}') == {"alpha": "1234"}
        assert await value("sum(fake_alpha_requests_total) by (job)") == {"alpha": "1239"}
        assert await value("fake_beta_restarts_total") == {"beta": "3"}
        assert await value('fake_alpha_latency_seconds_bucket{le="0.5"}') == {"alpha": "8"}
        assert await value("fake_alpha_latency_seconds_count") == {"alpha": "10"}
        assert await value("fake_alpha_latency_seconds_sum") == {"alpha": "2.75"}
        # Each target gets only its own service's samples.
        assert await server.query(session, '{__name__=~"fake_alpha_.*", job="beta"}') == []
        assert await server.query(session, '{__name__=~"fake_beta_.*", job="alpha"}') == []

    # Prometheus asked for gzip; alpha's compressed page came through Aegis untouched.
    assert "gzip" in alpha.encodings
    assert set(beta.encodings) == {"identity"}

    # What Aegis serves is valid exposition text (aiohttp's client decodes alpha's gzip).
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for name, text in [("alpha", ALPHA), ("beta", BETA)]:
            async with session.get(f"http://127.0.0.1:{aegis_port}/{name}") as response:
                assert response.status == 200
                page = await response.read()
            assert page == text.encode()
            checked = await promtool_check(promtool, page)
            assert checked.returncode == 0, checked.stderr.decode()


async def test_promtool_check_fails_a_broken_page(promtool):
    # Proves the check above can fail: a label set that is never closed.
    broken = ALPHA.replace(
        'fake_alpha_requests_total{code="500"}', 'fake_alpha_requests_total{code="500"'
    )
    checked = await promtool_check(promtool, broken.encode())
    assert checked.returncode != 0
    assert b"parsing error" in checked.stdout + checked.stderr
