"""``aegis check``: every target looked at once, as the user running it, one line each.

It takes the serving command line as it is (``aegis check`` in front of the unit's own flags):
the targets are what :class:`aegis.targets.Targets` resolves and lists, and each page is fetched
with Aegis's own upstream client (:mod:`aegis.upstream`), so the check sees what a scrape through
Aegis sees. Then it says what Prometheus 3 and 2 would make of the page (:mod:`.exposition`).

Everything is bounded: each target's exchange by ``--scrape.timeout``, and its parsing by the
same time again; its page by ``--check.max-page-bytes``; the targets at once by
``--check.concurrency``, and the pages parsed at once to one (parsing is CPU work under the GIL:
more at once would only take more memory). A target that fails in any way is a line of the
report, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..config import Config, ConfigError
from ..socketinfo import permission_detail, socket_file, whoami
from ..targets import SOCKET_SUFFIX, BadName, DirectoryUnavailable, NoSuchTarget, Targets
from ..upstream import Exchange, UpstreamError, UpstreamPool
from . import exposition, logformat
from .flags import _positive_int, build_parser
from .main import _targets
from .process import raise_fd_limit

__all__ = ["Report", "main"]

DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_PAGE_BYTES = 16 * 1024 * 1024
#: What Prometheus 3 asks for by default (its scrape_protocols without protobuf): upstreams that
#: negotiate answer the check as they answer it.
ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
    "text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)
# Longest text of an upstream's (a reason, a Content-Type) in a report.
_MAX_TEXT = 300


@dataclass(slots=True)
class Report:
    """One target's line; ``--output json`` gives these fields as they are."""

    name: str
    #: The socket path the target names (in the directory, or an explicit target's).
    socket: str
    #: Where its links lead (as far as they can be followed).
    resolved: str | None = None
    #: Its owner, group and mode: None when it cannot be looked at.
    owner: str | None = None
    group: str | None = None
    mode: str | None = None
    #: "ok", or the first thing that fails a scrape: a failure kind as in
    #: ``aegis_upstream_errors_total`` (``permission``, ``refused``, ``timeout``...), or
    #: ``status``, ``content_type``, ``parse``, ``too_large``, ``unchecked`` (a page not parsed
    #: to its end: a line over :data:`.exposition.MAX_LINE`, or out of time).
    result: str = "ok"
    #: Why, for people; "" when there is nothing to say.
    reason: str = ""
    status: int | None = None
    content_type: str | None = None
    #: The parser the page was read with: text, openmetrics, protobuf (not parsed here).
    format: str | None = None
    parses: bool | None = None
    samples: int | None = None
    #: The exchange's time, connection to the page's end (not the parsing).
    seconds: float | None = None
    #: Whether a Prometheus 3 and a Prometheus 2 scrape would succeed; None when the page was
    #: not parsed to its end (result ``unchecked``).
    prometheus3: bool | None = False
    prometheus2: bool | None = False

    def fail(self, result: str, reason: str) -> Report:
        self.result, self.reason = result, reason
        return self


@dataclass(frozen=True, slots=True)
class _Settings:
    timeout: float
    max_page_bytes: int
    concurrency: int


