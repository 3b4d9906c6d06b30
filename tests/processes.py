"""Helpers for tests that drive programs from outside: free ports, child processes, waiting.

Everything that waits is async and bounded, because the upstreams these programs talk to run in
the test's own event loop: a blocking wait would starve them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

#: The installed command; tests that need it skip when it is absent.
AEGIS = shutil.which("aegis")
SKIP_NO_AEGIS = "the aegis executable is not on PATH (pip install -e './pkgs/aegis')"

# The package in this checkout. The editable install may point at another checkout, so the
# installed command is run with this one first on its path: the code under test is this code.
_PACKAGE_DIR = Path(__file__).resolve().parents[1] / "pkgs" / "aegis"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, below the kernel's ephemeral range.

    A client that retries a port inside that range while nothing listens there can be given the
    same port as its own source and connect to itself; below the range that cannot happen.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    high = _ephemeral_low() - 1
    low = min(20000, high - 1000)
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} between {low} and {high}")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class Process:
    """A child whose stdout and stderr go to one file, read back with :meth:`output`."""

    def __init__(self, argv: Sequence[str], log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    async def wait(self, within: float) -> int:
        """The exit status; fails the test, showing the output, if it runs past ``within`` s."""
        deadline = time.monotonic() + within
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.argv[0]} still running after {within} s; output:\n{self.output()}"
                )
            await asyncio.sleep(0.05)
        return code

    async def wait_for_output(self, text: str, within: float = 20.0) -> str:
        deadline = time.monotonic() + within
        while text not in (out := self.output()):
            if self.popen.poll() is not None:
                raise AssertionError(f"exited {self.popen.returncode} before {text!r}:\n{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {within} s; output:\n{out}")
            await asyncio.sleep(0.05)
        return out

    async def stop(self, within: float = 10.0) -> None:
        """Terminate, wait, kill on timeout: nothing started by a test outlives it."""
        # Workers are listed before the parent goes (then they are no longer its children) and
        # killed only if the same command still holds the pid, should the parent have been killed.
        workers = {pid: _cmdline(pid) for pid in children(self.pid)}
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                await self.wait(within)
            except AssertionError:
                self.popen.kill()
                self.popen.wait(within)
        for pid, cmdline in workers.items():
            if cmdline and _cmdline(pid) == cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class Processes:
    """Starts children for one test and stops every one of them when it ends."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._started: list[Process] = []

    def start(self, argv: Sequence[str]) -> Process:
        log_path = self._tmp_path / f"{Path(argv[0]).name}-{len(self._started)}.log"
        process = Process(argv, log_path)
        self._started.append(process)
        return process

    def aegis(self, *args: str) -> Process:
        assert AEGIS is not None, SKIP_NO_AEGIS
        return self.start([AEGIS, *args])

    async def close(self) -> None:
        for process in reversed(self._started):
            await process.stop()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc: no CONFIG_PROC_CHILDREN needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


async def wait_listening(host: str, port: int, process: Process, within: float = 20.0) -> None:
    """Until ``host:port`` accepts connections (the process is bound), or fail with its output."""
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if process.popen.poll() is not None:
                raise AssertionError(
                    f"exited {process.popen.returncode} before listening:\n{process.output()}"
                ) from None
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{host}:{port} not listening after {within} s:\n{process.output()}"
                ) from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
