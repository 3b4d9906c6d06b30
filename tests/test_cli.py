"""The installed ``aegis`` command, run as a user runs it: flags, help, errors, workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import struct
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
    worker_pids,
)
from aiohttp import web
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
    aegis = children.start(*args, "--workers", "1")
    await aegis.ready("127.0.0.1", port)

    assert await fresh_get(f"http://{hostport}/svc") == (200, b"spelling_value 7\n")
    assert await fresh_get(f"http://{hostport}/absent") == (404, b"no such target\n")
    # The Go original logs "HOSTPORT -> SOCKDIR" at start; ours says the same.
    assert logs_start_line(aegis.output(), hostport, sockdir), aegis.output()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
async def test_ipv6_hostport_in_brackets(children, upstreams, sockdir):
    await upstreams.metrics(sockdir / "svc.sock", "six_value 6\n")
    port = free_port("::1")
    aegis = children.start("-hostport", f"[::1]:{port}", "-sockdir", str(sockdir), "--workers", "1")
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
        (["--workers", "0"], "--workers", "'0'"),
        (["--workers", "two"], "--workers", "two"),
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


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_exits_1_naming_the_address(workers, taken_port):
    done = run("-hostport", f"127.0.0.1:{taken_port}", "--workers", workers)
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_logs_are_logfmt_and_the_start_line_names_the_directory_absolute(tmp_path, taken_port):
    done = run("-hostport", f"127.0.0.1:{taken_port}", "-sockdir", "./run", cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    start = re.fullmatch(
        r"time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d) level=info "
        r'source=cli\.py:\d+ msg="(.*)"',
        lines[0],
    )
    assert start is not None, lines[0]
    assert start.group(2) == f"127.0.0.1:{taken_port} -> {tmp_path / 'run'}"
    assert " level=error source=cli.py:" in lines[1]


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


async def test_with_two_workers_the_parent_lines_are_written_once(children, sockdir):
    aegis, _ = await children.serve(sockdir, "--workers", "2")
    output = await aegis.wait_for_output("2 workers: ")
    assert sum(" -> " in line for line in output.splitlines()) == 1, output
    assert output.count("2 workers: ") == 1, output


async def test_two_workers_share_the_port_and_both_answer(children, upstreams, sockdir):
    # The upstream asks the kernel who is calling (SO_PEERCRED): that is the worker's pid.
    callers: list[int] = []
    creds = struct.Struct("3i")

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        pid, _, _ = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
        callers.append(pid)
        return web.Response(text="shared_value 2\n")

    await upstreams.http(sockdir / "svc.sock", handler)
    port = free_port()
    aegis = children.start(
        "-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir), "--workers", "2"
    )
    await aegis.ready("127.0.0.1", port)
    await aegis.wait_for_output("2 workers: ")
    # The parent is worker 0, and forked one more.
    workers = [aegis.pid, *worker_pids(aegis.pid)]
    assert len(workers) == 2, f"workers: {workers}\n{aegis.output()}"
    assert f"2 workers: {workers[0]} {workers[1]}" in aegis.output()

    # Both workers accept on the one listening socket, and one holding more connections than
    # the other steps back (aegis.accept). A worker the machine leaves asleep for a moment may
    # miss a whole burst of 40, so up to 5 bursts.
    for _ in range(5):
        answers = await asyncio.gather(
            *(fresh_get(f"http://127.0.0.1:{port}/svc") for _ in range(40))
        )
        assert answers == [(200, b"shared_value 2\n")] * 40
        if set(callers) == set(workers):
            break
    assert set(callers) == set(workers)


async def test_with_two_workers_process_metrics_are_the_whole_servers_whoever_answers(
    children, upstreams, sockdir
):
    aegis, port = await children.serve(sockdir, "--workers", "2")
    await aegis.wait_for_output("2 workers: ")
    server = [aegis.pid, *worker_pids(aegis.pid)]
    own = ProcessCollector(pid=lambda: aegis.pid, registry=None).collect()
    started = {m.name: m for m in own}["process_start_time_seconds"].samples[0].value
    answered_by = set()
    # Connections held open side by side: a worker holding more steps back, so both answer
    # (once the forked worker is accepting: it may still be starting, on a busy machine).
    for _ in range(20):
        if answered_by == set(server):
            break
        answered_by |= await metrics_side_by_side(port, server, started)
    assert answered_by == set(server), answered_by


async def metrics_side_by_side(port: int, server: list[int], started: float) -> set[int]:
    """``/-/metrics`` twice on each of 6 connections, checked; which workers answered."""
    answered_by = set()
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
    try:
        for reader, writer in connections * 2:
            writer.write(b"GET /-/metrics HTTP/1.1\r\nHost: aegis\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)[1])
            page = (await reader.readexactly(length)).decode()
            families = {f.name: f for f in text_string_to_metric_families(page)}
            # The first process's is worker 0's (the parent), never the parent's own parent.
            assert families["process_start_time_seconds"].samples[0].value == started
            fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in server)
            assert abs(families["process_open_fds"].samples[0].value - fds) <= 4, (fds, page)
            answered_by.add(holder(port, writer.get_extra_info("sockname")[1], server))
    finally:
        for _, writer in connections:
            writer.close()
    return answered_by


def holder(port: int, client_port: int, pids: list[int]) -> int:
    """Which of ``pids`` holds the server side of the loopback connection from ``client_port``
    to ``port`` (its inode in /proc/net/tcp, then in each process's descriptors)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(end.rpartition(":")[2], 16) for end in fields[1:3])
        if (local, remote) == (port, client_port):
            inode = f"socket:[{fields[9]}]"
            break
    else:
        raise AssertionError(f"no connection from {client_port} to {port}")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == inode:
                    return pid
    raise AssertionError(f"no process of {pids} holds {inode}")


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_started_with_the_standard_streams_closed_it_serves_and_stops_cleanly(
    workers, children, upstreams, sockdir
):
    # Their numbers would go to the listening socket and the event loop; libuv then aborted
    # the process at the stop (exit 134).
    await upstreams.metrics(sockdir / "svc.sock", "closed_value 1\n")
    port = free_port()
    aegis = children.start(
        *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir), "--workers", workers),
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
