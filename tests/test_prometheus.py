"""A real Prometheus scrapes the installed aegis over TLS with basic auth, listed by hand and
discovered through ``/-/sd``."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme
from aegisrun import Children, needs_aegis
from prometheusrun import Build, Prometheus, up_is

from conftest import Upstreams

# End to end with real processes: deselect with -m 'not slow' for a quick run.
pytestmark = [needs_aegis, pytest.mark.slow]


async def test_prometheus_scrapes_and_discovers_over_tls_with_basic_auth_and_sees_a_new_socket(
    tmp_path: Path,
    sockdir: Path,
    upstreams: Upstreams,
    children: Children,
    prometheus: Callable[[str], Prometheus],
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    await upstreams.metrics(sockdir / "alpha.sock", "alpha_up 1\n")
    aegis, port = await children.serve(sockdir, "--web.config.file", str(tmp_path / "web.yml"))

    def target(name: str) -> str:
        return (
            f"      - targets: ['127.0.0.1:{port}']\n"
            f"        labels: {{target: {name}, __metrics_path__: /{name}}}\n"
        )

    secure = (
        f"    tls_config:\n      ca_file: {tmp_path / 'ca.crt'}\n"
        "    basic_auth:\n      username: prometheus\n      password: s3cret\n"
    )
    # Two jobs: "static" lists both names from the start; "sd" finds them through /-/sd, asked
    # over the same TLS with the same credentials.
    scraper = prometheus(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: static\n    scheme: https\n"
        + secure
        + "    static_configs:\n"
        + target("alpha")
        + target("beta")
        + "  - job_name: sd\n    scheme: https\n"
        + secure
        + "    http_sd_configs:\n"
        + f"      - url: https://127.0.0.1:{port}/-/sd\n        refresh_interval: 1s\n"
        + secure.replace("    ", "        ")
    )

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            # beta's socket does not exist yet: Aegis answers 404, so the static job records
            # it down, and discovery does not list it at all.
            first = {"static/alpha": 1.0, "static/beta": 0.0, "sd/alpha": 1.0}
            await scraper.wait_for_up(session, up_is(first), within=30)
            await upstreams.metrics(sockdir / "beta.sock", "beta_up 1\n")
            everything = {"static/alpha": 1.0, "static/beta": 1.0, "sd/alpha": 1.0, "sd/beta": 1.0}
            await scraper.wait_for_up(session, up_is(everything), within=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\naegis:\n{aegis.output()[-3000:]}") from None


def test_each_build_is_the_prometheus_it_stands_for(prometheus_build: Build) -> None:
    """A variable naming the wrong directory must not pass for a run against Prometheus 3."""
    version = prometheus_build.version()
    assert version.startswith("prometheus, version "), version
    if prometheus_build.name == "v3":
        assert version.removeprefix("prometheus, version ").startswith("3."), version
        assert prometheus_build.promtool is not None
        done = subprocess.run(
            [prometheus_build.promtool, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert done.stdout.startswith("promtool, version 3."), done.stdout


#: The relabelling the documentation shows: a job per user that owns a service's socket.
RELABEL_JOB_FROM_OWNER = """\
    relabel_configs:
      # The job is the user that owns the socket (the service's own user); a target whose
      # socket cannot be looked at keeps the job's name.
      - source_labels: [__meta_aegis_socket_owner]
        regex: (.+)
        target_label: job
      - source_labels: [__meta_aegis_socket_group]
        target_label: socket_group
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="giving sockets to other users needs root")
async def test_prometheus_names_each_job_after_the_user_that_owns_the_socket(
    sockdir: Path,
    upstreams: Upstreams,
    children: Children,
    prometheus: Callable[[str], Prometheus],
) -> None:
    owners = {"alpha": "nobody", "beta": "daemon"}
    for name, owner in owners.items():
        await upstreams.metrics(sockdir / f"{name}.sock", f"{name}_up 1\n")
        user = pwd.getpwnam(owner)
        os.chown(sockdir / f"{name}.sock", user.pw_uid, user.pw_gid)
    groups = {
        name: grp.getgrgid(pwd.getpwnam(owner).pw_gid).gr_name for name, owner in owners.items()
    }
    aegis, port = await children.serve(sockdir)
    scraper = prometheus(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: aegis\n"
        "    http_sd_configs:\n"
        f"      - url: http://127.0.0.1:{port}/-/sd\n        refresh_interval: 1s\n"
        + RELABEL_JOB_FROM_OWNER
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await scraper.wait_for_up(
                session, up_is({"nobody/alpha": 1.0, "daemon/beta": 1.0}), within=30
            )
            for name, owner in owners.items():
                [series] = await scraper.query(session, f"{name}_up")
                assert series["metric"]["job"] == owner
                assert series["metric"]["socket_group"] == groups[name]
    except AssertionError as exc:
        raise AssertionError(f"{exc}\naegis:\n{aegis.output()[-3000:]}") from None
