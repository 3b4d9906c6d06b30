"""The README's TLS set-up, run: a real Prometheus with the README's TLS configuration and alert
rules scrapes the installed aegis started with the README's web configuration; then a socket
disappears, and ``up`` behaves as the README says (its series goes, it never turns 0) while the
README's ``AegisTargetGone`` expression names the target."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import trustme
import yaml
from aegisrun import Children, needs_aegis
from prometheusrun import Prometheus, up_is
from readmeblocks import documented_passwords, needs_readme, of_kind, rules

from conftest import Upstreams

pytestmark = [needs_readme, needs_aegis]


def scrape_config(text: str, port: int, files: Path) -> str:
    """The README's configuration made to run here: its host is Aegis's port, its files under
    ``files``, the client certificate added beside each CA as the README says, and intervals
    of a second."""
    text = text.replace("myhost:31337", f"127.0.0.1:{port}")
    text = re.sub(r"/etc/prometheus/([\w.-]+)", lambda m: str(files / m.group(1)), text)
    text = re.sub(
        r"^( +)ca_file: .*$",
        lambda m: (
            f"{m.group(0)}\n{m.group(1)}cert_file: {files / 'scraper.crt'}"
            f"\n{m.group(1)}key_file: {files / 'scraper.key'}"
        ),
        text,
        flags=re.M,
    )
    text = re.sub(r"refresh_interval: \S+", "refresh_interval: 1s", text)
    return "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n" + text


async def test_readme_tls_configuration_scrapes_and_a_vanished_socket_leaves_up(
    tmp_path: Path,
    sockdir: Path,
    upstreams: Upstreams,
    children: Children,
    prometheus: Callable[[str], Prometheus],
) -> None:
    (web_block,) = of_kind("web-config")
    (tls_block,) = [b for b in of_kind("prometheus") if "tls_config" in b.text]
    rule_block = rules()
    web_config = yaml.safe_load(web_block.text)["tls_server_config"]
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("prometheus")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / web_config["cert_file"]))
    server.private_key_pem.write_to_path(str(tmp_path / web_config["key_file"]))
    ca.cert_pem.write_to_path(str(tmp_path / web_config["client_ca_file"]))
    (tmp_path / "web.yml").write_text(web_block.text)
    # What Prometheus reads from /etc/prometheus in the README.
    files = tmp_path / "etc"
    files.mkdir()
    ca.cert_pem.write_to_path(str(files / "aegis-ca.crt"))
    client.cert_chain_pems[0].write_to_path(str(files / "scraper.crt"))
    client.private_key_pem.write_to_path(str(files / "scraper.key"))
    (files / "aegis-password").write_text(documented_passwords(web_block)["prometheus"])
    (tmp_path / rule_block.arg).write_text(rule_block.text)

    for name in ("alpha", "beta"):
        await upstreams.metrics(sockdir / f"{name}.sock", f"{name}_up 1\n")
    aegis, port = await children.serve(sockdir, "--web.config.file", str(tmp_path / "web.yml"))
    scraper = prometheus(scrape_config(tls_block.text, port, files))
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
