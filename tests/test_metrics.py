"""Self-metrics at /-/metrics: counts by target and code, error kinds, in-flight, targets; the
library registers only its own ``aegis_*`` families, on whatever registry it is given."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import prometheus_client
import pytest
from aegisrun import free_port
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from aegis.proxy import METRICS_KEY, Config, make_app
from conftest import AegisFactory, Upstreams


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


# What Prometheus 2.x and 3.x send when they scrape.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def openmetrics_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Through prometheus_client's OpenMetrics parser, which refuses anything not to the letter
    (a missing ``# EOF``, a counter without ``_total``)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in openmetrics_families(text)
        for sample in family.samples
    }


async def scrape(client: object) -> str:
    response = await client.get("/-/metrics")  # type: ignore[attr-defined]
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return str(await response.text())


async def test_requests_are_counted_by_target_and_code(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "good.sock", "up 1\n")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response(text="late\n")

    await upstreams.http(sockdir / "slow.sock", slow)
    refusing = socket.socket(socket.AF_UNIX)
    try:
        refusing.bind(str(sockdir / "dead.sock"))  # bound, never listening: connection refused
        client = await aegis()
        for _ in range(3):
            assert (await client.get("/good")).status == 200
        assert (await client.get("/random-name-1")).status == 404
        assert (await client.get("/random-name-2")).status == 404
        assert (await client.get("/dead")).status == 502
        headers = {"X-Prometheus-Scrape-Timeout-Seconds": "0.2"}
        assert (await client.get("/slow", headers=headers)).status == 504
        text = await scrape(client)
    finally:
        refusing.close()
    assert value(text, "aegis_requests_total", target="good", code="200") == 3
    # Unknown names share one series, whatever they were.
    assert value(text, "aegis_requests_total", target="", code="404") == 2
    assert not any("random" in line for line in text.splitlines())
    assert value(text, "aegis_requests_total", target="dead", code="502") == 1
    assert value(text, "aegis_requests_total", target="slow", code="504") == 1
    assert value(text, "aegis_upstream_errors_total", target="", kind="unknown") == 2
    assert value(text, "aegis_upstream_errors_total", target="dead", kind="refused") == 1
    assert value(text, "aegis_upstream_errors_total", target="slow", kind="timeout") == 1
    assert value(text, "aegis_upstream_duration_seconds_count", target="good") == 3
    assert value(text, "aegis_upstream_duration_seconds_count", target="slow") == 1
    assert value(text, "aegis_upstream_duration_seconds_sum", target="slow") >= 0.1
    assert value(text, "aegis_targets") == 3  # good, slow, dead (sockets, listening or not)
    # The library's registry holds the library's metrics only (the program adds process_*).
    assert {name for name, _ in samples(text) if not name.startswith("aegis_")} == set()


async def test_mid_response_failures_are_counted_by_kind(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    await upstreams.raw(sockdir / "cut.sock", cut_short)
    await upstreams.raw(sockdir / "garbage.sock", garbage)
    client = await aegis()
    with pytest.raises(Exception):  # noqa: B017,PT011 - the client sees a broken connection
        await (await client.get("/cut")).read()
    assert (await client.get("/garbage")).status == 502
    text = await scrape(client)
    assert value(text, "aegis_upstream_errors_total", target="cut", kind="truncated") == 1
    # The status line was already sent: that is the code counted.
    assert value(text, "aegis_requests_total", target="cut", code="200") == 1
    assert value(text, "aegis_upstream_errors_total", target="garbage", kind="protocol") == 1
    assert value(text, "aegis_requests_total", target="garbage", code="502") == 1


async def test_bad_names_are_counted_without_their_name(aegis: AegisFactory) -> None:
    client = await aegis()
    assert (await client.get("/.hidden")).status == 400
    text = await scrape(client)
    assert value(text, "aegis_requests_total", target="", code="400") == 1
    assert value(text, "aegis_upstream_errors_total", target="", kind="bad_name") == 1


async def test_in_flight_gauge_counts_a_slow_scrape_while_it_runs(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.wait_for(release.wait(), timeout=10)
        return web.Response(text="up 1\n")

    await upstreams.http(sockdir / "held.sock", held)
    client = await aegis()
    pending = asyncio.ensure_future(client.get("/held"))
    await asyncio.wait_for(arrived.wait(), timeout=10)
    assert value(await scrape(client), "aegis_requests_in_flight") == 1
    release.set()
    assert (await asyncio.wait_for(pending, timeout=10)).status == 200
    assert value(await scrape(client), "aegis_requests_in_flight") == 0


async def test_metrics_go_to_the_given_registry_and_not_the_global_one(
    aegis: AegisFactory,
) -> None:
    registry = CollectorRegistry()
    client = await aegis(registry=registry)
    assert (await client.get("/nothing")).status == 404
    assert registry.get_sample_value("aegis_requests_total", {"target": "", "code": "404"}) == 1
    # A second application in the same process starts from zero: nothing is shared.
    other = await aegis()
    assert value(await scrape(other), "aegis_requests_total", target="", code="404") == 0


def family_names(registry: CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


def test_the_library_mounts_on_the_global_registry_with_its_own_families_only(
    sockdir: Path,
) -> None:
    """What a host program does first: its own registry, prometheus_client's global one,
    already holds process_* and python_* (and its own metrics); Aegis adds aegis_* only."""
    before = family_names(prometheus_client.REGISTRY)
    assert "process_cpu_seconds" in before  # the platform's default collectors are there
    app = make_app(Config(sockdir=sockdir), registry=prometheus_client.REGISTRY)
    try:
        added = family_names(prometheus_client.REGISTRY) - before
        assert added
        assert all(name.startswith("aegis_") for name in added), added
        assert "aegis_build_info" not in added  # the program's, like process_*
    finally:
        for collector in app[METRICS_KEY].collectors:
            prometheus_client.REGISTRY.unregister(collector)
    assert family_names(prometheus_client.REGISTRY) == before


async def test_two_applications_in_one_program_count_apart(
    sockdir: Path, upstreams: Upstreams
) -> None:
    await upstreams.metrics(sockdir / "a.sock", "a_value 1\n")
    registries = [CollectorRegistry(), CollectorRegistry()]
    outer = web.Application()
    outer.add_subapp("/one/", make_app(Config(sockdir=sockdir), registry=registries[0]))
    outer.add_subapp("/two/", make_app(Config(sockdir=sockdir), registry=registries[1]))
    async with TestClient(TestServer(outer)) as client:
        for _ in range(3):
            assert (await client.get("/one/a")).status == 200
        assert (await client.get("/two/a")).status == 200
        assert (await client.get("/two/missing")).status == 404
        page = await (await client.get("/two/-/metrics")).text()
    assert value(page, "aegis_requests_total", target="a", code="200") == 1
    assert value(page, "aegis_requests_total", target="", code="404") == 1
    one = registries[0].get_sample_value("aegis_requests_total", {"target": "a", "code": "200"})
    assert one == 3
    for registry in registries:
        assert not {name for name in family_names(registry) if not name.startswith("aegis_")}


def _get(port: int, path: str, **headers: str) -> tuple[int, bytes]:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Connection": "close", **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _serve_upstream(path: Path) -> subprocess.Popen[bytes]:
    """An upstream in its own process, so these blocking requests don't stall its event loop."""
    code = (
        "import sys\nfrom aiohttp import web\n"
        "async def h(r): return web.Response(text='up 1\\n')\n"
        "app = web.Application(); app.router.add_get('/metrics', h)\n"
        "web.run_app(app, path=sys.argv[1], print=None)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(path)])


def _wait_until(check: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_command_counts_every_request_once(tmp_path: Path) -> None:
    aegis = shutil.which("aegis")
    if aegis is None:
        pytest.skip("the aegis command is not installed (pip install -e pkgs/aegis)")
    sockdir = tmp_path / "run"
    sockdir.mkdir()
    upstream = _serve_upstream(sockdir / "app.sock")
    port = free_port()
    proc = subprocess.Popen([aegis, "-sockdir", str(sockdir), "-hostport", f"127.0.0.1:{port}"])
    try:
        _wait_until(lambda: (sockdir / "app.sock").exists(), "the upstream socket")
        _wait_until(lambda: _get(port, "/app")[0] == 200, "aegis to answer")
        answered = 1
        for _ in range(199):
            assert _get(port, "/app")[0] == 200
            answered += 1
        for _ in range(50):
            assert _get(port, "/missing")[0] == 404
        for _ in range(3):  # scrapes of Aegis itself are not counted
            status, body = _get(port, "/-/metrics")
            assert status == 200
            text = body.decode()
            assert value(text, "aegis_requests_total", target="app", code="200") == answered
            assert value(text, "aegis_requests_total", target="", code="404") == 50
            assert value(text, "aegis_upstream_duration_seconds_count", target="app") == answered
            assert value(text, "aegis_requests_in_flight") == 0  # scrapes of Aegis don't count
            assert value(text, "aegis_targets") == 1
            status, body = _get(port, "/-/metrics", Accept=PROMETHEUS_ACCEPT)
            assert status == 200
            families = openmetrics_samples(body.decode())
            assert (
                families[
                    ("aegis_requests_total", frozenset({"target": "app", "code": "200"}.items()))
                ]
                == answered
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        upstream.terminate()
        upstream.wait(timeout=10)
    assert code == 0


async def test_openmetrics_when_the_scraper_asks_for_it(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "good.sock", "up 1\n")
    client = await aegis()
    assert (await client.get("/good")).status == 200
    response = await client.get("/-/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith(
        "application/openmetrics-text; version=1.0.0"
    )
    text = await response.text()
    assert text.endswith("# EOF\n")
    found = openmetrics_samples(text)
    assert (
        found[("aegis_requests_total", frozenset({"target": "good", "code": "200"}.items()))] == 1
    )
    assert found[("aegis_targets", frozenset())] == 1
    # The same values as the text format gives a scraper that asks for nothing in particular.
    plain = await scrape(client)
    assert value(plain, "aegis_requests_total", target="good", code="200") == 1


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=a",
        "application/openmetrics-text; version=1.x.0",
        "text/plain; version=a",
        "text/plain; version=0.a",
    ],
)
async def test_an_unreadable_version_is_passed_over_not_a_500(
    aegis: AegisFactory, accept: str
) -> None:
    client = await aegis()
    response = await client.get("/-/metrics", headers={"Accept": accept})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    # The ranges beside it still count.
    both = f"{accept}, application/openmetrics-text; version=1.0.0"
    response = await client.get("/-/metrics", headers={"Accept": both})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text; ")
    assert (await response.text()).endswith("# EOF\n")


_MEDIA = st.sampled_from(["application/openmetrics-text", "text/plain", "*/*", "text/*", "x"])
_PARAM = st.tuples(
    st.sampled_from(["version", "escaping", "q", "charset", ""]),
    st.text(alphabet="0123456789.-ax_ ", max_size=8),
)
_RANGE = st.tuples(_MEDIA, st.lists(_PARAM, max_size=3)).map(
    lambda item: ";".join([item[0], *(f"{key}={value}" for key, value in item[1])])
)


@given(st.lists(_RANGE, max_size=4).map(",".join))
def test_any_accept_header_gets_an_exposition(accept: str) -> None:
    from aegis.metrics import _choose_encoder

    registry = CollectorRegistry()
    encoder, content_type = _choose_encoder(accept)
    assert content_type.startswith(("text/plain", "application/openmetrics-text"))
    assert isinstance(encoder(registry), bytes)


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", "text/plain; version=0.0.4"),
        ("text/plain", "text/plain; version=0.0.4"),
        ("application/json", "text/plain; version=0.0.4"),
        ("application/openmetrics-text", "application/openmetrics-text; version=1.0.0"),
        (  # Prometheus 3, which would rather have protobuf
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
            "encoding=delimited;q=0.6,application/openmetrics-text;version=1.0.0;"
            "escaping=allow-utf-8;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4",
            "application/openmetrics-text; version=1.0.0",
        ),
    ],
)
async def test_the_text_format_otherwise(
    aegis: AegisFactory, accept: str, content_type: str
) -> None:
    client = await aegis()
    response = await client.get("/-/metrics", headers={"Accept": accept} if accept else {})
    assert response.headers["Content-Type"].startswith(content_type)
    assert "Accept" in response.headers["Vary"]


async def test_gzip_when_the_scraper_accepts_it(aegis: AegisFactory) -> None:
    client = await aegis()
    raw = await client.get("/-/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert raw.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(await raw.read()).decode()
    assert value(text, "aegis_targets") == 0
    plain = await client.get("/-/metrics", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
