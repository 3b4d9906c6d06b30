"""``aegis check``: the installed command against real Unix-socket upstreams, good, broken and
hostile, and against what a real Prometheus makes of the same pages through Aegis."""

from __future__ import annotations

import asyncio
import grp
import gzip
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aegisrun import AEGIS, Children, child_env, needs_aegis
from aiohttp import web
from prometheusrun import Build, Prometheus, up_by_name

from aegis.cli.exposition import (
    OPENMETRICS,
    TEXT,
    PageError,
    Reading,
    decode,
    media_type,
    parse,
    reading,
)
from conftest import Upstreams

PLAIN = {"Content-Type": "text/plain"}
GOOD = '# HELP a_total A.\n# TYPE a_total counter\na_total 1\nb{x="y"} 2\n'
NO_CAPS = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
needs_setpriv_as_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux), to run without CAP_DAC_OVERRIDE",
)


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.out)
        return document

    def by_name(self) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in self.json()["targets"]}

    def line(self, name: str) -> str:
        found = [line for line in self.out.splitlines() if line.split(" ", 1)[0] == name]
        assert len(found) == 1, self.out
        return found[0]


async def check(*args: str, prefix: tuple[str, ...] = (), within: float = 120.0) -> Run:
    """``aegis check ARGS`` as a child; its upstreams run in this test's event loop."""
    assert AEGIS is not None
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        AEGIS,
        "check",
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"aegis check still running after {within} s") from None
    run = Run(proc.returncode or 0, out.decode(), err.decode())
    assert "Traceback" not in run.err + run.out, run.err
    return run


async def page(
    upstreams: Upstreams, path: Path, body: bytes, headers: dict[str, str], status: int = 200
) -> None:
    """A service answering ``body`` with exactly ``headers`` (and its length)."""
    reason = HTTPStatus(status).phrase
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = f"HTTP/1.1 {status} {reason}\r\n{fields}Content-Length: {len(body)}\r\n\r\n"
    await raw_page(upstreams, path, head.encode() + body)


