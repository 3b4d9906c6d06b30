"""A real Prometheus scrapes two Unix-socket services through the installed ``aegis`` command."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aegisrun import child_env, free_port, needs_aegis
from aiohttp import web

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    needs_aegis,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="prometheus and promtool are not on PATH (Debian package 'prometheus')",
    ),
]

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


class Prometheus:
    """A Prometheus server on a free loopback port, storing under ``tmp_path``."""

    def __init__(self, tmp_path: Path, config: str) -> None:
        assert PROMETHEUS is not None
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(config)
        self.api = f"http://127.0.0.1:{free_port()}"
        self.log = tmp_path / "prometheus.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={self.api.removeprefix('http://')}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self) -> None:
        """Terminate, wait, kill on timeout."""
        self.popen.terminate()
        deadline = time.monotonic() + 15
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.popen.kill()
                self.popen.wait(10)
                break
            await asyncio.sleep(0.05)


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Callable[[str], Prometheus]]:
    """``prometheus(config_text)`` starts one; it is stopped when the test ends."""
    started: list[Prometheus] = []

    def start(config: str) -> Prometheus:
        started.append(Prometheus(tmp_path, config))
        return started[-1]

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


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


async def query(session: aiohttp.ClientSession, api: str, expr: str) -> list[dict[str, Any]]:
    async with session.get(f"{api}/api/v1/query", params={"query": expr}) as response:
        answer = await response.json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def wait_all_up(
    session: aiohttp.ClientSession, api: str, jobs: set[str], prometheus: Prometheus
) -> None:
    """Until ``up == 1`` for every job, polling the HTTP API for at most a minute."""
    deadline = time.monotonic() + 60
    # The API is asked only once Prometheus listens: a client retrying a port from the
    # ephemeral range while nothing listens there can be handed it as its own source port.
    while "Server is ready to receive web requests" not in prometheus.output():
        if prometheus.popen.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{prometheus.output()}")
        assert time.monotonic() < deadline, f"prometheus not ready in 60 s:\n{prometheus.output()}"
        await asyncio.sleep(0.05)
    seen: object = "nothing yet"
    while True:
        try:
            result = await query(session, api, "up")
        except (aiohttp.ClientError, ValueError) as exc:  # not answering queries yet
            seen = exc
        else:
            seen = result
            if {r["metric"]["job"] for r in result if r["value"][1] == "1"} >= jobs:
                return
        if prometheus.popen.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{prometheus.output()}")
        assert time.monotonic() < deadline, (
            f"targets not all up within 60 s; last answer: {seen}\n{prometheus.output()}"
        )
        await asyncio.sleep(0.25)


async def promtool_check(page: bytes) -> subprocess.CompletedProcess[bytes]:
    assert PROMTOOL is not None
    return await asyncio.to_thread(
        subprocess.run,
        [PROMTOOL, "check", "metrics"],
        input=page,
        capture_output=True,
        timeout=30,
        check=False,
    )


async def test_prometheus_scrapes_two_sockets_through_aegis(
    children, prometheus, upstreams, sockdir
):
    alpha = Service(ALPHA, gzip=True)
    beta = Service(BETA, gzip=False)
    await upstreams.http(sockdir / "alpha.sock", alpha)
    await upstreams.http(sockdir / "beta.sock", beta)

    aegis_port = free_port()
    aegis = children.start(
        "-hostport", f"127.0.0.1:{aegis_port}", "-sockdir", str(sockdir), "--workers", "1"
    )
    await aegis.ready("127.0.0.1", aegis_port)

    server = prometheus(prometheus_config(aegis_port, ["alpha", "beta"]))
    api = server.api

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await wait_all_up(session, api, {"alpha", "beta"}, server)

        async def value(expr: str) -> dict[str, str]:
            """Each series' value by job, e.g. {"alpha": "42"}."""
            return {r["metric"]["job"]: r["value"][1] for r in await query(session, api, expr)}

        assert await value("fake_alpha_value") == {"alpha": "42"}
        assert await value("fake_beta_value") == {"beta": "7.5"}
        assert await value('fake_alpha_requests_total{code="200"}') == {"alpha": "1234"}
        assert await value("sum(fake_alpha_requests_total) by (job)") == {"alpha": "1239"}
        assert await value("fake_beta_restarts_total") == {"beta": "3"}
        assert await value('fake_alpha_latency_seconds_bucket{le="0.5"}') == {"alpha": "8"}
        assert await value("fake_alpha_latency_seconds_count") == {"alpha": "10"}
        assert await value("fake_alpha_latency_seconds_sum") == {"alpha": "2.75"}
        # Each target gets only its own service's samples.
        assert await query(session, api, '{__name__=~"fake_alpha_.*", job="beta"}') == []
        assert await query(session, api, '{__name__=~"fake_beta_.*", job="alpha"}') == []

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
            checked = await promtool_check(page)
            assert checked.returncode == 0, checked.stderr.decode()


async def test_promtool_check_fails_a_broken_page():
    # Proves the check above can fail: a label set that is never closed.
    broken = ALPHA.replace(
        'fake_alpha_requests_total{code="500"}', 'fake_alpha_requests_total{code="500"'
    )
    checked = await promtool_check(broken.encode())
    assert checked.returncode != 0
    assert b"parsing error" in checked.stdout + checked.stderr
