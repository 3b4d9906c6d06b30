"""The landing page ``/``: every target, its socket, and how its last scrape went, at a glance.

One HTML page for people (a little inline CSS; no script, nothing fetched from elsewhere), or
the same fields in JSON for a client that prefers ``application/json``. Per target: the socket
it resolves to, its owner, group and mode (from :meth:`aegis.targets.Targets.catalog`), and the
last scrape's status or failure kind, when it began and how long it took
(:mod:`aegis.lastscrape`). Drawing the page scrapes nothing: a target never asked for since
Aegis started says so, and one past the record's bound says it was not recorded.

What an answer costs, with ten thousand sockets: each target's part from the catalog is built
once per catalog, per form, and shared (:meth:`aegis.discovery.Answers.rows`); the last
scrapes change with every scrape, so they are joined in as the answer is sent, each of the at
most :data:`aegis.metrics.MAX_TARGET_LABELS` recorded ones rendered once per answer and every
other target given one of two fixed cells. The answer goes out :data:`PIECE_NAMES` targets at a
time, each once the client took the one before: a client that reads nothing holds one piece.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json
from urllib.parse import quote

from aiohttp import web

from . import __version__
from .discovery import ENDPOINTS, PIECE_NAMES, Answers
from .lastscrape import LastScrapes, Outcome
from .metrics import MAX_TARGET_LABELS
from .socketinfo import SocketFile
from .targets import Catalog, DirectoryUnavailable, Targets

__all__ = ["landing"]

#: What a path or a name that is not UTF-8 (its bytes decoded with surrogate escapes, as Python
#: decodes file names) becomes in the HTML page: its escapes, as text. JSON escapes them itself.
_UNENCODABLE = "backslashreplace"
# Names that read the same in HTML, in a URL path and as text: nothing to escape.
_PLAIN = re.compile(r"[A-Za-z0-9_.-]+")

Pieces = Iterator[bytes]


async def landing(
    request: web.Request, targets: Targets, answers: Answers, last: LastScrapes
) -> web.StreamResponse:
    try:
        catalog, problem = targets.catalog(), None
    except DirectoryUnavailable as exc:
        # The explicit targets are still served; the directory's are unknown.
        catalog, problem = targets.explicit_catalog(), exc.reason
    as_json = _wants_json(request.headers.get("Accept", ""))
    render = _json_row if as_json else _html_row

    def build() -> list[bytes]:
        return [render(name, catalog.sockets) for name in catalog.names]

    # With the directory unavailable, the explicit targets only: a few, not kept.
    rows = answers.rows(catalog, as_json, build) if problem is None else build()
    state = _State(catalog, rows, last.snapshot(), last.full, time.time())
    if as_json:
        pieces = _json_page(state, {"path": str(targets.sockdir), "error": problem})
        return await answers.send(request, "application/json", pieces)
    return await answers.send(request, "text/html", _html_page(state, problem))


@dataclass(frozen=True, slots=True)
class _State:
    """What one answer shows: the catalog's rows, and the last scrapes as of ``now``."""

    catalog: Catalog
    rows: Sequence[bytes]
    last: Mapping[str, Outcome]
    #: Whether targets past the bound went unrecorded: then a target without a record is "not
    #: recorded" rather than "never scraped".
    full: bool
    now: float

    def counts(self) -> dict[str, int]:
        up = down = 0
        for name, outcome in self.last.items():
            if name in self.catalog.sockets:
                if outcome.up:
                    up += 1
                else:
                    down += 1
        rest = len(self.catalog.names) - up - down
        return {
            "targets": len(self.catalog.names),
            "up": up,
            "down": down,
            "never": 0 if self.full else rest,
            "not_recorded": rest if self.full else 0,
        }

    def pieces(self, cells: Mapping[str, bytes], otherwise: bytes, between: bytes = b"") -> Pieces:
        """Each row, then its last scrape's part: the one in ``cells``, or ``otherwise``."""
        names, rows = self.catalog.names, self.rows
        for start in range(0, len(names), PIECE_NAMES):
            end = start + PIECE_NAMES
            # No name for the bytes: the generator would keep them while the piece waits.
            yield (between if start else b"") + between.join(
                row + cells.get(name, otherwise)
                for name, row in zip(names[start:end], rows[start:end], strict=True)
            )


def _wants_json(accept: str) -> bool:
    """JSON when the client prefers ``application/json`` to HTML; browsers, curl and ties get
    HTML."""
    best = {"text/html": 0.0, "application/json": 0.0}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        for kind in best:
            if media == kind or media == "*/*" or media == kind.split("/")[0] + "/*":
                exact = media == kind
                # An exact range wins over a wildcard, whatever their order.
                if exact or best[kind] == 0.0:
                    best[kind] = quality if exact else max(best[kind], quality)
    return best["application/json"] > best["text/html"]


def _timestamp(seconds: float) -> str:
    """RFC 3339 in UTC, to the millisecond."""
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


# --- JSON ------------------------------------------------------------------------------------


def _json_row(name: str, sockets: Mapping[str, SocketFile]) -> bytes:
    """A target's object up to its last scrape, which each answer adds (with the closing
    brace)."""
    file = sockets[name]
    return (
        f'{{"name": {_json(name)}, "path": {_json(f"/{name}")}, "socket": {_json(file.path)}, '
        f'"owner": {_optional(file.owner)}, "group": {_optional(file.group)}, '
        f'"mode": {_optional(file.mode)}, "last_scrape": '
    ).encode()


