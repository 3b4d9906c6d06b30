"""The landing page: every target's socket and last scrape, in HTML and in JSON, and as
Chromium renders it."""

from __future__ import annotations

import asyncio
import calendar
import grp
import json
import logging
import os
import pwd
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from browser import CHROMIUM, MISSING, dump_dom, parse, screenshot
from test_discovery import stale_sockets, stalled
from test_sockdir import until

from aegis.config import Config
from aegis.metrics import MAX_TARGET_LABELS
from aegis.proxy import ANSWERS_KEY, TARGETS_KEY, make_app
from aegis.targets import Target
from conftest import AegisFactory, Upstreams

JSON = {"Accept": "application/json"}
HTML_HEAD = ["Target", "Socket", "Owner", "Group", "Mode", "Last scrape", "Began", "Took"]


def facts(path: Path) -> dict[str, str]:
    """What the page must say of a socket: where it leads, its owner, group and mode."""
    st = os.stat(path)
    return {
        "socket": os.path.realpath(path),
        "owner": pwd.getpwuid(st.st_uid).pw_name,
        "group": grp.getgrgid(st.st_gid).gr_name,
        "mode": f"{st.st_mode & 0o7777:04o}",
    }


def stale(path: Path) -> None:
    """A socket file nobody listens on: a dead service's."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


async def a_little_while_ago(client: Any, names: list[str]) -> dict[str, int]:
    statuses = {}
    for name in names:
        statuses[name] = (await client.get(f"/{name}")).status
    return statuses


async def test_each_target_shows_its_socket_and_its_last_scrape(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    seen = await upstreams.metrics(sockdir / "ok.sock", "up 1\n")
    stale(sockdir / "dead.sock")
    stale(sockdir / "fresh.sock")
    (sockdir / "fresh.sock").chmod(0o660)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    await upstreams.metrics(elsewhere / "app.sock", "up 1\n")
    (sockdir / "linked.sock").symlink_to(elsewhere / "app.sock")
    missing = tmp_path / "missing.sock"
    client = await aegis(targets={"gone": Target("gone", missing)})
    before = time.time()
    assert await a_little_while_ago(client, ["ok", "dead", "gone", "linked", "ok"]) == {
        "ok": 200,
        "dead": 502,
        "gone": 404,
        "linked": 200,
    }
    after = time.time()
    scraped = len(seen)

    response = await client.get("/", headers=JSON)
    assert response.status == 200
    assert response.content_type == "application/json"
    page = await response.json()
    assert len(seen) == scraped, "the page scraped a target"
    assert page["summary"] == {"targets": 5, "up": 2, "down": 2, "never": 1, "not_recorded": 0}
    targets = {target.pop("name"): target for target in page["targets"]}
    assert list(targets) == ["dead", "fresh", "gone", "linked", "ok"]
    last = {name: target.pop("last_scrape") for name, target in targets.items()}
    assert targets == {
        "dead": {"path": "/dead", **facts(sockdir / "dead.sock")},
        "fresh": {"path": "/fresh", **facts(sockdir / "fresh.sock")} | {"mode": "0660"},
        # An explicit target whose socket is not there: its path, and nothing known of it.
        "gone": {
            "path": "/gone",
            "socket": str(missing),
            "owner": None,
            "group": None,
            "mode": None,
        },
        # A link: where it leads.
        "linked": {"path": "/linked", **facts(elsewhere / "app.sock")},
        "ok": {"path": "/ok", **facts(sockdir / "ok.sock")},
    }
    assert targets["linked"]["socket"] == str(elsewhere / "app.sock")
    assert last["fresh"] == {"state": "never"}
    for name, state, status, kind in (
        ("ok", "up", 200, None),
        ("linked", "up", 200, None),
        ("dead", "down", 502, "refused"),
        ("gone", "down", 404, "unknown"),
    ):
        outcome = last[name]
        began = outcome.pop("began")
        assert before - 1 <= parse_time(began) <= after + 1, began
        assert 0 < outcome.pop("seconds") < after - before + 0.01
        assert outcome == {"state": state, "status": status, "kind": kind}, name
    assert page["socket_directory"] == {"path": str(sockdir), "error": None}
    assert page["endpoints"] == ["/-/metrics", "/-/sd", "/-/healthy", "/-/ready"]

    # The HTML page carries the same fields, one row per target.
    html = await (await client.get("/", headers={"Accept": "text/html"})).text()
    assert len(seen) == scraped
    rows = table(html)
    assert rows[0] == HTML_HEAD
    by_name = {row[0]: row[1:] for row in rows[1:]}
    assert list(by_name) == ["dead", "fresh", "gone", "linked", "ok"]
    dead = facts(sockdir / "dead.sock")
    assert by_name["dead"][:5] == [
        dead["socket"],
        dead["owner"],
        dead["group"],
        dead["mode"],
        "502 refused",
    ]
    assert by_name["dead"][5].endswith(" ago)")
    assert by_name["dead"][6].endswith(" ms")
    assert by_name["fresh"][4:] == ["never scraped"]
    assert by_name["gone"][:5] == [str(missing), "unknown", "unknown", "unknown", "404 unknown"]
    assert by_name["ok"][4] == "200"
    assert "5 targets: 2 up, 2 down, 1 never scraped." in html


def parse_time(text: str) -> float:
    """Seconds since the epoch of the page's RFC 3339 UTC time."""
    assert len(text) == len("2026-01-01T00:00:00.000Z"), text
    assert text.endswith("Z"), text
    whole = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    return whole + int(text[20:23]) / 1000


