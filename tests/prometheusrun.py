"""A real Prometheus server as a child process, for the tests that have one scrape Aegis.

It listens on a free loopback port and stores under the test's ``tmp_path``; waits are async
and bounded, since what it scrapes runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aegisrun import child_env, free_port


@dataclass(frozen=True)
class Build:
    """One build of Prometheus to test against: its ``prometheus`` and ``promtool``, or why
    there is none here (then the tests that need it skip, saying so)."""

    name: str
    prometheus: str | None
    promtool: str | None
    missing: str = ""

    def version(self) -> str:
        """The first line of ``prometheus --version``, e.g. "prometheus, version 3.5.3+ds1 ..."."""
        assert self.prometheus is not None
        done = subprocess.run(
            [self.prometheus, "--version"], capture_output=True, text=True, timeout=30, check=True
        )
        return (done.stdout or done.stderr).splitlines()[0]


#: The variable naming the directory of Prometheus 3's two binaries (.ci/prometheus3 fetches
#: Debian's build of the 3.5 LTS release and prints that directory).
PROMETHEUS3_VARIABLE = "AEGIS_PROMETHEUS3"


def _on_path() -> Build:
    found = shutil.which("prometheus"), shutil.which("promtool")
    missing = (
        ""
        if None not in found
        else ("prometheus and promtool are not on PATH (Debian: apt-get install prometheus)")
    )
    return Build("path", *found, missing)


def _prometheus3() -> Build:
    where = os.environ.get(PROMETHEUS3_VARIABLE, "")
    if not where:
        return Build(
            "v3",
            None,
            None,
            f"{PROMETHEUS3_VARIABLE} is not set: the directory of Prometheus 3's prometheus and "
            "promtool (bash .ci/prometheus3 fetches Debian's 3.5 LTS build and prints it)",
        )
    # Set but wrong is not skipped: the build it names is not there, which must be seen.
    return Build("v3", str(Path(where) / "prometheus"), str(Path(where) / "promtool"))


#: Every build the Prometheus tests run against: the one on PATH (Debian 12's 2.42; nixpkgs'
#: in the Nix build) and Prometheus 3, whose scrapes and configuration differ.
BUILDS = [_on_path(), _prometheus3()]

Series = list[dict[str, Any]]


def up_by_name(result: Series) -> dict[str, float]:
    """``up`` per ``job/target`` (the target label, "" without one), from the query ``up``."""
    return {
        f"{r['metric']['job']}/{r['metric'].get('target', '')}": float(r["value"][1])
        for r in result
    }


def up_is(want: dict[str, float]) -> Callable[[Series], bool]:
    """A ``done`` for :meth:`Prometheus.wait_for_up`: ``up`` is exactly ``want``."""
    return lambda result: up_by_name(result) == want


class Prometheus:
    """One ``prometheus`` child with ``config`` as its config file; output goes to a log file."""

    def __init__(self, tmp_path: Path, config: str, build: Build) -> None:
        assert build.prometheus is not None
        self.build = build
        # The configuration beside the test's files: relative names in it (rule_files) are
        # read from there.
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(config)
        self.api = f"http://127.0.0.1:{free_port()}"
        self.log = tmp_path / "prometheus.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [
                    build.prometheus,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={self.api.removeprefix('http://')}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _check_running(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.output()}")

    async def query(
        self, session: aiohttp.ClientSession, expr: str, at: str | None = None
    ) -> Series:
        """The instant query's result (at the time ``at``, as the API writes times, if given);
        an answer other than success fails the test."""
        url = f"{self.api}/api/v1/query"
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        async with session.get(url, params=params) as response:
            answer = await response.json()
        assert answer["status"] == "success", answer
        result: Series = answer["data"]["result"]
        return result

    async def last_errors(self, session: aiohttp.ClientSession) -> dict[str, str]:
        """Each active target's last scrape error ("" if it was scraped), by ``job/target`` as
        :func:`up_by_name` names them."""
        async with session.get(f"{self.api}/api/v1/targets") as response:
            answer = await response.json()
        assert answer["status"] == "success", answer
        return {
            f"{t['labels']['job']}/{t['labels'].get('target', '')}": t["lastError"]
            for t in answer["data"]["activeTargets"]
        }

    async def wait_for_up(
        self, session: aiohttp.ClientSession, done: Callable[[Series], bool], within: float
    ) -> None:
        """Until ``done`` holds for the ``up`` series, for at most ``within`` seconds."""
        deadline = time.monotonic() + within
        # The API is asked only once Prometheus listens: a client retrying a port from the
        # ephemeral range while nothing listens there can be handed it as its own source port.
        while "Server is ready to receive web requests" not in self.output():
            self._check_running()
            assert time.monotonic() < deadline, (
                f"prometheus not ready in {within} s:\n{self.output()}"
            )
            await asyncio.sleep(0.05)
        seen: object = "nothing yet"
        while True:
            try:
                seen = await self.query(session, "up")
            except (aiohttp.ClientError, ValueError) as exc:  # not answering queries yet
                seen = exc
            else:
                if done(seen):
                    return
            self._check_running()
            assert time.monotonic() < deadline, (
                f"up not as expected within {within} s; last answer: {seen}\n{self.output()}"
            )
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Terminate, wait, kill on timeout."""
        self.popen.terminate()
        deadline = time.monotonic() + 15
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.popen.kill()
                self.popen.wait(10)
                break
            await asyncio.sleep(0.05)
