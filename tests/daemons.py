"""Real services from Debian's packages (HAProxy, nginx, Debian's nginx exporter, Caddy) on Unix
sockets, for the end-to-end tests that have a real Prometheus scrape them through Aegis.

Each runs in a short directory of its own under /tmp (a socket's path has ~100 bytes), as
``nobody`` when the tests run as root, with its output in a file the failures quote; every wait
is bounded and everything is stopped and removed when the test ends.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httptools

#: (name, labels) -> value as text ("nan" for NaN), so that two pages compare with ==.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], str]


def unprivileged() -> list[str]:
    """The prefix that runs a command as ``nobody``, when the tests run as root (where setpriv
    exists): the services then run as what they are in production, an unprivileged user."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


class Workspace:
    """``root`` (searchable by all) holds ``run`` (the socket directory Aegis serves) and
    ``state`` (the services' own files), both the services' to write in."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="aegis-x-", dir="/tmp"))
        self.root.chmod(0o755)
        self.sockdir = self.root / "run"
        self.state = self.root / "state"
        for directory in (self.sockdir, self.state):
            directory.mkdir(mode=0o755)
            if unprivileged():
                nobody = pwd.getpwnam("nobody")
                os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        self.daemons: list[Daemon] = []

    def start(self, name: str, argv: Sequence[str], **env: str) -> Daemon:
        daemon = Daemon(self.root / f"{name}.log", [*unprivileged(), *argv], env)
        self.daemons.append(daemon)
        return daemon

    async def close(self) -> None:
        for daemon in self.daemons:
            await daemon.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class Daemon:
    """One service in the foreground; stdout and stderr go to ``log``."""

    def __init__(self, log: Path, argv: Sequence[str], env: dict[str, str]) -> None:
        self.log = log
        self.argv = list(argv)
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def listening(self, path: Path, within: float = 30.0) -> None:
        """Until ``path`` accepts a connection."""
        deadline = time.monotonic() + within
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(str(path))
            except OSError:
                if self.popen.poll() is not None:
                    raise AssertionError(f"{self.argv} exited:\n{self.output()}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"{path} not accepting:\n{self.output()}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
        deadline = time.monotonic() + 15
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.popen.kill()
                self.popen.wait(10)
                return
            await asyncio.sleep(0.05)


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""

    def page(self) -> bytes:
        """The body as the service meant it: gzip undone."""
        if self.headers.get("content-encoding") == "gzip":
            return gzip.decompress(self.body)
        return self.body


class Responses:
    """The responses in a stream of HTTP/1.1 bytes, parsed as they arrive (llhttp, as Aegis)."""

    def __init__(self) -> None:
        self.done: list[Response] = []
        self._current = Response(0)
        self._name = b""
        self._parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_begin(self) -> None:
        self._current = Response(0)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self.done.append(self._current)


async def unix_get(path: Path, host: str | None = "localhost", within: float = 10.0) -> Response:
    """One GET /metrics on the socket itself, with ``Host: host`` (``""``: an empty Host, as
    RFC 9112 asks of a request without an authority; None: no Host at all)."""
    head = "GET /metrics HTTP/1.1\r\nConnection: close\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(head.encode() + b"\r\n")
            raw = await reader.read(-1)
        finally:
            writer.close()
    parsed = Responses()
    parsed.feed(raw)
    assert len(parsed.done) == 1, raw[:300]
    return parsed.done[0]


class Tap:
    """A socket at ``listen`` that relays every byte both ways to ``upstream`` unchanged and
    keeps each response it relayed: what a service sent for each scrape, to compare with what
    Prometheus stored for it. Aegis sees the service's own bytes, framing and all."""

    def __init__(self, listen: Path, upstream: Path) -> None:
        self.listen = listen
        self.upstream = upstream
        self.responses: list[Response] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connection, str(self.listen))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        answers = Responses()
        before = len(answers.done)

        def keep(data: bytes) -> None:
            nonlocal before
            answers.feed(data)
            self.responses.extend(answers.done[before:])
            before = len(answers.done)

        async def pump(
            source: asyncio.StreamReader,
            sink: asyncio.StreamWriter,
            seen: object = None,
        ) -> None:
            try:
                while data := await source.read(65536):
                    if seen is not None:
                        keep(data)
                    sink.write(data)
                    await sink.drain()
                if sink.can_write_eof():
                    sink.write_eof()
            except OSError:
                sink.close()

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer, seen=True))
        finally:
            up_writer.close()
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()


def _number(text: str | float) -> str:
    value = float(text)
    return "nan" if math.isnan(value) else repr(value)


def _label(name: str, value: str) -> tuple[str, str]:
    # Prometheus 3 writes a classic histogram's le and a summary's quantile as floats
    # ("1" is stored as "1.0"): compared as numbers.
    return (name, _number(value)) if name in ("le", "quantile") else (name, value)


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def page_samples(page: bytes) -> Samples:
    """Every sample of a page in the text format (0.0.4), named as written: prometheus_client's
    parser would add ``_total`` to a counter's sample that has none, and Prometheus does not."""
    found: Samples = {}
    for line in page.decode().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        sample = _SAMPLE.fullmatch(line.strip())
        assert sample is not None, f"not a sample: {line!r}"
        name, labels_text, value = sample.groups()
        labels = []
        rest = labels_text or ""
        while rest.strip():
            label = _LABEL.match(rest)
            assert label is not None, f"labels not understood: {line!r}"
            text = re.sub(r"\\.", lambda m: _ESCAPES.get(m.group(0), m.group(0)), label.group(2))
            if text:  # to Prometheus, an empty label is no label
                labels.append(_label(label.group(1), text))
            rest = rest[label.end() :]
        key = (name, frozenset(labels))
        assert key not in found, f"sample twice on the page: {line!r}"
        found[key] = _number(value)
    return found


#: The series Prometheus adds to each scrape itself.
SYNTHETIC = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
}


def stored_samples(result: list[dict[str, object]], at: str, target_labels: set[str]) -> Samples:
    """A query's series scraped at ``at`` as page samples: the labels Prometheus adds to the
    target's (``target_labels``) and its own series left out."""
    found: Samples = {}
    for series in result:
        metric = series["metric"]
        value = series["value"]
        assert isinstance(metric, dict)
        assert isinstance(value, list)
        name = metric["__name__"]
        if name in SYNTHETIC or float(value[0]) != float(at):
            continue
        labels = frozenset(
            _label(k, v) for k, v in metric.items() if k != "__name__" and k not in target_labels
        )
        found[name, labels] = _number(value[1])
    return found


def differences(want: Samples, got: Samples, limit: int = 20) -> str:
    """What tells two sets of samples apart, briefly, for a failure message."""
    lines = [
        f"only on the page: {k} = {want[k]}" for k in sorted(want.keys() - got.keys(), key=str)
    ]
    lines += [
        f"only in Prometheus: {k} = {got[k]}" for k in sorted(got.keys() - want.keys(), key=str)
    ]
    lines += [
        f"{k}: page {want[k]}, Prometheus {got[k]}"
        for k in sorted(want.keys() & got.keys(), key=str)
        if want[k] != got[k]
    ]
    return "\n".join(lines[:limit]) + (
        f"\n... {len(lines) - limit} more" if len(lines) > limit else ""
    )