async def raw_page(upstreams: Upstreams, path: Path, answer: bytes) -> None:
    """A service that reads the request head and sends ``answer`` as it is, then closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    await upstreams.raw(path, handler)


async def page_forever(upstreams: Upstreams, path: Path, body: bytes) -> None:
    """A keep-alive service answering every request with ``body``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(head % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    await upstreams.raw(path, handler)


def stale(path: Path) -> None:
    """A socket file nothing listens on: bound, then closed."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


pytestmark = needs_aegis


# -- each kind of target -------------------------------------------------------------------------


async def test_a_good_target_is_one_ok_line_and_exit_0(upstreams: Upstreams, sockdir: Path) -> None:
    await page(
        upstreams,
        sockdir / "good.sock",
        GOOD.encode(),
        {"Content-Type": "text/plain; version=0.0.4"},
    )
    os.chmod(sockdir / "good.sock", 0o660)
    run = await check("-sockdir", str(sockdir))
    assert run.code == 0, run.out
    header, line = run.out.splitlines()
    assert header.split() == [
        "NAME",
        "SOCKET",
        "OWNER:GROUP",
        "MODE",
        "RESULT",
        "STATUS",
        "CONTENT-TYPE",
        "SAMPLES",
        "TIME",
        "NOTE",
    ]
    owner = f"{_user(os.getuid())}:{_group(os.getgid())}"
    assert re.fullmatch(
        rf"good +{sockdir}/good\.sock +{owner} +0660 +ok +200 +"
        r"text/plain; version=0\.0\.4 +2 +\d+ms",
        line,
    ), line
    good = (await check("-sockdir", str(sockdir), "--output", "json")).by_name()["good"]
    assert good == {
        "name": "good",
        "socket": f"{sockdir}/good.sock",
        "resolved": f"{sockdir}/good.sock",
        "owner": _user(os.getuid()),
        "group": _group(os.getgid()),
        "mode": "0660",
        "result": "ok",
        "reason": "",
        "status": 200,
        "content_type": "text/plain; version=0.0.4",
        "format": "text",
        "parses": True,
        "samples": 2,
        "seconds": good["seconds"],
        "prometheus3": True,
        "prometheus2": True,
    }
    assert 0 < good["seconds"] < 10


async def test_what_prometheus_3_refuses_and_what_prometheus_2_takes(
    upstreams: Upstreams, sockdir: Path
) -> None:
    text = b"a 1\n"
    await page(upstreams, sockdir / "bare.sock", text, {})
    await page(upstreams, sockdir / "empty.sock", text, {"Content-Type": ""})
    await page(upstreams, sockdir / "html.sock", text, {"Content-Type": "text/html"})
    await page(upstreams, sockdir / "odd.sock", text, {"Content-Type": "text/plain; charset"})
    await page(upstreams, sockdir / "upper.sock", text, {"Content-Type": "TEXT/PLAIN;"})
    await page(
        upstreams,
        sockdir / "proto.sock",
        b"\x00",
        {"Content-Type": "application/vnd.google.protobuf"},
    )
    run = await check("-sockdir", str(sockdir), "--output", "json")
    assert run.code == 1
    found = run.by_name()
    for name in ("bare", "empty", "html", "odd"):
        assert found[name]["result"] == "content_type", found[name]
        assert (found[name]["prometheus3"], found[name]["prometheus2"]) == (False, True)
        assert found[name]["samples"] == 1
        assert "fallback_scrape_protocol" in found[name]["reason"]
        assert "Prometheus 2 reads it as text" in found[name]["reason"]
    assert found["bare"]["content_type"] is None
    assert found["empty"]["content_type"] == ""
    assert "no Content-Type" in found["bare"]["reason"]
    assert "unsupported Content-Type text/html" in found["html"]["reason"]
    assert "does not parse" in found["odd"]["reason"]
    assert found["upper"]["result"] == "ok"
    assert found["proto"]["result"] == "ok"
    assert found["proto"]["parses"] is None
    assert "not parsed" in found["proto"]["reason"]
    text_run = await check("-sockdir", str(sockdir))
    assert '""' in text_run.line("empty")
    assert " content_type " in text_run.line("bare")


async def test_an_unparseable_page_fails_in_both(upstreams: Upstreams, sockdir: Path) -> None:
    html = b"<html><body>metrics</body></html>\n"
    await page(upstreams, sockdir / "html.sock", html, PLAIN)
    await page(upstreams, sockdir / "json.sock", b'{"a": 1}', {"Content-Type": "application/json"})
    om = {"Content-Type": "application/openmetrics-text; version=1.0.0"}
    await page(upstreams, sockdir / "noeof.sock", b"a_total 1\n", om)
    await page(upstreams, sockdir / "om.sock", b"# TYPE a counter\na_total 1\n# EOF\n", om)
    await page(upstreams, sockdir / "latin1.sock", b'a{x="\xe9"} 1\n', PLAIN)
    found = (await check("-sockdir", str(sockdir), "--output", "json")).by_name()
    for name in ("html", "json", "noeof", "latin1"):
        assert found[name]["result"] == "parse", found[name]
        assert found[name]["parses"] is False
        assert (found[name]["prometheus3"], found[name]["prometheus2"]) == (False, False)
        assert found[name]["samples"] is None
    assert "Missing # EOF" in found["noeof"]["reason"]
    assert found["noeof"]["format"] == "openmetrics"
    assert "not UTF-8" in found["latin1"]["reason"]
    assert found["json"]["reason"].startswith("Prometheus 3 refuses it: unsupported Content-Type")
    assert found["om"]["result"] == "ok"
    assert found["om"]["samples"] == 1  # OpenMetrics' counter: a_total (no _created given)


async def test_a_status_other_than_200_fails_the_scrape(
    upstreams: Upstreams, sockdir: Path
) -> None:
    await page(upstreams, sockdir / "down.sock", b"down\n", PLAIN, 503)
    await page(upstreams, sockdir / "none.sock", b"", PLAIN, 204)
    found = (await check("-sockdir", str(sockdir), "--output", "json")).by_name()
    assert found["down"]["result"] == "status"
    assert found["down"]["status"] == 503
    assert "503 Service Unavailable" in found["down"]["reason"]
    assert found["none"]["result"] == "status"


async def test_a_gzipped_page_is_read_as_prometheus_reads_it(
    upstreams: Upstreams, sockdir: Path
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        seen.append(request.headers.get("X-Prometheus-Scrape-Timeout-Seconds", ""))
        return web.Response(
            body=gzip.compress(GOOD.encode()),
            headers={"Content-Type": "text/plain; version=0.0.4", "Content-Encoding": "gzip"},
        )

    await upstreams.http(sockdir / "zipped.sock", handler)
    await page(
        upstreams,
        sockdir / "notzip.sock",
        GOOD.encode(),
        {"Content-Type": "text/plain", "Content-Encoding": "gzip"},
    )
    found = (
        await check("-sockdir", str(sockdir), "--output", "json", "--scrape.timeout", "7s")
    ).by_name()
    assert seen == ["gzip", "7"]
    assert found["zipped"]["result"] == "ok"
    assert found["zipped"]["samples"] == 2
    assert found["notzip"]["result"] == "parse"
    assert found["notzip"]["reason"].startswith("gzip:")


async def test_a_stale_socket_is_refused(sockdir: Path) -> None:
    stale(sockdir / "gone.sock")
    run = await check("-sockdir", str(sockdir))
    assert run.code == 1
    line = run.line("gone")
    assert " refused " in line
    assert "nothing listens on the socket" in line


async def test_a_link_shows_where_it_leads(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "svc"
    elsewhere.mkdir()
    await page(upstreams, elsewhere / "metrics.sock", GOOD.encode(), PLAIN)
    (sockdir / "linked.sock").symlink_to(elsewhere / "metrics.sock")
    run = await check("-sockdir", str(sockdir), "--output", "json")
    assert run.code == 0, run.out
    found = run.by_name()
    assert found["linked"]["socket"] == f"{sockdir}/linked.sock"
    assert found["linked"]["resolved"] == str(elsewhere / "metrics.sock")
    text = await check("-sockdir", str(sockdir))
    assert f" {elsewhere}/metrics.sock " in text.line("linked")


async def test_what_aegis_skips_in_the_directory_gets_a_line_saying_why(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    """Not listed on ``/-/sd``, so no scrape ever says why: a dangling link, a file that is no
    socket, a name no request can give. Hidden entries are left alone."""
    await page(upstreams, sockdir / "fine.sock", GOOD.encode(), PLAIN)
    (sockdir / "dangling.sock").symlink_to(tmp_path / "nothing.sock")
    (sockdir / "file.sock").write_text("")
    stale(sockdir / "bad name.sock")
    stale(sockdir / ".hidden.sock")
    (sockdir / "other.txt").write_text("")
    # Whoever may write in the directory names its entries: what a terminal would act on, and
    # bytes that are not UTF-8, are spelled out.
    os.close(os.open(os.fsencode(sockdir) + b"/\x1b]0;owned\x07\xff.sock", os.O_CREAT, 0o600))
    run = await check("-sockdir", str(sockdir), "--output", "json")
    assert run.code == 1
    found = run.by_name()
    assert {name: report["result"] for name, report in found.items()} == {
        "\x1b]0;owned\x07\udcff": "bad_name",
        "bad name": "bad_name",
        "dangling": "unknown",
        "file": "unknown",
        "fine": "ok",
    }
    assert found["dangling"]["reason"] == (
        f"{sockdir}/dangling.sock: no such socket (a link to {tmp_path / 'nothing.sock'})"
    )
    assert found["dangling"]["resolved"] == str(tmp_path / "nothing.sock")
    assert found["file"]["reason"] == f"{sockdir}/file.sock: not a socket"
    assert found["file"]["mode"] == f"{(sockdir / 'file.sock').stat().st_mode & 0o7777:04o}"
    text = await check("-sockdir", str(sockdir))
    assert "\x1b" not in text.out
    assert " bad_name " in text.line("\\x1b]0;owned\\x07\\udcff")


async def test_a_target_that_never_answers_times_out(upstreams: Upstreams, sockdir: Path) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    await upstreams.raw(sockdir / "mute.sock", mute)
    await page(upstreams, sockdir / "quick.sock", GOOD.encode(), PLAIN)
    run = await check("-sockdir", str(sockdir), "--scrape.timeout", "1s", "--output", "json")
    assert run.code == 1
    found = run.by_name()
    assert found["mute"]["result"] == "timeout"
    assert found["mute"]["reason"] == "no complete answer within 1s"
    assert 1 <= found["mute"]["seconds"] < 5
    assert found["quick"]["result"] == "ok"


async def test_explicit_targets_are_checked_with_their_path(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    seen = await upstreams.http(
        tmp_path / "app.sock",
        lambda request: _text_response(GOOD),
        route="/internal/metrics",
    )
    await page(upstreams, tmp_path / "filed.sock", GOOD.encode(), PLAIN)
    (tmp_path / "aegis.yml").write_text(
        f"targets:\n  filed:\n    socket: {tmp_path / 'filed.sock'}\n"
    )
    run = await check(
        *("-sockdir", str(sockdir), "--config.file", str(tmp_path / "aegis.yml")),
        *("--target", f"app={tmp_path / 'app.sock'},path=/internal/metrics"),
        *("--target", f"missing={tmp_path / 'missing.sock'}"),
        "--output",
        "json",
    )
    found = run.by_name()
    assert seen == ["/internal/metrics"]
    assert found["app"]["result"] == "ok"
    assert found["filed"]["result"] == "ok"
    assert found["missing"]["result"] == "unknown"
    assert found["missing"]["reason"] == f"{tmp_path / 'missing.sock'}: no such socket"
    assert run.code == 1


async def test_a_missing_directory_is_said_and_explicit_targets_still_checked(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    await page(upstreams, tmp_path / "app.sock", GOOD.encode(), PLAIN)
    flags = ("-sockdir", str(tmp_path / "nowhere"), "--target", f"app={tmp_path / 'app.sock'}")
    run = await check(*flags)
    assert run.code == 1
    assert run.out.splitlines()[0] == (
        f"socket directory unavailable: {tmp_path / 'nowhere'}: does not exist: its names "
        "cannot be listed, explicit targets are checked"
    )
    assert " ok " in run.line("app")
    document = (await check(*flags, "--output", "json")).json()
    assert document["socket_directory"] == {
        "path": str(tmp_path / "nowhere"),
        "error": f"{tmp_path / 'nowhere'}: does not exist",
    }
    assert document["ok"] is False
    assert [t["result"] for t in document["targets"]] == ["ok"]


async def test_an_empty_directory_is_fine_and_says_so(sockdir: Path) -> None:
    run = await check("-sockdir", str(sockdir))
    assert (run.code, run.out) == (
        0,
        "no targets: no sockets in the directory and no explicit targets\n",
    )
    assert (await check("-sockdir", str(sockdir), "--output", "json")).json()["targets"] == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--nonsense",), "unrecognized arguments: --nonsense"),
        (("--output", "yaml"), "argument --output: invalid choice"),
        (("--scrape.timeout", "10"), "a number needs a unit"),
        (("--scrape.timeout", "0"), "--scrape.timeout must be longer than zero"),
        (("--check.concurrency", "0"), "is not a whole number of at least 1"),
        (("--target", "x=relative.sock"), "is not absolute"),
        (("--config.file", "/nonexistent/aegis.yml"), "/nonexistent/aegis.yml"),
    ],
)
async def test_a_bad_flag_is_exit_2_naming_it(flags: tuple[str, ...], message: str) -> None:
    run = await check(*flags)
    assert run.code == 2
    assert run.out == ""
    assert message in run.err


async def test_the_original_flags_still_serve_a_directory_named_check(
    children: Children, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "check").mkdir()
    monkeypatch.chdir(tmp_path)
    aegis, _ = await children.serve(Path("check"))
    out = await aegis.wait_for_output(" -> ")
    assert f" -> {tmp_path / 'check'}" in out


async def test_ten_thousand_sockets_each_get_their_line(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    """Half of them links to one live service, half stale socket files: every one is looked at
    (a few at a time), and none is lost."""
    await page_forever(upstreams, tmp_path / "live.sock", GOOD.encode())
    for i in range(5000):
        (sockdir / f"link{i:04d}.sock").symlink_to(tmp_path / "live.sock")
        stale(sockdir / f"stale{i:04d}.sock")
    run = await check("-sockdir", str(sockdir), within=600)
    assert run.code == 1
    lines = run.out.splitlines()[1:]
    assert len(lines) == 10000
    results = [line.split()[4] for line in lines]
    assert results == ["ok"] * 5000 + ["refused"] * 5000


# -- permissions -----------------------------------------------------------------------------------


@needs_setpriv_as_root
async def test_a_socket_the_user_may_not_open_is_a_permission_line(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    """Root ignores file modes, so the check runs as root without CAP_DAC_OVERRIDE: then it is
    refused like any user."""
    await page(upstreams, sockdir / "private.sock", GOOD.encode(), PLAIN)
    os.chown(sockdir / "private.sock", 65534, 65534)
    os.chmod(sockdir / "private.sock", 0o600)
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    os.chown(hidden, 65534, 65534)
    await page(upstreams, hidden / "svc.sock", GOOD.encode(), PLAIN)
    (sockdir / "behind.sock").symlink_to(hidden / "svc.sock")
    run = await check("-sockdir", str(sockdir), "--output", "json", prefix=NO_CAPS)
    assert run.code == 1
    assert "running as root" in run.err
    found = run.by_name()
    private = found["private"]
    assert (private["result"], private["mode"]) == ("permission", "0600")
    assert (private["owner"], private["group"]) == (_user(65534), _group(65534))
    assert private["reason"].startswith(
        f"permission denied: {sockdir}/private.sock is {_user(65534)}:{_group(65534)} mode 0600; "
        "aegis check runs as root in groups "
    )
    behind = found["behind"]
    assert behind["result"] == "permission"
    assert behind["owner"] is None
    assert behind["resolved"] == str(hidden / "svc.sock")
    assert f"directory {hidden} is {_user(65534)}:{_group(65534)} mode 0700" in behind["reason"]
    text = await check("-sockdir", str(sockdir), prefix=NO_CAPS)
    assert " permission " in text.line("private")
    assert f" {hidden}/svc.sock " in text.line("behind")


@needs_setpriv_as_root
async def test_an_unreadable_directory_is_said(
    upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    await page(upstreams, sockdir / "svc.sock", GOOD.encode(), PLAIN)
    await page(upstreams, tmp_path / "app.sock", GOOD.encode(), PLAIN)
    os.chmod(sockdir, 0)
    try:
        run = await check(
            "-sockdir", str(sockdir), "--target", f"app={tmp_path / 'app.sock'}", prefix=NO_CAPS
        )
    finally:
        os.chmod(sockdir, 0o755)
    assert run.code == 1
    assert run.out.splitlines()[0].startswith(
        f"socket directory unavailable: {sockdir}: permission denied"
    )
    assert " ok " in run.line("app")


# -- as an attacker ------------------------------------------------------------------------------


async def test_hostile_upstreams_are_lines_never_a_hang_or_a_traceback(
    upstreams: Upstreams, sockdir: Path
) -> None:
    async def endless_page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        try:
            while True:
                writer.write(b"a 1\n" * 4096)
                await writer.drain()
        except ConnectionError:
            pass

    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        try:
            while True:
                writer.write(b"X-Filler: " + b"a" * 1000 + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        try:
            while True:
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass

    await upstreams.raw(sockdir / "endless.sock", endless_page)
    await upstreams.raw(sockdir / "head.sock", endless_head)
    await upstreams.raw(sockdir / "drip.sock", drip)
    await raw_page(upstreams, sockdir / "garbage.sock", os.urandom(4096))
    await raw_page(upstreams, sockdir / "hangup.sock", b"")
    await raw_page(
        upstreams, sockdir / "short.sock", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\na 1\n"
    )
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    zipped = bomb.compress(b"\0" * (64 << 20)) + bomb.flush()
    await raw_page(
        upstreams,
        sockdir / "bomb.sock",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(zipped), zipped),
    )
    # What a terminal would act on, in the parser's message: spelled out, never printed.
    escape = b"a\x1b]0;owned\x07\x1b[2J 1\n"
    await page(upstreams, sockdir / "escape.sock", escape, PLAIN)
    long_line = b"x" * (200 << 10) + b" oops\n"
    await page(upstreams, sockdir / "longline.sock", long_line, PLAIN)
    huge_line = b"x" * (300 << 10) + b" 1\n"
    await page(upstreams, sockdir / "hugeline.sock", huge_line, PLAIN)
    # Lines whose parsing takes time that grows with the square of their length, under the
    # line bound: stopped at the deadline.
    slow_lines = (b'a{x="' + b'\\"' * (120 << 10) + b'"} 1\n') * 40
    await page(upstreams, sockdir / "quadratic.sock", slow_lines, PLAIN)
    flags = ("-sockdir", str(sockdir), "--scrape.timeout", "3s")
    bound = ("--check.max-page-bytes", "12000000")
    found = (await check(*flags, *bound, "--output", "json")).by_name()
    assert {name: t["result"] for name, t in found.items()} == {
        "bomb": "too_large",
        "drip": "timeout",
        "endless": "too_large",
        "escape": "parse",
        "garbage": "protocol",
        "hangup": "reset",
        "head": "too_large",
        "hugeline": "unchecked",
        "longline": "parse",
        "quadratic": "unchecked",
        "short": "truncated",
    }
    assert "once gunzipped" in found["bomb"]["reason"]
    assert "line 1 is over 262144 characters" in found["hugeline"]["reason"]
    assert "out of time" in found["quadratic"]["reason"]
    for name in ("hugeline", "quadratic"):
        assert (found[name]["prometheus3"], found[name]["prometheus2"]) == (None, None)
        assert found[name]["parses"] is None
    run = await check(*flags)  # the default page bound
    assert run.code == 1
    assert "\x1b" not in run.out
    assert "\x07" not in run.out
    assert "\\x1b]0;owned\\x07\\x1b[2J" in run.line("escape")
    assert " parse " in run.line("longline")
    assert len(run.line("longline")) < 600


async def test_hostile_pages_never_make_the_parser_raise() -> None:
    pages = [os.urandom(n) for n in (1, 10, 100, 1000)] + [
        b"a{",
        b'a{x="',
        b"a 1 2 3 4\n",
        b"# TYPE a histogram\na_bucket 1\n",
        b"a NaN\n",
        b"# EOF\n# EOF\n",
        b'a{x="\\"} 1\n',
        b"\xef\xbb\xbfa 1\n",
        b"a 1e999999\n",
    ]
    for body in pages:
        for fmt in (TEXT, OPENMETRICS):
            parsed = parse(body, fmt, time.monotonic() + 10)
            assert parsed.samples >= 0
            assert len(parsed.error) < 300


# -- a real Prometheus agrees --------------------------------------------------------------------


async def test_the_verdict_is_what_each_prometheus_does(
    upstreams: Upstreams,
    sockdir: Path,
    children: Children,
    prometheus: Callable[[str], Prometheus],
    prometheus_build: Build,
) -> None:
    """Each page as a real Prometheus scrapes it through Aegis: ``up`` is 1 exactly where the
    check says this Prometheus's major version takes the page."""
    version = prometheus_build.version()
    major = re.search(r"version (\d+)\.", version)
    assert major is not None, version
    field = {"2": "prometheus2", "3": "prometheus3"}[major.group(1)]
    text = b"a 1\n"
    pages: dict[str, tuple[bytes, dict[str, str]]] = {
        "good": (text, {"Content-Type": "text/plain; version=0.0.4"}),
        "bare": (text, {}),
        "html": (text, {"Content-Type": "text/html"}),
        "odd": (text, {"Content-Type": "text/plain; charset"}),
        "binary": (text, {"Content-Type": "application/octet-stream"}),
        "empty": (text, {"Content-Type": ""}),
        "upper": (text, {"Content-Type": "TEXT/PLAIN;"}),
        "broken": (b"<html>\n", PLAIN),
        "guess": (b"<html>\n", {}),
        "noeof": (b"a_total 1\n", {"Content-Type": "application/openmetrics-text"}),
        "om": (b"a_total 1\n# EOF\n", {"Content-Type": "application/openmetrics-text"}),
    }
    for name, (body, headers) in pages.items():
        await page(upstreams, sockdir / f"{name}.sock", body, headers)
    stale(sockdir / "stale.sock")
    found = (await check("-sockdir", str(sockdir), "--output", "json")).by_name()
    _, port = await children.serve(sockdir)
    scraper = prometheus(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: aegis\n    static_configs:\n"
        + "".join(
            f"      - targets: ['127.0.0.1:{port}']\n"
            f"        labels: {{target: {name}, __metrics_path__: /{name}}}\n"
            for name in found
        )
    )
    want = {f"aegis/{name}": float(report[field]) for name, report in found.items()}
    assert want["aegis/good"] == 1.0
    assert want["aegis/broken"] == 0.0
    async with aiohttp.ClientSession() as session:
        await scraper.wait_for_up(session, lambda result: up_by_name(result) == want, within=60)
        errors = await scraper.last_errors(session)
    if field == "prometheus3":  # and it refuses a Content-Type for the reason the check gives
        said = {
            "no Content-Type": "blank Content-Type",
            "unsupported Content-Type": "unsupported Content-Type",
            "the Content-Type does not parse": "cannot parse Content-Type",
        }
        for name, report in found.items():
            for ours, theirs in said.items():
                if f"Prometheus 3 refuses it: {ours}" in report["reason"]:
                    assert theirs in errors[f"aegis/{name}"], (name, report, errors)
        assert sum(theirs in error for error in errors.values() for theirs in said.values()) == 6


# -- the rules, on their own -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "media"),
    [
        ("text/plain", "text/plain"),
        ("text/plain; version=0.0.4; charset=utf-8", "text/plain"),
        ("  Text/Plain ;version=0.0.4", "text/plain"),
        ("text/plain;", "text/plain"),
        ('text/plain; a="x;y\\"z"', "text/plain"),
        ('text/plain; a=""', "text/plain"),
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "application/openmetrics-text",
        ),
        ("text", "text"),
    ],
)
def test_media_types_go_takes(value: str, media: str) -> None:
    assert media_type(value) == media