def table(markup: str) -> list[list[str]]:
    """The text of each cell of the page's table, row by row."""
    [found] = parse(markup).all("table")
    return [[cell.text().strip() for cell in row.children] for row in found.all("tr")]


async def test_the_json_is_json_dumps_of_itself_to_the_byte(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "ok.sock", "up 1\n")
    stale(sockdir / "dead.sock")
    stale(sockdir / "never.sock")
    client = await aegis()
    await a_little_while_ago(client, ["ok", "dead"])
    body = await (await client.get("/", headers=JSON)).text()
    assert json.dumps(json.loads(body)) == body


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


async def test_json_only_for_a_client_that_prefers_it(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path
) -> None:
    await upstreams.metrics(sockdir / "node.sock", "up 1\n")
    client = await aegis()
    response = await client.get("/", headers=JSON)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert [target["name"] for target in (await response.json())["targets"]] == ["node"]
    # A client that prefers HTML gets HTML even if it would take JSON.
    prefers_html = {"Accept": "application/json;q=0.5, text/html"}
    assert (await client.get("/", headers=prefers_html)).content_type == "text/html"
    head = await client.head("/", headers=JSON)
    assert head.status == 200
    assert head.content_type == "application/json"


async def test_a_target_past_the_bound_is_not_recorded_and_says_so(
    aegis: AegisFactory, sockdir: Path
) -> None:
    names = stale_sockets(sockdir, MAX_TARGET_LABELS + 20)
    client = await aegis()
    for name in names[: MAX_TARGET_LABELS + 10]:
        assert (await client.get(f"/{name}")).status == 502
    page = await (await client.get("/", headers=JSON)).json()
    states = [target["last_scrape"]["state"] for target in page["targets"]]
    # The first ones asked for are recorded; every other one, asked for or not, may have been.
    assert states == ["down"] * MAX_TARGET_LABELS + ["not_recorded"] * 20
    assert page["summary"] == {
        "targets": MAX_TARGET_LABELS + 20,
        "up": 0,
        "down": MAX_TARGET_LABELS,
        "never": 0,
        "not_recorded": 20,
    }
    html = await (await client.get("/")).text()
    assert html.count(f"not recorded (Aegis records the first {MAX_TARGET_LABELS} targets") == 20
    # A recorded one is still brought up to date.
    stale_name = names[0]
    os.unlink(sockdir / f"{stale_name}.sock")
    assert (await client.get(f"/{stale_name}")).status == 404
    assert (await client.get("/-/metrics")).status == 200


