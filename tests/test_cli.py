"""The installed ``aegis`` command, run as a user runs it: flags, help, errors, one process."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aegisrun import (
    AEGIS,
    child_env,
    free_port,
    fresh_get,
    has_ipv6_loopback,
    needs_aegis,
)
from prometheus_client import ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from aegis import __version__

pytestmark = needs_aegis


def logs_start_line(output: str, hostport: str, sockdir: object) -> bool:
    """The original's start line, HOSTPORT -> SOCKDIR, is the whole message of one log line."""
    return any(f' msg="{hostport} -> {sockdir}"' in line for line in output.splitlines())


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert AEGIS is not None
    return subprocess.run(
        [AEGIS, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
        cwd=cwd,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on: aegis logs its start line, then fails."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


# Every spelling the Go original (flag package) and its NixOS unit accept.
SPELLINGS = [
    pytest.param(["-hostport", "{hp}", "-sockdir", "{sd}"], id="-flag value"),
    pytest.param(["-hostport={hp}", "-sockdir={sd}"], id="-flag=value"),
    pytest.param(["--hostport", "{hp}", "--sockdir", "{sd}"], id="--flag value"),
    pytest.param(["--hostport={hp}", "--sockdir={sd}"], id="--flag=value"),
]


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_every_flag_spelling_listens_and_serves_the_sockdir(
    spelling, children, upstreams, tmp_path
):
    sockdir = tmp_path / "elsewhere"
    sockdir.mkdir()
    await upstreams.metrics(sockdir / "svc.sock", "spelling_value 7\n")
    port = free_port()
    hostport = f"127.0.0.1:{port}"
    args = [part.format(hp=hostport, sd=sockdir) for part in spelling]
    aegis = children.start(*args)
    await aegis.ready("127.0.0.1", port)

    assert await fresh_get(f"http://{hostport}/svc") == (200, b"spelling_value 7\n")
    assert await fresh_get(f"http://{hostport}/absent") == (404, b"no such target\n")
    # The Go original logs "HOSTPORT -> SOCKDIR" at start; ours says the same.
    assert logs_start_line(aegis.output(), hostport, sockdir), aegis.output()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
async def test_ipv6_hostport_in_brackets(children, upstreams, sockdir):
    await upstreams.metrics(sockdir / "svc.sock", "six_value 6\n")
    port = free_port("::1")
    aegis = children.start("-hostport", f"[::1]:{port}", "-sockdir", str(sockdir))
    await aegis.ready("::1", port)

    assert await fresh_get(f"http://[::1]:{port}/svc") == (200, b"six_value 6\n")
    assert logs_start_line(aegis.output(), f"[::1]:{port}", sockdir), aegis.output()


def test_help_shows_both_defaults():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert "-hostport HOST:PORT" in done.stdout
    assert "-sockdir DIR" in done.stdout
    assert "[::]:31337" in done.stdout
    assert "./run" in done.stdout


def test_python_dash_m_aegis_is_the_same_command():
    done = subprocess.run(
        [sys.executable, "-m", "aegis", "--help"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: aegis ")
    assert "[::]:31337" in done.stdout


@pytest.mark.parametrize(
    ("args", "flag", "value"),
    [
        (["-hostport", "nonsense"], "-hostport", "nonsense"),
        (["--hostport=::1:80"], "-hostport", "::1:80"),
        (["-hostport", "127.0.0.1:99999"], "-hostport", "99999"),
        # The worker model is gone: its flag is unknown like any other.
        (["--workers", "2"], "--workers", "2"),
        (["--target", "bad"], "--target", "bad"),
        (["--target", "../x=/run/x.sock"], "--target", "../x"),
        (["--scrape.timeout", "soon"], "--scrape.timeout", "soon"),
        (["--scrape.timeout", "10"], "--scrape.timeout", "'10'"),
        (["--web.idle-timeout=1.5s"], "--web.idle-timeout", "'1.5s'"),
        (["--log.level", "loud"], "--log.level", "loud"),
        (["--log.format", "text"], "--log.format", "text"),
        (["--web.external-url", "ftp://x/"], "--web.external-url", "ftp://x/"),
        (["--web.external-url=http://h:99999/"], "--web.external-url", "bad port"),
        (["--web.external-url", "http://h/a%20b"], "--web.external-url", "/a%20b"),
        (["--web.route-prefix", "/a?b"], "--web.route-prefix", "/a?b"),
        (["--web.route-prefix=/a/../b"], "--web.route-prefix", "/a/../b"),
        (["--no-such-flag"], "--no-such-flag", ""),
    ],
)
def test_a_bad_flag_value_exits_2_naming_the_flag(args, flag, value):
    done = run(*args)
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("aegis: error: "), done.stderr
    assert flag in error
    assert value in error
    assert done.stdout == ""


def test_a_port_in_use_exits_1_naming_the_address(taken_port):
    done = run("-hostport", f"127.0.0.1:{taken_port}")
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_logs_are_logfmt_and_the_start_line_names_the_directory_absolute(tmp_path, taken_port):
    done = run("-hostport", f"127.0.0.1:{taken_port}", "-sockdir", "./run", cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    start = re.fullmatch(
        r"time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d) level=info "
        r'source=main\.py:\d+ msg="(.*)"',
        lines[0],
    )
    assert start is not None, lines[0]
    assert start.group(2) == f"127.0.0.1:{taken_port} -> {tmp_path / 'run'}"
    assert " level=error source=main.py:" in lines[1]


def test_log_format_json_is_one_object_per_line(taken_port):
    done = run("-hostport", f"127.0.0.1:{taken_port}", "--log.format", "json")
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["level"], list(line)) for line in lines] == [
        ("info", ["time", "level", "source", "msg"]),
        ("error", ["time", "level", "source", "msg"]),
    ]
    assert lines[0]["msg"].startswith(f"127.0.0.1:{taken_port} -> /")


@pytest.mark.parametrize(("level", "shown"), [("error", 1), ("warn", 1), ("warning", 1)])
def test_log_level_hides_what_is_below_it(taken_port, level, shown):
    done = run("-hostport", f"127.0.0.1:{taken_port}", "--log.level", level)
    assert len(done.stderr.splitlines()) == shown, done.stderr
    assert " level=error " in done.stderr


async def test_aegis_is_one_process_whose_metrics_are_its_own(children, upstreams, sockdir):
    await upstreams.metrics(sockdir / "svc.sock", "own_value 1\n")
    aegis, port = await children.serve(sockdir)
    assert await fresh_get(f"http://127.0.0.1:{port}/svc") == (200, b"own_value 1\n")
    assert Path(f"/proc/{aegis.pid}/task/{aegis.pid}/children").read_text().split() == []  # noqa: ASYNC240
    own = ProcessCollector(pid=lambda: aegis.pid, registry=None).collect()
    started = {m.name: m for m in own}["process_start_time_seconds"].samples[0].value
    status, body = await fresh_get(f"http://127.0.0.1:{port}/-/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["process_start_time_seconds"].samples[0].value == started
    fds = len(os.listdir(f"/proc/{aegis.pid}/fd"))
    assert abs(families["process_open_fds"].samples[0].value - fds) <= 4, (fds, body)
    (info,) = families["aegis_build_info"].samples
    assert info.labels["version"] == __version__
    # Go's exporters have no *_created series in the text format, and neither has Aegis.
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]


async def test_started_with_the_standard_streams_closed_it_serves_and_stops_cleanly(
    children, upstreams, sockdir
):
    # Their numbers would go to the listening socket and the event loop; libuv then aborted
    # the process at the stop (exit 134).
    await upstreams.metrics(sockdir / "svc.sock", "closed_value 1\n")
    port = free_port()
    aegis = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir)),
        prefix=["sh", "-c", 'exec "$0" "$@" <&- >&- 2>&-'],
    )
    await aegis.ready("127.0.0.1", port)
    assert await fresh_get(f"http://127.0.0.1:{port}/svc") == (200, b"closed_value 1\n")
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{aegis.pid}/fd/{fd}") == "/dev/null"
    aegis.popen.send_signal(signal.SIGTERM)
    assert await aegis.wait(within=30) == 0


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version_prints_what_exporters_print(flag):
    done = run(flag)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"aegis, version {__version__}"
    fields = dict(line.strip().split(":", 1) for line in lines[1:])
    assert fields["python version"].strip().startswith(platform.python_version() + " ")
    assert fields["aiohttp version"].strip() == aiohttp.__version__
    assert fields["platform"].strip().startswith("linux/")
    assert done.stderr == ""