@pytest.mark.parametrize(
    "value",
    [
        *("", "/plain", "text/", "text/plain/x", "text/plain;;", "text/plain; charset"),
        *("text/plain; a=1; A=2", 'text/plain; a="x', "text/plain; =x", "text plain"),
        *("tëxt/plain", "text/plain; a=b c"),
    ],
)
def test_media_types_go_refuses(value: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        media_type(value)


def test_readings() -> None:
    assert reading("text/plain; version=0.0.4") == Reading(TEXT, "")
    assert reading("application/openmetrics-text").format == OPENMETRICS
    assert reading("application/openmetrics-text; version").format == TEXT  # as Prometheus 2
    assert reading(None).refusal == "no Content-Type"
    assert reading("application/json").refusal == "unsupported Content-Type application/json"


def test_gzip_is_bounded_and_members_are_joined() -> None:
    assert decode(gzip.compress(b"a 1\n") + gzip.compress(b"b 2\n"), "gzip", 100) == b"a 1\nb 2\n"
    assert decode(b"as it came", "br", 100) == b"as it came"
    assert decode(b"as it came", "GZIP", 100) == b"as it came"  # Prometheus compares exactly
    with pytest.raises(PageError, match="over 100 bytes"):
        decode(gzip.compress(b"x" * 101), "gzip", 100)
    with pytest.raises(PageError, match="cut short"):
        decode(gzip.compress(b"x" * 50)[:-10], "gzip", 100)


# -- helpers -------------------------------------------------------------------------------------


async def _text_response(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/plain")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
