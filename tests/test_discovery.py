"""The landing page, /-/sd, /-/healthy and /-/ready."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aegis.config import Config, ConfigError
from aegis.targets import Target
from conftest import AegisFactory, Upstreams, raw_http


async def test_health_endpoints_answer_plain_200(aegis: AegisFactory) -> None:
    client = await aegis()
    for path, text in (("/-/healthy", "Aegis is Healthy.\n"), ("/-/ready", "Aegis is Ready.\n")):
        response = await client.get(path)
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.text() == text


async def test_sd_of_an_empty_directory_is_an_empty_list(aegis: AegisFactory) -> None:
    client = await aegis()
    response = await client.get("/-/sd")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.text() == "[]"


async def test_sd_lists_a_socket_created_after_start_on_the_next_request(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "first.sock", "up 1\n")
    client = await aegis()
    port = client.port
    assert [group["labels"]["target"] for group in await (await client.get("/-/sd")).json()] == [
        "first"
    ]
    await upstreams.metrics(sockdir / "second.sock", "up 1\n")
    groups = await (await client.get("/-/sd")).json()
    assert groups == [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {"__metrics_path__": "/first", "target": "first"},
        },
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {"__metrics_path__": "/second", "target": "second"},
        },
    ]


async def test_sd_address_is_the_host_the_client_used(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "app.sock", "up 1\n")
    client = await aegis()
    response = await client.get("/-/sd", headers={"Host": "metrics.example.net:31337"})
    assert (await response.json())[0]["targets"] == ["metrics.example.net:31337"]


async def test_sd_follows_the_external_url(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    await upstreams.metrics(sockdir / "app.sock", "up 1\n")
    elsewhere = tmp_path / "elsewhere.sock"
    await upstreams.metrics(elsewhere, "up 1\n")
    client = await aegis(
        external_url="https://gateway.example.net:8443/aegis/",
        targets={"explicit": Target("explicit", elsewhere)},
    )
    groups = await (await client.get("/-/sd", headers={"Host": "ignored:1"})).json()
    assert groups == [
        {
            "targets": ["gateway.example.net:8443"],
            "labels": {
                "__scheme__": "https",
                "__metrics_path__": f"/aegis/{name}",
                "target": name,
            },
        }
        for name in ("app", "explicit")
    ]


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("ftp://host/", "scheme"),
        ("http:///path", "no host"),
        ("http://user:pw@host/", "only scheme"),
        ("http://host:99999/", "bad port"),
    ],
)
def test_bad_external_urls_are_refused_at_start(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=rf"external_url: .*{complaint}"):
        Config(external_url=url)


async def test_landing_page_links_every_target_and_endpoint(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "node.sock", "up 1\n")
    await upstreams.metrics(sockdir / "my-app.v2.sock", "up 1\n")
    client = await aegis()
    response = await client.get("/", headers={"Accept": "text/html,*/*;q=0.8"})
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert "<title>Aegis</title>" in page
    assert "0.1.0" in page
    assert '<a href="node">node</a>' in page
    assert '<a href="my-app.v2">my-app.v2</a>' in page
    for endpoint in ("-/metrics", "-/sd", "-/healthy", "-/ready"):
        assert f'<a href="{endpoint}">' in page
    # curl's */* gets the page too.
    assert (await client.get("/", headers={"Accept": "*/*"})).content_type == "text/html"


async def test_landing_page_never_shows_a_name_that_could_carry_markup(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    # A socket whose file name is markup is not a valid target name, so it is neither served
    # nor listed; the one valid name is escaped like any text.
    await upstreams.metrics(sockdir / "<script>x.sock", "up 1\n")
    await upstreams.metrics(sockdir / "a&b.sock", "up 1\n")
    await upstreams.metrics(sockdir / "ok.sock", "up 1\n")
    client = await aegis()
    page = await (await client.get("/")).text()
    assert "<script>" not in page
    assert "a&b" not in page
    assert '<a href="ok">ok</a>' in page
    assert (await client.get("/-/sd")).status == 200
    assert [g["labels"]["target"] for g in await (await client.get("/-/sd")).json()] == ["ok"]


async def test_landing_page_in_json_when_asked(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "node.sock", "up 1\n")
    client = await aegis()
    response = await client.get("/", headers={"Accept": "application/json"})
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {
        "version": "0.1.0",
        "targets": [{"name": "node", "path": "/node"}],
        "endpoints": ["/-/metrics", "/-/sd", "/-/healthy", "/-/ready"],
        "socket_directory": {"path": str(sockdir), "error": None},
    }
    # A client that prefers HTML gets HTML even if it would take JSON.
    prefers_html = {"Accept": "application/json;q=0.5, text/html"}
    assert (await client.get("/", headers=prefers_html)).content_type == "text/html"


async def test_reserved_paths_are_never_targets(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    # Even a socket named like a reserved path is never reachable through a target name.
    await upstreams.metrics(sockdir / "-.sock", "up 1\n")
    client = await aegis()
    assert (await client.get("/-")).status == 400
    assert [g["labels"]["target"] for g in await (await client.get("/-/sd")).json()] == []


async def test_sd_without_host_header_still_names_an_address(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "app.sock", "up 1\n")
    client = await aegis()
    raw = await raw_http(client.port, b"GET /-/sd HTTP/1.0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    groups = json.loads(body)
    assert groups[0]["labels"]["target"] == "app"
    assert groups[0]["targets"][0]  # the server's own name, never empty