def _optional(text: str) -> str:
    return _json(text) if text else "null"


def _json_outcome(outcome: Outcome) -> bytes:
    state = "up" if outcome.up else "down"
    kind = _json(outcome.kind) if outcome.kind else "null"
    return (
        f'{{"state": "{state}", "status": {outcome.status}, "kind": {kind}, '
        f'"began": "{_timestamp(outcome.started)}", "seconds": {round(outcome.seconds, 6)}}}}}'
    ).encode()


def _json_page(state: _State, directory: dict[str, str | None]) -> Pieces:
    # Written out by hand, as /-/sd is: json.dumps of it, to the byte.
    cells = {name: _json_outcome(outcome) for name, outcome in state.last.items()}
    otherwise = b'{"state": "not_recorded"}}' if state.full else b'{"state": "never"}}'
    yield (
        f'{{"version": {_json(__version__)}, "time": "{_timestamp(state.now)}", '
        f'"summary": {json.dumps(state.counts())}, "targets": ['
    ).encode()
    yield from state.pieces(cells, otherwise, b", ")
    yield (
        f'], "endpoints": {json.dumps(ENDPOINTS)}, "socket_directory": {json.dumps(directory)}}}'
    ).encode()


# --- HTML ------------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse}"
    "th,td{text-align:left;padding:.25em .7em;border-bottom:1px solid #ddd;white-space:nowrap}"
    "th{background:#f3f3f3}"
    "td.up{color:#176117}td.down{color:#a31515;font-weight:bold}td.none{color:#777}"
    "p.problem{color:#a31515;font-weight:bold}"
)
_HEAD = (
    "<th>Target</th><th>Socket</th><th>Owner</th><th>Group</th><th>Mode</th>"
    "<th>Last scrape</th><th>Began</th><th>Took</th>"
)


def _html_row(name: str, sockets: Mapping[str, SocketFile]) -> bytes:
    """A target's row up to its last scrape, whose cells each answer adds (with ``</tr>``)."""
    if _PLAIN.fullmatch(name):  # every name from the directory is plain
        href = text = name
    else:
        text, href = html.escape(name), html.escape(quote(name))
    file = sockets[name]
    facts = "".join(
        f"<td>{html.escape(value)}</td>" if value else '<td class="none">unknown</td>'
        for value in (file.owner, file.group, file.mode)
    )
    return (
        f'<tr><td><a href="{href}">{text}</a></td><td><code>{html.escape(file.path)}</code></td>'
        f"{facts}"
    ).encode(errors=_UNENCODABLE)


def _html_outcome(outcome: Outcome, now: float) -> bytes:
    result = f"{outcome.status} {outcome.kind}" if outcome.kind else str(outcome.status)
    when = _timestamp(outcome.started)
    shown = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(outcome.started))
    took = f"{outcome.seconds * 1000:.3g} ms" if outcome.seconds < 1 else f"{outcome.seconds:.2f} s"
    return (
        f'<td class="{"up" if outcome.up else "down"}">{html.escape(result)}</td>'
        f'<td><time datetime="{when}">{shown}</time> ({_ago(now - outcome.started)})</td>'
        f"<td>{took}</td></tr>\n"
    ).encode()


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def _summary(counts: dict[str, int]) -> str:
    total = counts["targets"]
    parts = [f"{counts['up']} up", f"{counts['down']} down"]
    if counts["never"]:
        parts.append(f"{counts['never']} never scraped")
    if counts["not_recorded"]:
        parts.append(f"{counts['not_recorded']} not recorded")
    return f"{total} target{'' if total == 1 else 's'}: {', '.join(parts)}."


def _html_page(state: _State, problem: str | None) -> Pieces:
    # Relative links, so the page works the same under a path prefix (add_subapp, a proxy).
    cells = {name: _html_outcome(outcome, state.now) for name, outcome in state.last.items()}
    otherwise = (
        f'<td class="none" colspan="3">not recorded (Aegis records the first '
        f"{MAX_TARGET_LABELS} targets scraped)</td></tr>\n"
        if state.full
        else '<td class="none" colspan="3">never scraped</td></tr>\n'
    ).encode()
    note = ""
    if problem is not None:
        note = f'<p class="problem">socket directory unavailable: {html.escape(problem)}</p>\n'
    elif not state.catalog.names:
        note = "<p>None yet: no socket in the directory.</p>\n"
    yield (
        '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Aegis</title><style>{_STYLE}</style></head>\n<body>\n"
        f"<h1>Aegis</h1>\n<p>Version {html.escape(__version__)}: the Prometheus metrics of "
        "Unix-socket services, on one TCP port.</p>\n"
        f"<h2>Targets</h2>\n{note}<p>{_summary(state.counts())} Last scrapes as of "
        f'<time datetime="{_timestamp(state.now)}">'
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(state.now))}</time>; "
        "this page scrapes nothing.</p>\n"
        f"<table>\n<thead><tr>{_HEAD}</tr></thead>\n<tbody>\n"
    ).encode(errors=_UNENCODABLE)
    yield from state.pieces(cells, otherwise)
    endpoints = "".join(f'<li><a href="{path[1:]}">{path}</a></li>\n' for path in ENDPOINTS)
    yield f"</tbody>\n</table>\n<h2>Aegis</h2>\n<ul>\n{endpoints}</ul>\n</body>\n</html>\n".encode()
