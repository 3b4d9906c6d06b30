"""A real Prometheus scrapes the installed aegis over TLS with basic auth, listed by hand and
discovered through ``/-/sd``."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme
from aegisrun import Children, free_port, needs_aegis

from conftest import Upstreams

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    needs_aegis,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus is not installed (Debian: apt-get install prometheus)",
    ),
]


async def up_by_name(api: str) -> dict[str, float]:
    """``up`` per job and target name, as Prometheus last recorded it."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api}/api/v1/query", params={"query": "up"}) as resp,
    ):
        if resp.status != 200:
            return {}
        body = json.loads(await resp.text())
    return {
        f"{r['metric']['job']}/{r['metric']['target']}": float(r["value"][1])
        for r in body["data"]["result"]
    }


def start_prometheus(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    assert PROMETHEUS is not None
    with (tmp_path / "prometheus.log").open("wb") as log:
        return subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def wait_for_up(
    api: str, want: dict[str, float], prometheus: subprocess.Popen[bytes]
) -> None:
    last: dict[str, float] = {}
    for _ in range(300):  # 30 s at most: Prometheus scrapes every second
        try:
            last = await up_by_name(api)
        except aiohttp.ClientError:
            last = {}
        if last == want:
            return
        assert prometheus.poll() is None, "prometheus exited"
        await asyncio.sleep(0.1)
    raise AssertionError(f"up is {last}, expected {want}")


async def test_prometheus_scrapes_and_discovers_over_tls_with_basic_auth_and_sees_a_new_socket(
    tmp_path: Path, sockdir: Path, upstreams: Upstreams, children: Children
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
    port = free_port()
    aegis = children.start(
        "-hostport",
        f"127.0.0.1:{port}",
        "-sockdir",
        str(sockdir),
        "--web.config.file",
        str(tmp_path / "web.yml"),
    )
    await aegis.ready("127.0.0.1", port)

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
    (tmp_path / "prometheus.yml").write_text(
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
    api_port = free_port()
    prometheus = start_prometheus(tmp_path, api_port)
    api = f"http://127.0.0.1:{api_port}"
    try:
        # beta's socket does not exist yet: Aegis answers 404, so the static job records it
        # down, and discovery does not list it at all.
        await wait_for_up(
            api, {"static/alpha": 1.0, "static/beta": 0.0, "sd/alpha": 1.0}, prometheus
        )
        await upstreams.metrics(sockdir / "beta.sock", "beta_up 1\n")
        everything_up = {"static/alpha": 1.0, "static/beta": 1.0, "sd/alpha": 1.0, "sd/beta": 1.0}
        await wait_for_up(api, everything_up, prometheus)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nprometheus:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
            f"\naegis:\n{aegis.output()[-3000:]}"
        ) from None
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(10)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait(5)
