"""The docs' Prometheus set-ups, run against a real Prometheus (each build in turn).

The TLS pair of docs/operating.md as written: its commands make the certificates, the installed
aegis serves with its web configuration, and Prometheus scrapes with its configuration (client
certificate included) and the alert rules of docs/prometheus.md; then a socket disappears, and
``up`` behaves as the docs say (its series goes, it never turns 0) while ``AegisTargetGone``'s
expression names the target. And the Prometheus 3 block of docs/prometheus.md, which gives one
target ``fallback_scrape_protocol``, against a page without ``Content-Type``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from aegisrun import Children, needs_aegis
from prometheusrun import Build, Prometheus, up_is
from readmeblocks import (
    documented_passwords,
    needs_readme,
    on_page,
    prometheus_major,
    rules,
    the_block,
)
from test_content_types import service

from conftest import Upstreams

# End to end with real processes: deselect with -m 'not slow' for a quick run.
pytestmark = [needs_readme, needs_aegis, pytest.mark.slow]
OPENSSL = shutil.which("openssl")

#: The host the docs' examples name, and the one the tests use instead: the certificates are
#: made for it, and it must resolve here.
DOCS_HOST = "myhost"
TEST_HOST = "localhost"


def runnable(text: str, port: int) -> str:
    """A configuration of the docs made to run here: Aegis on ``port`` of this machine, and
    intervals of a second."""
    text = text.replace(f"{DOCS_HOST}:31337", f"{TEST_HOST}:{port}")
    text = re.sub(r"refresh_interval: \S+", "refresh_interval: 1s", text)
    return "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n" + text


def make_certificates(commands: str, where: Path) -> subprocess.CompletedProcess[str]:
    """The docs' openssl commands, run as a shell runs them, in ``where``."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not on PATH (Debian: openssl)")
async def test_docs_tls_pair_scrapes_and_a_vanished_socket_leaves_up(
    tmp_path: Path,
    sockdir: Path,
    upstreams: Upstreams,
    children: Children,
    prometheus: Callable[[str], Prometheus],
) -> None:
    commands = the_block("certificates", "docs/operating.md")
    web_block = the_block("web-config", "docs/operating.md")
    (tls_block,) = [b for b in on_page("prometheus", "docs/operating.md") if "tls_config" in b.text]
    # The pair is complete (issue 17): the client certificate the web configuration asks for.
    assert "RequireAndVerifyClientCert" in web_block.text
    assert "cert_file" in tls_block.text, tls_block
    assert "key_file" in tls_block.text, tls_block
    rule_block = rules()
    # The certificates, made by the docs' commands for this host.
    certs = tmp_path / "certs"
    certs.mkdir()
    made = make_certificates(commands.text.replace(DOCS_HOST, TEST_HOST), certs)
    assert made.returncode == 0, f"{commands}:\n{made.stdout}{made.stderr}"
    # Aegis's side: the web configuration with the files it names beside it.
    aegis_dir = tmp_path / "aegis"
    aegis_dir.mkdir()
    for name in yaml.safe_load(web_block.text)["tls_server_config"].values():
        if isinstance(name, str) and (certs / name).is_file():
            (aegis_dir / name).write_bytes((certs / name).read_bytes())
    (aegis_dir / "web.yml").write_text(web_block.text)
    # Prometheus's side: what the docs put in /etc/prometheus/aegis/.
    password = documented_passwords(web_block)["prometheus"]
    (certs / "password").write_text(password)
    config = re.sub(r"/etc/prometheus/aegis/", f"{certs}/", tls_block.text)
    assert "/etc/" not in config, config
    (tmp_path / rule_block.arg).write_text(rule_block.text)

    for name in ("alpha", "beta"):
        await upstreams.metrics(sockdir / f"{name}.sock", f"{name}_up 1\n")
    aegis, port = await children.serve(sockdir, "--web.config.file", str(aegis_dir / "web.yml"))
    scraper = prometheus(runnable(config, port))
    gone = yaml.safe_load(rule_block.text)["groups"][0]["rules"][0]
    assert gone["alert"] == "AegisTargetGone"

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            everything = {"aegis/alpha": 1.0, "aegis/beta": 1.0, "aegis-self/": 1.0}
            await scraper.wait_for_up(session, up_is(everything), within=60)
            async with session.get(f"{scraper.api}/api/v1/rules") as response:
                loaded = await response.json()
            names = {r["name"] for g in loaded["data"]["groups"] for r in g["rules"]}
            assert "AegisTargetGone" in names, loaded

            (sockdir / "beta.sock").unlink()
            # beta's service still runs, but its socket file is gone: the target leaves /-/sd
            # and its up series ends; it is never recorded as 0.
            without_beta = {"aegis/alpha": 1.0, "aegis-self/": 1.0}
            await scraper.wait_for_up(session, up_is(without_beta), within=60)
            assert await scraper.query(session, "up == 0") == []
            named = await scraper.query(session, gone["expr"])
            assert [r["metric"].get("target") for r in named] == ["beta"], named
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\naegis:\n{aegis.output()[-3000:]}\nprometheus:\n{scraper.output()[-3000:]}"
        ) from None


async def test_fallback_scrape_protocol_for_one_discovered_target(
    sockdir: Path,
    upstreams: Upstreams,
    children: Children,
    prometheus_build: Build,
    prometheus: Callable[[str], Prometheus],
) -> None:
    """The docs' two jobs over one /-/sd: ``shop`` sends no Content-Type and is scraped by the
    job with ``fallback_scrape_protocol``, under ``job="aegis"``; every other target by the
    first job, as before. Without the fallback, Prometheus 3 fails ``shop``."""
    if prometheus_major(prometheus_build.version()) < 3:
        pytest.skip("a Prometheus 3 configuration: Prometheus 2 refuses the key (test_readme)")
    (block,) = [b for b in on_page("prometheus", "docs/prometheus.md") if b.arg == "3"]
    await upstreams.raw(sockdir / "shop.sock", service(None, b"shop_up 1\n"))
    await upstreams.metrics(sockdir / "node.sock", "node_up 1\n")
    aegis, port = await children.serve(sockdir)
    scraper = prometheus(runnable(block.text, port))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await scraper.wait_for_up(
                session, up_is({"aegis/node": 1.0, "aegis/shop": 1.0}), within=60
            )
            got = await scraper.query(session, "shop_up")
            assert [r["metric"]["job"] for r in got] == ["aegis"], got
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\naegis:\n{aegis.output()[-3000:]}\nprometheus:\n{scraper.output()[-3000:]}"
        ) from None
