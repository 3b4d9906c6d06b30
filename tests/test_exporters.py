"""Real exporters from Debian's packages on Unix sockets, scraped through the installed ``aegis``
by a real Prometheus (each build, see prometheusrun.BUILDS): HAProxy's built-in exporter, nginx
(a page it serves, and Debian's nginx exporter reading nginx's stub_status), Caddy's admin API.

What Prometheus stored is compared with the service's own page sample for sample. Their pages
change with every request (counters of the scrapes themselves, memory figures), so each service
is scraped twice: as ``NAME``, its own socket, and as ``NAME-tap``, a socket that relays its
bytes unchanged and keeps each response; a scrape of ``NAME-tap`` must equal, sample for sample,
one page the service sent, and ``NAME`` must have the same series.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest
from aegisrun import Children, needs_aegis
from daemons import (
    Response,
    Samples,
    Tap,
    Workspace,
    differences,
    page_samples,
    stored_samples,
    unix_get,
)
from prometheusrun import Build, Prometheus, Series

# End to end with real processes: deselect with -m 'not slow' for a quick run.
pytestmark = [needs_aegis, pytest.mark.slow]

TIMEOUT = aiohttp.ClientTimeout(total=10)
#: The labels Prometheus gives each sample of a target.
TARGET_LABELS = {"job", "instance"}


def _binary(name: str) -> str | None:
    # Daemons live in sbin, which an unprivileged user's PATH may leave out.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


HAPROXY = _binary("haproxy")
NGINX = _binary("nginx")
NGINX_EXPORTER = _binary("prometheus-nginx-exporter")
CADDY = _binary("caddy")


def needs(binary: str | None, name: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        binary is None, reason=f"{name} is not installed (Debian: apt-get install {package})"
    )


@pytest.fixture
async def workspace() -> AsyncIterator[Workspace]:
    made = Workspace()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def taps() -> AsyncIterator[Callable[[Path, Path], Tap]]:
    started: list[Tap] = []

    def make(listen: Path, upstream: Path) -> Tap:
        started.append(Tap(listen, upstream))
        return started[-1]

    try:
        yield make
    finally:
        for tap in started:
            await tap.close()


def jobs(port: int, *names: str, extra: str = "") -> str:
    """A configuration that scrapes each name through Aegis every second, as job ``name``."""
    return "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n" + "".join(
        f"  - job_name: {name}\n    metrics_path: /{name}\n{extra}"
        f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        for name in names
    )


def up(*names: str) -> Callable[[Series], bool]:
    """A ``done`` for :meth:`Prometheus.wait_for_up`: each job ``names`` has been scraped."""
    return lambda result: {r["metric"]["job"] for r in result if r["value"][1] == "1"} >= {*names}


async def scraped(
    scraper: Prometheus, session: aiohttp.ClientSession, job: str
) -> tuple[str, Samples] | None:
    """The time and samples of ``job``'s newest successful scrape, if it had one."""
    stamps = await scraper.query(session, f'timestamp(up{{job="{job}"}} == 1)')
    if not stamps:
        return None
    at = str(stamps[0]["value"][1])
    result = await scraper.query(session, f'{{job="{job}"}}', at=at)
    return at, stored_samples(result, at, TARGET_LABELS)


async def one_scrape_is_a_page(
    scraper: Prometheus,
    session: aiohttp.ClientSession,
    job: str,
    relayed: list[Response],
    within: float = 60,
) -> Samples:
    """Until a scrape of ``job`` stored exactly the samples of one page the service sent
    through the tap (the newest scrape is compared with every page relayed so far)."""
    deadline = time.monotonic() + within
    last = "no scrape yet"
    while True:
        found = await scraped(scraper, session, job)
        if found is not None:
            at, got = found
            pages = [page_samples(r.page()) for r in relayed if r.status == 200]
            if got in pages:
                counted = await scraper.query(
                    session, f'scrape_samples_scraped{{job="{job}"}}', at=at
                )
                assert float(counted[0]["value"][1]) == len(got), (counted, len(got))
                return got
            if pages:
                closest = min(pages, key=lambda page: len(differences(page, got, limit=10**6)))
                last = f"{len(pages)} pages relayed; the nearest differs:\n" + differences(
                    closest, got
                )
        if time.monotonic() > deadline:
            errors = await scraper.last_errors(session)
            raise AssertionError(f"{job}: no scrape equal to a page: {last}\n{errors}")
        await asyncio.sleep(0.2)


