"""The installed ``aegis`` command as a child process, for tests that need the real thing.

Waits are async and bounded: the upstreams the child talks to run in the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest


def _installed_aegis() -> str | None:
    """The ``aegis`` installed with the interpreter running the tests (a virtualenv's, whose bin
    may not be on PATH), else the one on PATH (the Nix build puts the package's bin there)."""
    beside = Path(sys.executable).parent / "aegis"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("aegis")


AEGIS = _installed_aegis()
needs_aegis = pytest.mark.skipif(
    AEGIS is None, reason="the aegis executable is not installed (pip install -e './pkgs/aegis')"
)

# setpriv's arguments for root without the capabilities that ignore file modes, so that a mode
# refuses it like any user. Both sets: root's exec takes the inheritable set into the permitted
# one, and systemd-nspawn, unlike a login shell, hands its payload a full inheritable set.
WITHOUT_DAC = (
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
)


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child: it runs the installed package as installed, never a
    source tree put on PYTHONPATH."""
    env = dict(os.environ)
    env.update(extra)
    return env


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's range for outgoing connections: a client that retries a
    port in that range before the server listens can be handed it as its own source port and
    connect to itself, which then blocks the server's bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ephemeral = _ephemeral_ports()
    candidates = [port for port in range(10000, 30000) if port not in ephemeral]
    for port in random.sample(candidates, 200):
        with socket.socket(family) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


async def fresh_get(
    url: str, within: float = 30.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One GET on a fresh connection."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=within)
        ) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, await response.read()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class Aegis:
    """One ``aegis`` child; output goes to a file the failure messages quote."""

    def __init__(
        self, tmp_path: Path, args: Sequence[str], prefix: Sequence[str], pass_fds: Sequence[int]
    ) -> None:
        self.log = tmp_path / f"aegis-{time.monotonic_ns()}.log"
        assert AEGIS is not None
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [*prefix, AEGIS, *args],
                pass_fds=pass_fds,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self, host: str | None, port: int | str, within: float = 15.0) -> None:
        """Until the listener accepts (``host`` None: ``port`` is a Unix socket path)."""
        deadline = time.monotonic() + within
        while True:
            try:
                if host is None:
                    _, writer = await asyncio.open_unix_connection(str(port))
                else:
                    _, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                if self.popen.poll() is not None:
                    raise AssertionError(f"aegis exited early:\n{self.output()}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"not listening:\n{self.output()}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def wait_for_output(self, text: str, within: float = 15.0) -> str:
        """Until ``text`` is in the output, e.g. the start line's " -> "."""
        deadline = time.monotonic() + within
        while text not in (out := self.output()):
            if self.popen.poll() is not None:
                raise AssertionError(f"aegis exited before logging {text!r}:\n{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"aegis did not log {text!r} within {within} s:\n{out}")
            await asyncio.sleep(0.05)
        return out

    async def wait(self, within: float = 15.0) -> int:
        deadline = time.monotonic() + within
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"aegis still running after {within} s:\n{self.output()}")
            await asyncio.sleep(0.05)
        return code

    async def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            return await self.wait()
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait(5)


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid``, from /proc (no CONFIG_PROC_CHILDREN needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it.
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return sorted(found)


class Children:
    """Every aegis a test started, stopped when it ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Aegis] = []

    def start(self, *args: str, prefix: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> Aegis:
        """``prefix`` runs before the command (a wrapper that gets it as its first argument)."""
        child = Aegis(self.tmp_path, args, prefix, pass_fds)
        self.started.append(child)
        return child

    async def serve(self, sockdir: Path, *flags: str) -> tuple[Aegis, int]:
        """An aegis for ``sockdir`` on a free loopback port, once that port accepts."""
        port = free_port()
        child = self.start("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir), *flags)
        await child.ready("127.0.0.1", port)
        return child, port

    async def close(self) -> None:
        for child in self.started:
            await child.stop()
