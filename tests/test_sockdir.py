"""The socket directory as the proxy sees it: broken, odd or deep, through HTTP, in process and
with the real ``aegis`` command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aegisrun import WITHOUT_DAC, Children, free_port, fresh_get, needs_aegis
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheusrun import Prometheus, Series
from test_metrics import samples, scrape, value
from test_targets import bind_anywhere

from aegis import dirwatch
from aegis.metrics import MAX_CACHED_CHILDREN, MAX_TARGET_LABELS, OTHER_TARGETS, ProxyMetrics
from aegis.targets import Target
from conftest import AegisFactory, Upstreams

ServePage = Callable[[socket.socket, str], Awaitable[None]]


@pytest.fixture
async def serve_page() -> AsyncIterator[ServePage]:
    """``await serve_page(bound_socket, text)``: an HTTP service answering ``text`` on a socket
    bound anywhere (a path too long to bind by name included)."""
    runners: list[web.AppRunner] = []

    async def start(sock: socket.socket, text: str) -> None:
        async def page(_: web.Request) -> web.Response:
            return web.Response(text=text)

        app = web.Application()
        app.router.add_get("/metrics", page)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def fast_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirwatch, "INTERVAL", 0.05)


@pytest.fixture
def dir60() -> Iterator[Path]:
    """A directory whose path is exactly 60 characters long."""
    base = Path(tempfile.mkdtemp(prefix="aegis-", dir="/tmp"))
    path = base / ("d" * (60 - len(str(base)) - 1))
    path.mkdir()
    yield path
    shutil.rmtree(base)


async def until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)


async def test_a_long_name_reaches_its_own_socket_never_the_one_a_cut_path_names(
    aegis: AegisFactory, serve_page: ServePage, dir60: Path
) -> None:
    """90 characters in a 60-character directory: 156 bytes, past the 107 of a socket address.
    Decoys sit at every path a cut would leave."""
    name = "n" * 90
    full = str(dir60 / f"{name}.sock")
    for cut in (107, 108):
        await serve_page(bind_anywhere(Path(full[:cut])), "decoy 1\n")
    await serve_page(bind_anywhere(dir60 / f"{name}.sock"), "mine 1\n")
    client = await aegis(sockdir=dir60)
    for _ in range(3):  # fresh, then reused connections
        response = await client.get(f"/{name}")
        assert (response.status, await response.text()) == (200, "mine 1\n")
    sd = await (await client.get("/-/sd")).json()
    assert name in [group["labels"]["target"] for group in sd]


@needs_aegis
async def test_the_real_command_reaches_a_long_name_not_the_decoy(
    serve_page: ServePage, dir60: Path, children: Children
) -> None:
    """The command runs uvloop, which cuts a long socket path where asyncio refuses it."""
    name = "n" * 90
    for cut in (107, 108):  # uvloop 0.23 cuts at 108 bytes, with no terminating NUL
        await serve_page(bind_anywhere(Path(str(dir60 / f"{name}.sock")[:cut])), "decoy 1\n")
    await serve_page(bind_anywhere(dir60 / f"{name}.sock"), "mine 1\n")
    _, port = await children.serve(dir60)
    for _ in range(3):
        assert await fresh_get(f"http://127.0.0.1:{port}/{name}") == (200, b"mine 1\n")


@needs_aegis
async def test_out_of_descriptors_a_socket_that_is_there_is_a_502_never_a_404(
    serve_page: ServePage, dir60: Path, children: Children
) -> None:
    """A long name takes a descriptor of its socket file before the connect: with none left,
    the socket is there all the same, and the answer is what the connect would say (502, kind
    connect, logged), never a quiet 404 "no such target"."""
    name = "n" * 90
    await serve_page(bind_anywhere(dir60 / f"{name}.sock"), "mine 1\n")
    port = free_port()
    child = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(dir60)),
        prefix=("sh", "-c", 'ulimit -n 40 && exec "$@"', "sh"),
    )
    await child.ready("127.0.0.1", port)
    healthy = b"GET /-/healthy HTTP/1.1\r\nHost: a\r\n\r\n"
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    while True:  # connections, each a descriptor in Aegis, until it can accept no more
        assert len(held) < 40, "aegis accepted more connections than it has descriptors"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(healthy)
        try:
            await asyncio.wait_for(reader.readuntil(b"Healthy.\n"), 1.0)
        except TimeoutError:
            break  # left waiting to be accepted
        held.append((reader, writer))
    # Now none is left: the last connection waits to be accepted.
    scrape_reader, scrape_writer = held[0]
    scrape_writer.write(f"GET /{name} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    head = await asyncio.wait_for(scrape_reader.readuntil(b"\r\n\r\n"), 10.0)
    length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
    answer = head + await asyncio.wait_for(scrape_reader.readexactly(length), 10.0)
    writer.close()
    for _, held_writer in held:
        held_writer.close()
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert answer.endswith(b"cannot connect: Too many open files\n"), answer
    status, page = await fresh_get(f"http://127.0.0.1:{port}/-/metrics", within=20.0)
    assert status == 200
    text = page.decode()
    assert value(text, "aegis_requests_total", code="502", target=name) == 1
    assert value(text, "aegis_requests_total", code="404", target="") == 0
    assert value(text, "aegis_upstream_errors_total", kind="connect", target=name) == 1
    assert f"502 {name}: upstream: cannot connect: Too many open files" in child.output()


async def test_an_explicit_target_with_a_long_path_is_reached_too(
    aegis: AegisFactory, serve_page: ServePage, dir60: Path, sockdir: Path
) -> None:
    path = dir60 / ("e" * 80 + ".sock")
    for cut in (107, 108):
        await serve_page(bind_anywhere(Path(str(path)[:cut])), "decoy 1\n")
    await serve_page(bind_anywhere(path), "explicit 1\n")
    client = await aegis(targets={"far": Target("far", path, "/metrics")})
    response = await client.get("/far")
    assert (response.status, await response.text()) == (200, "explicit 1\n")


async def test_odd_entries_are_404_and_never_listed(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    await upstreams.metrics(sockdir / "ok.sock", "ok 1\n")
    (sockdir / "loop.sock").symlink_to("loop.sock")
    (sockdir / "dangling.sock").symlink_to(tmp_path / "nowhere.sock")
    (tmp_path / "a-directory").mkdir()
    (sockdir / "dirlink.sock").symlink_to(tmp_path / "a-directory")
    os.mkfifo(sockdir / "fifo.sock")
    odd = socket.socket(socket.AF_UNIX)
    odd.bind(bytes(sockdir) + b"/odd\xff\x01.sock")
    client = await aegis()
    for name in ("loop", "dangling", "dirlink", "fifo"):
        response = await client.get(f"/{name}")
        assert (response.status, await response.text()) == (404, "no such target\n")
    assert (await client.get("/odd%FF%01")).status == 400
    assert [g["labels"]["target"] for g in await (await client.get("/-/sd")).json()] == ["ok"]
    landing = await (await client.get("/", headers={"Accept": "application/json"})).json()
    assert [target["name"] for target in landing["targets"]] == ["ok"]
    text = await scrape(client)
    assert value(text, "aegis_upstream_errors_total", target="", kind="unknown") == 4
    assert value(text, "aegis_targets") == 1
    odd.close()


@pytest.mark.parametrize("kind", ["missing", "file", "loop"])
async def test_a_broken_directory_fails_sd_shows_on_the_landing_page_and_spares_explicit_targets(
    aegis: AegisFactory, upstreams: Upstreams, tmp_path: Path, kind: str
) -> None:
    sockdir = tmp_path / "broken"
    reason = {"missing": "does not exist", "file": "is not a directory", "loop": "symlink loop"}
    if kind == "file":
        sockdir.write_text("")
    elif kind == "loop":
        sockdir.symlink_to(sockdir)
    await upstreams.metrics(tmp_path / "explicit.sock", "explicit 1\n")
    client = await aegis(
        sockdir=sockdir, targets={"explicit": Target("explicit", tmp_path / "explicit.sock")}
    )
    expected = f"socket directory unavailable: {sockdir}: {reason[kind]}\n"
    response = await client.get("/-/sd")
    assert (response.status, await response.text()) == (503, expected)
    page = await (await client.get("/")).text()
    assert f"socket directory unavailable: {sockdir}: {reason[kind]}" in page
    assert '<a href="explicit">explicit</a>' in page
    assert "no socket in the directory" not in page
    landing = await (await client.get("/", headers={"Accept": "application/json"})).json()
    assert landing["socket_directory"] == {
        "path": str(sockdir),
        "error": f"{sockdir}: {reason[kind]}",
    }
    assert [target["name"] for target in landing["targets"]] == ["explicit"]
    response = await client.get("/svc")
    assert (response.status, await response.text()) == (503, "socket directory unavailable\n")
    response = await client.get("/explicit")
    assert (response.status, await response.text()) == (200, "explicit 1\n")
    text = await scrape(client)
    assert value(text, "aegis_socket_directory_up") == 0
    assert not any(name == "aegis_targets" for name, _ in samples(text))
    assert value(text, "aegis_upstream_errors_total", target="", kind="directory") == 1
    assert value(text, "aegis_requests_total", target="", code="503") == 1


async def test_a_directory_that_appears_later_is_served_and_logged_once_each_way(
    aegis: AegisFactory,
    upstreams: Upstreams,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fast_watch: None,
) -> None:
    sockdir = tmp_path / "later"
    with caplog.at_level(logging.INFO, logger="aegis.sockdir"):
        client = await aegis(sockdir=sockdir)
        assert (await client.get("/-/sd")).status == 503
        sockdir.mkdir()
        await upstreams.metrics(sockdir / "svc.sock", "svc 1\n")
        await until(lambda: "available again" in caplog.text, "the log says it is back")
        response = await client.get("/svc")
        assert (response.status, await response.text()) == (200, "svc 1\n")
        assert (await client.get("/-/sd")).status == 200
        assert value(await scrape(client), "aegis_socket_directory_up") == 1
        sockdir.rename(tmp_path / "moved")
        await until(lambda: caplog.text.count("unavailable") == 2, "the log says it is gone")
        await asyncio.sleep(0.3)  # several more looks at the same state
    lines = [r.getMessage() for r in caplog.records if r.name == "aegis.sockdir"]
    assert lines == [
        f"socket directory unavailable: {sockdir}: does not exist: its names get 503 and "
        "/-/sd answers 503",
        f"socket directory {sockdir} is available again",
        f"socket directory unavailable: {sockdir}: does not exist: its names get 503 and "
        "/-/sd answers 503",
    ]


async def test_a_replaced_directory_is_served_from_the_new_one(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    await upstreams.metrics(sockdir / "svc.sock", "old 1\n")
    client = await aegis()
    assert await (await client.get("/svc")).text() == "old 1\n"
    os.rename(sockdir, tmp_path / "previous")
    os.mkdir(sockdir)
    await upstreams.metrics(sockdir / "svc.sock", "new 1\n")
    assert await (await client.get("/svc")).text() == "new 1\n"


async def test_random_names_against_a_missing_directory_add_no_series(
    aegis: AegisFactory, tmp_path: Path
) -> None:
    client = await aegis(sockdir=tmp_path / "missing")
    names = [uuid.uuid4().hex for _ in range(20000)]
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:
        base = f"http://127.0.0.1:{client.port}"

        async def one(name: str) -> int:
            async with session.get(f"{base}/{name}") as response:
                await response.read()
                return response.status

        for start in range(0, len(names), 500):
            statuses = await asyncio.gather(*map(one, names[start : start + 500]))
            assert set(statuses) == {503}
    text = await scrape(client)
    assert len(text) < 20000
    assert not any(name[:12] in text for name in names)
    assert value(text, "aegis_requests_total", target="", code="503") == 20000


@needs_aegis
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop CAP_DAC_OVERRIDE")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
async def test_an_unreadable_directory_is_logged_once_per_change(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path, children: Children
) -> None:
    """Root ignores file modes, so Aegis runs as root without CAP_DAC_OVERRIDE: then a mode-0000
    directory refuses it like any user."""
    await upstreams.metrics(sockdir / "svc.sock", "svc 1\n")
    await upstreams.metrics(tmp_path / "explicit.sock", "explicit 1\n")
    private = tmp_path / "private"
    private.mkdir(mode=0)
    (sockdir / "linked.sock").symlink_to(private / "svc.sock")
    os.chmod(sockdir, 0)
    port = free_port()
    aegis = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir)),
        *("--target", f"explicit={tmp_path / 'explicit.sock'}"),
        prefix=("setpriv", *WITHOUT_DAC),
    )
    await aegis.ready("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    for _ in range(6):
        assert await fresh_get(f"{url}/-/sd") == (
            503,
            f"socket directory unavailable: {sockdir}: permission denied\n".encode(),
        )
        assert (await fresh_get(f"{url}/svc"))[0] == 503
        assert await fresh_get(f"{url}/explicit") == (200, b"explicit 1\n")
    status, metrics = await fresh_get(f"{url}/-/metrics")
    assert status == 200
    text = metrics.decode()
    assert value(text, "aegis_socket_directory_up") == 0
    assert value(text, "aegis_upstream_errors_total", target="", kind="directory") == 6
    assert 'target="svc"' not in text
    os.chmod(sockdir, 0o755)
    await aegis.wait_for_output("is available again")
    assert await fresh_get(f"{url}/svc") == (200, b"svc 1\n")
    # A link in a searchable directory to where Aegis may not look: that entry's failure.
    assert await fresh_get(f"{url}/linked") == (502, b"permission denied\n")
    os.chmod(sockdir, 0o600)  # readable, not searchable: names can be listed, not reached
    deadline = time.monotonic() + 10
    while aegis.output().count("socket directory unavailable") < 2:
        assert time.monotonic() < deadline, aegis.output()
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.5)  # the directory has been looked at again, more than once
    assert await aegis.stop() == 0
    log = aegis.output()
    assert log.count(f"socket directory unavailable: {sockdir}: permission denied") == 2, log
    assert log.count("is available again") == 1, log
    assert f"directory {private} is root:root mode 0000" in log
    assert "Traceback" not in log


@needs_aegis
async def test_prometheus_keeps_its_targets_while_the_directory_is_gone(
    sockdir: Path,
    tmp_path: Path,
    upstreams: Upstreams,
    children: Children,
    prometheus: Callable[[str], Prometheus],
) -> None:
    """The point of the 503: a real Prometheus keeps the targets it discovered (scraping them,
    and recording them down) instead of dropping them as an empty list would make it."""
    await upstreams.metrics(sockdir / "alpha.sock", "alpha_up 1\n")
    aegis, port = await children.serve(sockdir)
    scraper = prometheus(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: sd\n    http_sd_configs:\n"
        f"      - url: http://127.0.0.1:{port}/-/sd\n        refresh_interval: 1s\n"
    )

    def alpha_is(want: float) -> Callable[[Series], bool]:
        return lambda result: (
            [(r["metric"]["target"], float(r["value"][1])) for r in result] == [("alpha", want)]
        )

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await scraper.wait_for_up(session, alpha_is(1.0), within=30)
            os.rename(sockdir, tmp_path / "away")
            await scraper.wait_for_up(session, alpha_is(0.0), within=30)
            await aegis.wait_for_output("socket directory unavailable")
            deadline = time.monotonic() + 30
            while "returned HTTP status 503" not in scraper.output():
                assert time.monotonic() < deadline, "prometheus never saw /-/sd fail"
                await asyncio.sleep(0.1)
            await asyncio.sleep(3)  # three more refreshes that fail
            assert alpha_is(0.0)(await scraper.query(session, "up"))
            os.rename(tmp_path / "away", sockdir)
            await scraper.wait_for_up(session, alpha_is(1.0), within=30)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\naegis:\n{aegis.output()[-3000:]}\nprometheus:\n{scraper.output()[-3000:]}"
        ) from None


def test_label_children_cached_per_target_stay_bounded() -> None:
    """The per-target lookup caches in front of the series do not grow with every name ever
    seen: a dropped child is found again, not duplicated."""
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, lambda: 0)
    names = [f"gone-{i % MAX_TARGET_LABELS}-{i}" for i in range(MAX_CACHED_CHILDREN + 10)]
    for name in names:
        metrics.request(name, 200)
        metrics.upstream(name, 0.01)
        metrics.error(name, "refused")
    caches = (metrics._request_children, metrics._duration_children, metrics._error_children)
    assert all(0 < len(cache) <= MAX_CACHED_CHILDREN for cache in caches)

    def requests(target: str) -> float | None:
        return registry.get_sample_value("aegis_requests_total", {"target": target, "code": "200"})

    assert requests(names[0]) == 1
    metrics.request(names[0], 200)
    assert requests(names[0]) == 2


def test_target_label_values_are_bounded_and_the_rest_counted_together(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ten thousand stale sockets each asked for once, or services that come back under new
    names for months: each name that got a label keeps its series for the life of the process,
    so only so many get one."""
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, lambda: 0)
    names = [f"svc-{i}" for i in range(MAX_TARGET_LABELS + 500)]
    with caplog.at_level(logging.WARNING, logger="aegis.metrics"):
        for _ in range(2):
            for name in names:
                metrics.request(name, 502)
                metrics.upstream(name, 0.01)
                metrics.error(name, "refused")
    metrics.request("", 404)  # a name that matched nothing is not one of them
    text = generate_latest(registry).decode()
    labelled = {
        sample.labels["target"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "aegis_requests_total"
    }
    # "" comes first: it was never one of the bounded values.
    assert labelled == {"", OTHER_TARGETS, *names[: MAX_TARGET_LABELS - 1]}
    assert value(text, "aegis_requests_total", target=names[0], code="502") == 2
    others = 2 * (len(names) - MAX_TARGET_LABELS + 1)
    assert value(text, "aegis_requests_total", target=OTHER_TARGETS, code="502") == others
    assert (
        value(text, "aegis_upstream_errors_total", target=OTHER_TARGETS, kind="refused") == others
    )
    assert value(text, "aegis_upstream_duration_seconds_count", target=OTHER_TARGETS) == others
    assert value(text, "aegis_requests_total", target="", code="404") == 1
    warnings = [r for r in caplog.records if r.name == "aegis.metrics"]
    assert len(warnings) == 1  # said once, not once per request
    assert OTHER_TARGETS in warnings[0].getMessage()


@needs_aegis
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop CAP_DAC_OVERRIDE")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
async def test_a_listable_unsearchable_directory_of_links_fails_discovery(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path, children: Children
) -> None:
    """Links are told apart by the listing alone, without the search permission their stat
    needs: an empty list would make Prometheus drop every target."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    await upstreams.metrics(elsewhere / "svc.sock", "svc 1\n")
    (sockdir / "svc.sock").symlink_to(elsewhere / "svc.sock")
    port = free_port()
    aegis = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir)),
        prefix=("setpriv", *WITHOUT_DAC),
    )
    await aegis.ready("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    status, listed = await fresh_get(f"{url}/-/sd")
    assert (status, [group["labels"]["target"] for group in json.loads(listed)]) == (200, ["svc"])
    os.chmod(sockdir, 0o444)
    assert await fresh_get(f"{url}/-/sd") == (
        503,
        f"socket directory unavailable: {sockdir}: permission denied\n".encode(),
    )
    status, metrics = await fresh_get(f"{url}/-/metrics")
    assert value(metrics.decode(), "aegis_socket_directory_up") == 0
    assert "aegis_targets " not in metrics.decode()
    assert (await fresh_get(f"{url}/svc"))[0] == 503
    os.chmod(sockdir, 0o111)  # searchable, not listable: what it names is reached, no list
    assert (await fresh_get(f"{url}/-/sd"))[0] == 503
    assert await fresh_get(f"{url}/svc") == (200, b"svc 1\n")
    os.chmod(sockdir, 0o755)
    assert (await fresh_get(f"{url}/-/sd"))[0] == 200
    assert await aegis.stop() == 0


async def _answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Each request on the connection: a one-line page."""
    while await reader.readuntil(b"\r\n\r\n"):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok 1\n")
        await writer.drain()


@needs_aegis
async def test_past_the_label_bound_each_target_keeps_one_label(
    upstreams: Upstreams, sockdir: Path, children: Children
) -> None:
    """Past the bound, a target's counts stay whole: a target has its own label or "*", never
    some of each, and the bound is said once."""
    names = [f"t{i:03d}" for i in range(MAX_TARGET_LABELS + 40)]
    for name in names:
        await upstreams.raw(sockdir / f"{name}.sock", _answer_ok)
    aegis, port = await children.serve(sockdir)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3):
        for name in names:
            assert (await fresh_get(f"{url}/{name}")) == (200, b"ok 1\n")
    status, metrics = await fresh_get(f"{url}/-/metrics")
    assert status == 200
    text = metrics.decode()
    counts = {
        sample.labels["target"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "aegis_requests_total" and sample.labels["code"] == "200"
    }
    assert len(counts) == MAX_TARGET_LABELS  # 255 names and "*" ("" has had no 200)
    assert set(counts.values()) - {3.0} == {3.0 * (len(names) - MAX_TARGET_LABELS + 1)}
    assert counts[OTHER_TARGETS] == 3.0 * (len(names) - MAX_TARGET_LABELS + 1)
    assert sum(counts.values()) == 3 * len(names)
    assert await aegis.stop() == 0
    assert aegis.output().count("more targets than the metrics label") == 1, aegis.output()


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory under /tmp that any user may traverse (pytest's own is root's, mode 0700)."""
    base = Path(tempfile.mkdtemp(prefix="aegis-links-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def link(path: Path, to: Path, uid: int) -> None:
    path.symlink_to(to)
    os.lchown(path, uid, -1)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give links other owners")
async def test_only_links_of_the_directorys_owner_or_aegiss_user_are_followed(
    aegis: AegisFactory,
    serve_page: ServePage,
    sockdir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As fs.protected_symlinks does for sticky directories: a link a group member made would
    reach any socket Aegis can open. Here Aegis and the directory's owner are root."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    await serve_page(bind_anywhere(private / "secret.sock"), "secret 1\n")
    link(sockdir / "evil.sock", private / "secret.sock", 4321)
    link(sockdir / "chain.sock", Path("evil.sock"), 0)  # root's link to the member's one
    link(sockdir / "dot.sock", Path("./chain.sock"), 0)
    link(sockdir / "good.sock", private / "secret.sock", 0)
    client = await aegis(targets={"explicit": Target("explicit", sockdir / "evil.sock")})
    with caplog.at_level(logging.INFO, logger="aegis.sockdir"):
        for _ in range(3):
            for name in ("evil", "chain", "dot"):
                response = await client.get(f"/{name}")
                assert (response.status, await response.text()) == (404, "no such target\n")
            listed = [g["labels"]["target"] for g in await (await client.get("/-/sd")).json()]
            assert listed == ["explicit", "good"]
            page = await (await client.get("/")).text()
            assert "evil" not in page
            assert "chain" not in page
    response = await client.get("/good")
    assert (response.status, await response.text()) == (200, "secret 1\n")
    # The operator's explicit target is the operator's, wherever it leads.
    response = await client.get("/explicit")
    assert (response.status, await response.text()) == (200, "secret 1\n")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1, lines  # once for that link, however often it was met
    assert f"link {sockdir / 'evil.sock'}" in lines[0]
    assert "is owned by uid 4321" in lines[0]


SETPRIV = shutil.which("setpriv")
AEGIS_UID, WITHIN_GID, MEMBER_UID = 1600, 1700, 1701


def as_user(uid: int, gid: int, *groups: int) -> tuple[str, ...]:
    assert SETPRIV is not None
    extra = ",".join(map(str, groups))
    return (
        SETPRIV,
        f"--reuid={uid}",
        f"--regid={gid}",
        f"--groups={extra}" if extra else "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    )


@needs_aegis
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run as other users")
@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv (util-linux)")
async def test_a_group_member_cannot_reach_aegiss_private_socket_through_a_link(
    serve_page: ServePage, open_base: Path, children: Children
) -> None:
    """The NixOS module's layout: the directory is 3770 root:within, Aegis runs as its own user
    in group within, and a member of within links to a 0600 socket of Aegis's user, which the
    member cannot open itself. Each link is made by its user, through the kernel."""
    sockdir = open_base / "run"
    sockdir.mkdir()
    os.chown(sockdir, 0, WITHIN_GID)
    os.chmod(sockdir, 0o3770)
    private = open_base / "private"
    private.mkdir(mode=0o755)
    secret = private / "secret.sock"
    await serve_page(bind_anywhere(secret), "secret 1\n")
    os.chown(secret, AEGIS_UID, AEGIS_UID)
    os.chmod(secret, 0o600)
    member = as_user(MEMBER_UID, WITHIN_GID)
    for who, name in ((member, "evil"), (as_user(AEGIS_UID, AEGIS_UID, WITHIN_GID), "mine")):
        made = await asyncio.create_subprocess_exec(
            *who, "ln", "-s", str(secret), str(sockdir / f"{name}.sock")
        )
        assert await made.wait() == 0
    (sockdir / "root.sock").symlink_to(secret)
    assert (sockdir / "evil.sock").lstat().st_uid == MEMBER_UID
    # The member itself cannot open the socket.
    probe = await asyncio.create_subprocess_exec(
        *member,
        sys.executable,
        "-c",
        f"import socket; socket.socket(socket.AF_UNIX).connect({str(secret)!r})",
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await probe.wait() != 0
    port = free_port()
    child = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir)),
        prefix=as_user(AEGIS_UID, AEGIS_UID, WITHIN_GID),
    )
    await child.ready("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    for _ in range(4):
        assert await fresh_get(f"{url}/evil") == (404, b"no such target\n")
        assert await fresh_get(f"{url}/mine") == (200, b"secret 1\n")
        assert await fresh_get(f"{url}/root") == (200, b"secret 1\n")
        status, listed = await fresh_get(f"{url}/-/sd")
        assert status == 200
        assert [g["labels"]["target"] for g in json.loads(listed)] == ["mine", "root"]
    assert await child.stop() == 0
    log = child.output()
    # Once, however often it was met.
    assert log.count(f"link {sockdir / 'evil.sock'} is owned by uid {MEMBER_UID}") == 1, log
    assert log.count("is owned by uid") == 1, log
    assert "Traceback" not in log