async def same_series(
    scraper: Prometheus, session: aiohttp.ClientSession, job: str, page: Samples, within: float = 60
) -> None:
    """Until ``job`` (the service's own socket) was scraped with the series of ``page``."""
    deadline = time.monotonic() + within
    while (found := await scraped(scraper, session, job)) is None or found[1].keys() != page.keys():
        if time.monotonic() > deadline:
            seen = {} if found is None else found[1]
            errors = await scraper.last_errors(session)
            raise AssertionError(f"{job}:\n{differences(page, seen)}\n{errors}")
        await asyncio.sleep(0.2)


class Logged(Protocol):
    def output(self) -> str: ...


def failure_context(**logs: Logged) -> str:
    return "\n".join(f"{name}:\n{log.output()[-3000:]}" for name, log in logs.items())


@needs(HAPROXY, "haproxy", "haproxy")
async def test_haproxy_exporter_on_a_unix_listener_through_aegis(
    workspace: Workspace,
    taps: Callable[[Path, Path], Tap],
    children: Children,
    prometheus: Callable[[str], Prometheus],
) -> None:
    """HAProxy's built-in exporter, as its documentation sets it up, on ``bind unix@``."""
    assert HAPROXY is not None
    sock = workspace.sockdir / "haproxy.sock"
    config = workspace.root / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\n"
        f"frontend metrics\n  bind unix@{sock}\n"
        "  http-request use-service prometheus-exporter if { path /metrics }\n"
        "  default_backend app\n"
        # A backend and a server that take no traffic: their series are on the page too.
        f"backend app\n  server app1 unix@{workspace.state}/app.sock\n"
    )
    haproxy = workspace.start("haproxy", [HAPROXY, "-db", "-f", str(config)])
    await haproxy.listening(sock)
    tap = taps(workspace.sockdir / "haproxy-tap.sock", sock)
    await tap.start()
    own = await unix_get(sock)
    assert own.status == 200, own
    assert own.headers["content-type"] == "text/plain; version=0.0.4", own
    assert page_samples(own.page()), own.body[:300]

    aegis, port = await children.serve(workspace.sockdir)
    scraper = prometheus(jobs(port, "haproxy", "haproxy-tap"))
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await scraper.wait_for_up(session, up("haproxy", "haproxy-tap"), within=60)
            page = await one_scrape_is_a_page(scraper, session, "haproxy-tap", tap.responses)
            await same_series(scraper, session, "haproxy", page)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n{failure_context(aegis=aegis, prometheus=scraper, haproxy=haproxy)}"
        ) from None
    assert any(name == "haproxy_backend_status" for name, _ in page)
    assert any(name == "haproxy_server_status" for name, _ in page)


NGINX_PAGE = b"""\
# HELP backup_last_success_timestamp_seconds When the nightly backup last succeeded.
# TYPE backup_last_success_timestamp_seconds gauge
backup_last_success_timestamp_seconds 1.7969e+09
# HELP backup_bytes_total Bytes the backups have written.
# TYPE backup_bytes_total counter
backup_bytes_total{volume="home"} 7.3e+10
backup_bytes_total{volume="srv"} 1.2e+09
"""