async def test_the_directory_unavailable_leaves_the_explicit_targets_and_says_why(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    await upstreams.metrics(tmp_path / "app.sock", "up 1\n")
    client = await aegis(targets={"app": Target("app", tmp_path / "app.sock")})
    assert (await client.get("/app")).status == 200
    os.rmdir(sockdir)
    page = await (await client.get("/", headers=JSON)).json()
    assert [target["name"] for target in page["targets"]] == ["app"]
    assert page["targets"][0]["last_scrape"]["state"] == "up"
    assert page["socket_directory"] == {"path": str(sockdir), "error": f"{sockdir}: does not exist"}
    html = await (await client.get("/")).text()
    assert f"socket directory unavailable: {sockdir}: does not exist" in html
    assert table(html)[1][:2] == ["app", str(tmp_path / "app.sock")]


async def test_with_ten_thousand_sockets_the_rows_are_built_once_and_no_client_holds_a_copy(
    sockdir: Path, tmp_path: Path
) -> None:
    """Each target's row is built once per catalog and shared; the last scrapes are joined in
    as the answer is sent, so clients that read nothing hold no page of their own."""
    names = stale_sockets(sockdir, 10000)
    app = make_app(Config(sockdir=sockdir))
    answers, targets = app[ANSWERS_KEY], app[TARGETS_KEY]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = tmp_path / "aegis.sock"
    await web.UnixSite(runner, str(listener)).start()
    readers: list[socket.socket] = []

    def never() -> list[bytes]:
        raise AssertionError("the rows were built again")

    try:
        reader, writer = await asyncio.open_unix_connection(str(listener))
        writer.write(
            f"GET /{names[5]} HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.0\r\nHost: a\r\n\r\n".encode()
        )
        answer = await reader.read(-1)
        writer.close()
        page = answer.partition(b"<!DOCTYPE html>")[2]
        assert page.count(b"<tr>") == 10001
        assert page.count(b">never scraped<") == 9999
        assert b"10000 targets: 0 up, 1 down, 9999 never scraped." in page
        assert b"502 refused" in page
        catalog = targets.catalog()
        answers.rows(catalog, False, never)  # kept: not built again
        readers += [await stalled(listener, "/", "aegis") for _ in range(30)]
        await until(lambda: answers.sending == 30, "every client waited for")
        answers.rows(catalog, False, never)
        assert answers.held_bytes == 0  # no whole page is held for them
    finally:
        for sock in readers:
            sock.close()
        await runner.cleanup()


# --- in a real browser ---------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=MISSING)


@needs_chromium
@pytest.mark.slow
async def test_chromium_renders_one_row_per_target_with_nothing_from_elsewhere(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    await upstreams.metrics(sockdir / "ok.sock", "up 1\n")
    stale(sockdir / "dead.sock")
    stale(sockdir / "fresh.sock")
    # A path is text wherever it comes from: markup in it must stay text.
    odd = sockdir.parent / "<b>x&amp;<i>.sock"
    await upstreams.metrics(odd, "up 1\n")
    client = await aegis(targets={"odd": Target("odd", odd)})
    await a_little_while_ago(client, ["ok", "dead", "odd"])
    url = f"http://127.0.0.1:{client.port}/"

    dom = parse(await dump_dom(tmp_path, url))
    [body] = dom.all("body")
    for tag in ("script", "iframe", "img", "object", "embed"):
        assert dom.all(tag) == [], tag
    assert [link.attrs.get("rel") for link in dom.all("link")] == []
    assert body.all("b") == body.all("i") == [], "markup in a socket path became an element"
    [table_element] = body.all("table")
    rows = [[cell.text().strip() for cell in row.children] for row in table_element.all("tr")]
    assert rows[0] == HTML_HEAD
    cells = {row[0]: row[1:] for row in rows[1:]}
    assert list(cells) == ["dead", "fresh", "odd", "ok"]
    assert cells["odd"][0] == str(odd)
    ok = facts(sockdir / "ok.sock")
    assert cells["ok"][:5] == [ok["socket"], ok["owner"], ok["group"], ok["mode"], "200"]
    assert cells["dead"][4] == "502 refused"
    assert cells["fresh"][4] == "never scraped"
    # Every link stays on Aegis: relative, to a target or an endpoint.
    hrefs = [link.attrs["href"] for link in body.all("a")]
    assert hrefs == ["dead", "fresh", "odd", "ok", "-/metrics", "-/sd", "-/healthy", "-/ready"]
    [style] = dom.all("style")
    assert "url(" not in style.text()
    assert "@import" not in style.text()

    shot = await screenshot(tmp_path, url, (1200, 600))
    assert shot.stat().st_size > 10000  # a page, not a blank window


async def test_paths_that_are_not_utf8_are_shown_escaped_never_a_500(
    aegis: AegisFactory, upstreams: Upstreams, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket directory or a socket whose path is not UTF-8 (Python decodes its bytes with
    surrogate escapes): shown with the escapes as text, in every answer that names it."""
    # Aegis's warnings name those paths; pytest-xdist cannot carry them in a test's report
    # (the program's own log format escapes them).
    caplog.set_level(logging.ERROR, logger="aegis")
    directory = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"r\xffun")))
    os.mkdir(directory)
    await upstreams.metrics(directory / "a.sock", "up 1\n")
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"x\xfe.sock")))
    client = await aegis(sockdir=directory, targets={"x": Target("x", odd)})
    assert (await client.get("/a")).status == 200
    html = await (await client.get("/")).text()
    assert "r\\udcffun/a.sock" in html
    assert "x\\udcfe.sock" in html
    page = await (await client.get("/", headers=JSON)).json()
    assert [target["socket"] for target in page["targets"]] == [str(directory / "a.sock"), str(odd)]
    assert (await client.get("/-/sd")).status == 200
    os.unlink(directory / "a.sock")
    os.rmdir(directory)
    assert "socket directory unavailable" in await (await client.get("/")).text()
    gone = await client.get("/-/sd")
    assert gone.status == 503
    assert "r\\udcffun: does not exist" in await gone.text()
