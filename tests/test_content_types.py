"""What each build of Prometheus does with the pages Aegis serves: its own ``/-/metrics``, the
targets of ``/-/sd``, and services' pages relayed with their ``Content-Type`` as the service
sent it (none at all included). Prometheus 2 reads a page of any type, or none, as the text
format; Prometheus 3 refuses a missing or unknown type unless the job names
``fallback_scrape_protocol``, a key Prometheus 2 refuses in its configuration. Aegis passes the
header on, so a service scrapes through it as it would directly: the docs must say so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aegisrun import Children, needs_aegis
from prometheusrun import Build, Prometheus, up_by_name

from conftest import RawHandler, Upstreams

# End to end with real processes: deselect with -m 'not slow' for a quick run.
pytestmark = [needs_aegis, pytest.mark.slow]

PAGE = b"# TYPE svc_value gauge\nsvc_value 1\n"
#: service name -> the Content-Type it sends (None: no header at all) and its page.
SERVICES: dict[str, tuple[bytes | None, bytes]] = {
    "text": (b"text/plain; version=0.0.4; charset=utf-8", PAGE),
    "plain": (b"text/plain", PAGE),
    "openmetrics": (
        b"application/openmetrics-text; version=1.0.0; charset=utf-8",
        PAGE + b"# EOF\n",
    ),
    "untyped": (None, PAGE),
    "binary": (b"application/octet-stream", PAGE),
}
#: What Prometheus 3 refuses without a fallback protocol.
REFUSED_BY_3 = {"untyped", "binary"}


def service(content_type: bytes | None, page: bytes) -> RawHandler:
    """A service answering each request on a connection with exactly these headers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(page)
                if content_type is not None:
                    head += b"Content-Type: " + content_type + b"\r\n"
                writer.write(head + b"\r\n" + page)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


async def test_each_page_type_under_each_prometheus(
    sockdir: Path,
    upstreams: Upstreams,
    children: Children,
    prometheus: Callable[[str], Prometheus],
    prometheus_build: Build,
) -> None:
    for name, (content_type, page) in SERVICES.items():
        await upstreams.raw(sockdir / f"{name}.sock", service(content_type, page))
    aegis, port = await children.serve(sockdir)
    version3 = prometheus_build.version().removeprefix("prometheus, version ").startswith("3.")
    target = f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    fallback = "    fallback_scrape_protocol: PrometheusText0.0.4\n"
    config = "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
    for name in SERVICES:
        config += f"  - job_name: {name}\n    metrics_path: /{name}\n{target}"
        if version3:  # Prometheus 2 refuses the key in any job
            config += (
                f"  - job_name: {name}-fallback\n    metrics_path: /{name}\n{fallback}{target}"
            )
    sd = (
        f"    http_sd_configs:\n      - url: http://127.0.0.1:{port}/-/sd\n"
        "        refresh_interval: 1s\n"
    )
    config += f"  - job_name: self\n    metrics_path: /-/metrics\n{target}  - job_name: sd\n{sd}"
    if version3:
        config += f"  - job_name: sd-fallback\n{fallback}{sd}"
    scraper = prometheus(config)

    # Every target of every job, up or not, by its up series: the job, and the service's name
    # for those /-/sd found.
    want = {f"{name}/": 0.0 if version3 and name in REFUSED_BY_3 else 1.0 for name in SERVICES}
    want["self/"] = 1.0
    want.update(
        {f"sd/{name}": 0.0 if version3 and name in REFUSED_BY_3 else 1.0 for name in SERVICES}
    )
    if version3:
        want.update({f"{name}-fallback/": 1.0 for name in SERVICES})
        want.update({f"sd-fallback/{name}": 1.0 for name in SERVICES})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await scraper.wait_for_up(session, lambda r: up_by_name(r) == want, within=60)
            errors = await scraper.last_errors(session)
            values = await scraper.query(session, "svc_value")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\naegis:\n{aegis.output()[-3000:]}") from None
    refused = {job: error for job, error in errors.items() if error}
    if version3:
        static = {f"{name}/" for name in REFUSED_BY_3}
        assert set(refused) == static | {f"sd/{name}" for name in REFUSED_BY_3}, errors
        for job in ("untyped/", "sd/untyped"):
            assert "blank Content-Type" in refused[job], refused
        for job in ("binary/", "sd/binary"):
            assert 'unsupported Content-Type "application/octet-stream"' in refused[job], refused
        assert all("fallback_scrape_protocol" in error for error in refused.values()), refused
    else:
        assert refused == {}, errors
    # What was read is the page, whatever the type it came with.
    read = sorted(v["metric"]["job"] + "/" + v["metric"].get("target", "") for v in values)
    assert read == sorted(k for k, v in want.items() if v == 1.0 and not k.startswith("self/"))
    assert {v["value"][1] for v in values} == {"1"}