def build_check_parser() -> argparse.ArgumentParser:
    """The serving parser (every flag it takes; those about serving change nothing here) and the
    check's own."""
    parser = build_parser()
    parser.prog = "aegis check"
    parser.description = (
        "Look at every target once, as the user running this, and say for each what a scrape "
        "through Aegis gets and whether Prometheus 3 and 2 would take it. Exit status 0 when "
        "every target is fine, 1 when any is not, 2 for a bad flag. Takes the flags Aegis is "
        "served with: --scrape.timeout bounds each target."
    )
    parser.epilog = None
    check = parser.add_argument_group("check")
    check.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="text columns for people, or json for machines (default: %(default)s)",
    )
    check.add_argument(
        "--check.concurrency",
        dest="check_concurrency",
        metavar="N",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        help="targets looked at at once (default: %(default)s)",
    )
    check.add_argument(
        "--check.max-page-bytes",
        dest="check_max_page_bytes",
        metavar="BYTES",
        type=_positive_int,
        default=DEFAULT_MAX_PAGE_BYTES,
        help="largest page read (gunzipped), past it the target fails (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_check_parser()
    args = parser.parse_args(argv)
    logformat.configure(args.log_level, args.log_format)
    if not args.scrape_timeout > 0:
        parser.error("--scrape.timeout must be longer than zero")
    try:
        config = Config(
            sockdir=Path(args.sockdir),
            targets=_targets(parser, args),
            scrape_timeout=args.scrape_timeout,
        )
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    settings = _Settings(config.scrape_timeout, args.check_max_page_bytes, args.check_concurrency)
    raise_fd_limit()  # a connection per target at once, and a long socket path's descriptor
    if os.geteuid() == 0:
        sys.stderr.write(
            "aegis check: running as root, which file modes do not stop: run it as Aegis's user "
            "(sudo -u aegis aegis check ...) to see what Aegis can reach\n"
        )
    try:
        targets = Targets(config.sockdir, config.targets)
        problem, reports = asyncio.run(check_all(targets, settings))
        if args.output == "json":
            sys.stdout.write(_json(config.sockdir, problem, reports))
        else:
            sys.stdout.write(_text(problem, reports))
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0 if problem is None and all(r.result == "ok" for r in reports) else 1


async def check_all(targets: Targets, settings: _Settings) -> tuple[str | None, list[Report]]:
    """Why the socket directory's names cannot be listed (None when they can), and a report per
    target, by name."""
    names: list[str]
    try:
        listed = targets.names()
        problem = None
    except DirectoryUnavailable as exc:
        names, problem = sorted(targets.explicit), exc.reason
    else:
        names = [*listed, *_unlisted(targets.sockdir, set(listed))]
    pool = UpstreamPool(max_idle_per_socket=0)
    parsing = asyncio.Semaphore(1)
    reports: list[Report] = []
    pending = iter(names)

    async def worker() -> None:
        for name in pending:  # shared: each name is taken by one worker
            reports.append(await _check_one(targets, pool, parsing, settings, name))

    try:
        workers = min(settings.concurrency, len(names))
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        pool.close()
    reports.sort(key=lambda report: report.name)
    return problem, reports


def _unlisted(sockdir: Path, listed: set[str]) -> list[str]:
    """The directory's ``*.sock`` entries that are no target (a dangling link, a link this user
    may not follow, a file that is no socket, a name no request can give): what Aegis skips
    without a word, so each gets a line saying why. Hidden entries are left alone."""
    try:
        with os.scandir(sockdir) as entries:
            files = [entry.name for entry in entries if entry.name.endswith(SOCKET_SUFFIX)]
    except OSError:
        return []  # listed a moment ago: gone since, and said so by each name's line
    stems = (name[: -len(SOCKET_SUFFIX)] for name in files if not name.startswith("."))
    return [stem for stem in stems if stem not in listed]


async def _check_one(
    targets: Targets,
    pool: UpstreamPool,
    parsing: asyncio.Semaphore,
    settings: _Settings,
    name: str,
) -> Report:
    explicit = targets.explicit.get(name)
    socket = (
        str(explicit.socket)
        if explicit is not None
        else os.path.join(targets.sockdir, name + SOCKET_SUFFIX)
    )
    report = Report(name, socket)
    try:
        return await _check(targets, pool, parsing, settings, report)
    except Exception as exc:  # a line, whatever happened
        return report.fail("internal", f"aegis check failed: {exc!r}"[:_MAX_TEXT])


async def _check(
    targets: Targets,
    pool: UpstreamPool,
    parsing: asyncio.Semaphore,
    settings: _Settings,
    report: Report,
) -> Report:
    _describe(report)
    try:
        endpoint = targets.resolve(report.name)
    except BadName as exc:
        return report.fail("bad_name", f"no request can name it: {exc}")
    except NoSuchTarget as exc:
        return report.fail("unknown", str(exc) + _link(report.socket))
    except DirectoryUnavailable as exc:
        return report.fail("directory", f"socket directory unavailable: {exc.reason}")
    except PermissionError as exc:
        detail = permission_detail(str(exc.filename), "aegis check")
        return report.fail("permission", f"permission denied: {detail}")
    except OSError as exc:  # out of descriptors: what the connect would say
        return report.fail("connect", f"cannot connect: {exc.strerror or exc}")
    head = _request_head(endpoint.path, settings.timeout)
    conn: Exchange | None = None
    body: list[bytes] = []
    started = time.perf_counter()
    try:
        async with asyncio.timeout(settings.timeout):
            conn = await pool.send(endpoint.address, endpoint.identity, head, head_only=False)
            size = 0
            while chunk := await conn.read():
                size += len(chunk)
                if size > settings.max_page_bytes:
                    return report.fail(
                        "too_large",
                        f"page over {settings.max_page_bytes} bytes (--check.max-page-bytes)",
                    )
                body.append(chunk)
    except PermissionError:
        detail = permission_detail(endpoint.socket, "aegis check")
        return report.fail("permission", f"permission denied: {detail}")
    except UpstreamError as exc:
        return report.fail(exc.kind, exc.reason)
    except TimeoutError:
        return report.fail("timeout", f"no complete answer within {settings.timeout:g}s")
    finally:
        report.seconds = round(time.perf_counter() - started, 6)
        if conn is not None:
            if conn.finished:
                pool.release(conn)
            else:
                conn.abort()
    assert conn is not None
    report.status = conn.status
    content_type = _field(conn.headers, b"content-type")
    report.content_type = None if content_type is None else content_type[:_MAX_TEXT]
    if conn.status != 200:
        why = conn.reason.decode("latin-1")[:_MAX_TEXT]
        return report.fail("status", f"HTTP status {conn.status} {why}: the scrape fails".strip())
    async with parsing:
        return await asyncio.to_thread(
            _judge, report, content_type, _field(conn.headers, b"content-encoding"), body, settings
        )


def _describe(report: Report) -> None:
    """What the file system shows, whether or not the socket is a target: where a link that
    fails leads is half of why."""
    report.resolved = os.path.realpath(report.socket)
    found = socket_file(report.socket)
    if found is not None:
        report.owner, report.group, report.mode = found.owner, found.group, found.mode


def _judge(
    report: Report,
    content_type: str | None,
    content_encoding: str | None,
    body: list[bytes],
    settings: _Settings,
) -> Report:
    """What Prometheus 3 and 2 make of a 200 page (in a thread: the page is parsed here, within
    the target's timeout once more)."""
    deadline = time.monotonic() + settings.timeout
    reading = exposition.reading(content_type)
    report.format = reading.format
    p3 = f"Prometheus 3 refuses it: {reading.refusal}" if reading.refusal else ""
    if reading.refusal:
        p3 += " (unless the job sets fallback_scrape_protocol)"
    raw = b"".join(body)
    body.clear()  # one copy of the page at a time
    try:
        page = exposition.decode(raw, content_encoding, settings.max_page_bytes)
    except exposition.PageError as exc:
        return report.fail(exc.kind, exc.reason)
    del raw
    if reading.format == exposition.PROTOBUF:
        report.prometheus2 = report.prometheus3 = True
        report.reason = "a protobuf page: not parsed by aegis check"
        return report
    parsed = exposition.parse(page, reading.format, deadline)
    what = exposition.FORMAT_NAMES[reading.format]
    if parsed.unchecked:
        report.prometheus2 = report.prometheus3 = None
        return report.fail(
            "unchecked", f"not known whether it parses as {what}: {parsed.unchecked}"
        )
    report.parses = not parsed.error
    if parsed.error:
        report.samples = None
        p2 = f"it does not parse as {what}: {parsed.error}"
        return report.fail("parse", f"{p3}; Prometheus 2 reads it as text, and {p2}" if p3 else p2)
    report.samples = parsed.samples
    report.prometheus2 = True
    if reading.refusal:
        return report.fail("content_type", f"{p3}; Prometheus 2 reads it as text")
    report.prometheus3 = True
    return report


def _link(path: str) -> str:
    """Where a link points, for a reason: what a dangling link was meant to reach."""
    try:
        return f" (a link to {os.readlink(path)})"
    except OSError:
        return ""


def _request_head(path: str, timeout: float) -> bytes:
    """A GET as Prometheus sends one through Aegis."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        "Host: localhost\r\n"
        f"User-Agent: aegis-check/{__version__}\r\n"
        f"Accept: {ACCEPT}\r\n"
        "Accept-Encoding: gzip\r\n"
        f"X-Prometheus-Scrape-Timeout-Seconds: {timeout:g}\r\n"
        "\r\n"
    ).encode()


def _field(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of a header field, as Go's ``Header.Get`` takes it."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


# -- output ---------------------------------------------------------------------------------------

_COLUMNS = (
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
)
# A column is padded to its longest value up to this; a longer value pushes its line only.
_MAX_WIDTH = 48


def _text(problem: str | None, reports: list[Report]) -> str:
    lines: list[str] = []
    if problem is not None:
        lines.append(
            f"socket directory unavailable: {_printable(problem)}: its names cannot be listed"
            + (", explicit targets are checked" if reports else "")
        )
    if not reports:
        if problem is None:
            lines.append("no targets: no sockets in the directory and no explicit targets")
        return "".join(line + "\n" for line in lines)
    rows = [_COLUMNS, *(_row(report) for report in reports)]
    widths = [min(max(len(row[i]) for row in rows), _MAX_WIDTH) for i in range(len(_COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "".join(line + "\n" for line in lines)


def _row(report: Report) -> tuple[str, ...]:
    owner = f"{report.owner}:{report.group}" if report.owner is not None else "-"
    return (
        _printable(report.name),  # a directory's entry: whoever may write there named it
        _printable(report.resolved or report.socket),
        _printable(owner),
        report.mode or "-",
        report.result,
        "-" if report.status is None else str(report.status),
        "-" if report.content_type is None else _printable(report.content_type) or '""',
        "-" if report.samples is None else str(report.samples),
        "-" if report.seconds is None else _duration(report.seconds),
        _printable(report.reason),
    )


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _printable(text: str) -> str:
    """``text`` with what a terminal would act on (escape sequences, line breaks) spelled out:
    upstreams, links and parsers' messages put what they like in it."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _json(sockdir: Path, problem: str | None, reports: list[Report]) -> str:
    document = {
        "socket_directory": {"path": str(sockdir), "error": problem},
        "user": whoami(),
        "ok": problem is None and all(r.result == "ok" for r in reports),
        "targets": [asdict(report) for report in reports],
    }
    return json.dumps(document, indent=1) + "\n"