@needs(NGINX, "nginx", "nginx")
@needs(NGINX_EXPORTER, "prometheus-nginx-exporter", "prometheus-nginx-exporter")
async def test_nginx_and_its_exporter_on_unix_listeners_through_aegis(
    workspace: Workspace,
    taps: Callable[[Path, Path], Tap],
    children: Children,
    prometheus: Callable[[str], Prometheus],
    prometheus_build: Build,
) -> None:
    """nginx has no exporter of its own: Debian's prometheus-nginx-exporter reads its
    stub_status and serves the page, both on Unix sockets (``listen unix:`` and the exporter's
    ``unix:`` address); nginx also serves a page a batch job wrote, as a file. That page has
    the type Debian's configuration gives a file without an extension, application/octet-stream:
    Prometheus 2 reads it; Prometheus 3 refuses it unless the job names a fallback protocol."""
    assert NGINX is not None
    assert NGINX_EXPORTER is not None
    nginx_sock = workspace.sockdir / "nginx.sock"
    exporter_sock = workspace.sockdir / "nginx-exporter.sock"
    www = workspace.root / "www"
    www.mkdir(mode=0o755)
    (www / "metrics").write_bytes(NGINX_PAGE)
    (www / "metrics").chmod(0o644)
    state = workspace.state
    temp = "".join(
        f"  {kind}_temp_path {state}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = workspace.root / "nginx.conf"
    config.write_text(
        f"daemon off;\npid {state}/nginx.pid;\nerror_log stderr notice;\n"
        "events {\n  worker_connections 64;\n}\n"
        "http {\n  include /etc/nginx/mime.types;\n  default_type application/octet-stream;\n"
        f"  access_log off;\n{temp}"
        f"  server {{\n    listen unix:{nginx_sock};\n"
        f"    location = /metrics {{\n      root {www};\n    }}\n"
        "    location = /stub_status {\n      stub_status;\n    }\n  }\n}\n"
    )
    nginx = workspace.start("nginx", [NGINX, "-p", str(state), "-e", "stderr", "-c", str(config)])
    await nginx.listening(nginx_sock)
    exporter = workspace.start(
        "nginx-exporter",
        [
            NGINX_EXPORTER,
            f"-web.listen-address=unix:{exporter_sock}",
            f"-nginx.scrape-uri=unix:{nginx_sock}:/stub_status",
        ],
    )
    await exporter.listening(exporter_sock)
    tap = taps(workspace.sockdir / "nginx-exporter-tap.sock", exporter_sock)
    await tap.start()
    own = await unix_get(nginx_sock)
    assert (own.status, own.headers["content-type"]) == (200, "application/octet-stream"), own
    file_samples = page_samples(own.page())

    aegis, port = await children.serve(workspace.sockdir)
    config_text = jobs(port, "nginx", "nginx-exporter", "nginx-exporter-tap")
    version3 = prometheus_build.version().removeprefix("prometheus, version ").startswith("3.")
    if version3:
        # Prometheus 2 refuses this key in any configuration: a job of its own, for 3 only.
        config_text += (
            "  - job_name: nginx-fallback\n    metrics_path: /nginx\n"
            "    fallback_scrape_protocol: PrometheusText0.0.4\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        )
    scraper = prometheus(config_text)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            readable = "nginx-fallback" if version3 else "nginx"
            exporters = ("nginx-exporter", "nginx-exporter-tap")
            await scraper.wait_for_up(session, up(readable, *exporters), within=60)
            page = await one_scrape_is_a_page(scraper, session, "nginx-exporter-tap", tap.responses)
            await same_series(scraper, session, "nginx-exporter", page)
            found = await scraped(scraper, session, readable)
            assert found is not None
            assert found[1] == file_samples, differences(file_samples, found[1])
            if version3:
                deadline = time.monotonic() + 30
                while not (error := (await scraper.last_errors(session))["nginx/"]):
                    assert time.monotonic() < deadline, "nginx's page never refused"
                    await asyncio.sleep(0.2)
                assert 'unsupported Content-Type "application/octet-stream"' in error, error
                assert await scraper.query(session, 'up{job="nginx"} == 1') == []
    except AssertionError as exc:
        logs = failure_context(aegis=aegis, prometheus=scraper, nginx=nginx, exporter=exporter)
        raise AssertionError(f"{exc}\n{logs}") from None
    assert ("nginx_connections_accepted", frozenset()) in page


@needs(CADDY, "caddy", "caddy")
async def test_caddy_admin_api_on_a_unix_socket_through_aegis(
    workspace: Workspace,
    taps: Callable[[Path, Path], Tap],
    children: Children,
    prometheus: Callable[[str], Prometheus],
) -> None:
    """Caddy's admin API on a Unix socket, as docs/prometheus.md sets it up: its /metrics.

    Aegis sends ``Host: localhost``, as curl --unix-socket and nginx do; Caddy's admin API on a
    Unix socket allows only an empty Host by default (127.0.0.1 and ::1 too from 2.7 on), so
    the documented configuration names localhost among its origins."""
    assert CADDY is not None
    sock = workspace.sockdir / "caddy.sock"
    config = workspace.root / "caddy.json"
    config.write_text(json.dumps({"admin": {"listen": f"unix/{sock}", "origins": ["localhost"]}}))
    home = str(workspace.state)  # Caddy keeps its data and autosaved configuration there
    caddy = workspace.start(
        "caddy",
        [CADDY, "run", "--config", str(config)],
        HOME=home,
        XDG_DATA_HOME=home,
        XDG_CONFIG_HOME=home,
    )
    await caddy.listening(sock)
    tap = taps(workspace.sockdir / "caddy-tap.sock", sock)
    await tap.start()
    # Caddy itself serves its page, to a client that sends the Host Aegis sends.
    own = await unix_get(sock, host="localhost")
    assert own.status == 200, own
    assert page_samples(own.page()), own

    aegis, port = await children.serve(workspace.sockdir)
    scraper = prometheus(jobs(port, "caddy", "caddy-tap"))
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await scraper.wait_for_up(session, up("caddy", "caddy-tap"), within=20)
            page = await one_scrape_is_a_page(scraper, session, "caddy-tap", tap.responses)
            await same_series(scraper, session, "caddy", page)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n{failure_context(aegis=aegis, prometheus=scraper, caddy=caddy)}"
        ) from None
