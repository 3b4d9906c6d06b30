"""Log lines as Prometheus and its exporters write them (Go's ``log/slog`` through promslog).

``logfmt``::

    time=2026-11-25T12:01:23.129Z level=info source=main.py:123 msg="[::]:31337 -> /srv/run"

and ``json``, one object per line with the same keys. Fields a caller passes with
``extra={"key": value}`` follow ``msg`` in the order given. Values are quoted as slog's text
handler quotes them: only when empty or holding a space, ``"``, ``=`` or a character that does not
print, with Go's escapes, so every record is one line (a traceback too, as an ``err`` field).

Levels are written lower-case, as promslog's go-kit style and ``--log.level`` spell them:
``debug``, ``info``, ``warn``, ``error``. A field named like one of the four fixed keys is
renamed ``logged_KEY``, as promslog does, so no key appears twice.

This is the program's: setting up logging is process-wide, and the library only logs.
:class:`MalformedRequests` turns aiohttp's traceback for each request it cannot parse into
a debug line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError

from ..protocol import ipv4_form

__all__ = [
    "FORMATS",
    "LEVELS",
    "JSONFormatter",
    "LogfmtFormatter",
    "MalformedRequests",
    "configure",
]

#: ``--log.level`` values, as Prometheus spells them, and what logging calls them.
LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("logfmt", "json")

_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
_FIXED = ("time", "level", "source", "msg")
_HANDLER_NAME = "aegis.logs"
# What every LogRecord has: anything else in its __dict__ came from ``extra=``.
_RECORD_ATTRS = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
    }
)
_GO_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def _timestamp(created: float) -> str:
    """RFC 3339 with milliseconds in local time, ``Z`` for UTC: Go's
    ``2006-01-02T15:04:05.000Z07:00``."""
    moment = datetime.fromtimestamp(created).astimezone()
    text = moment.isoformat(timespec="milliseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _level(levelno: int) -> str:
    return _LEVEL_NAMES.get(levelno) or logging.getLevelName(levelno).lower()


def _fields(record: logging.LogRecord) -> Iterator[tuple[str, object]]:
    """time, level, source, msg, the caller's fields, then the error if there is one."""
    yield "time", _timestamp(record.created)
    yield "level", _level(record.levelno)
    yield "source", f"{os.path.basename(record.pathname)}:{record.lineno}"
    yield "msg", record.getMessage()
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRS:
            yield (f"logged_{key}" if key in _FIXED else key), value
    if record.exc_info and record.exc_info[1] is not None:
        yield "err", "".join(traceback.format_exception(record.exc_info[1])).rstrip("\n")
    elif record.stack_info:
        yield "stack", record.stack_info


def _needs_quoting(text: str) -> bool:
    # slog's rule: empty, or a space, quote, equals sign or a rune that does not print.
    return not text or any(ch in ' "=' or not ch.isprintable() for ch in text)


def _quote(text: str) -> str:
    """Go's strconv.Quote: printable characters as they are, the rest escaped."""
    out = ['"']
    for ch in text:
        escaped = _GO_ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def logfmt_value(value: object) -> str:
    """One value as slog's text handler writes it."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "<nil>"
    else:
        text = str(value)
    return _quote(text) if _needs_quoting(text) else text


class LogfmtFormatter(logging.Formatter):
    """``time=... level=... source=file.py:LINE msg=... key=value``, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(
            f"{logfmt_value(key)}={logfmt_value(value)}" for key, value in _fields(record)
        )


class JSONFormatter(logging.Formatter):
    """The same keys as one JSON object per line (slog's JSON handler through promslog)."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {}
        for key, value in _fields(record):
            body[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


class MalformedRequests(logging.Filter):
    """aiohttp logs each request it cannot parse as an error with a traceback: any client
    could fill the log so. The client's mistake is answered 400 and logged as one debug line
    (Go's servers log nothing); other errors pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        client = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(client, str):
            client = ipv4_form(client)
        record.msg, record.args = "malformed request", ()
        record.exc_info = record.exc_text = None
        record.__dict__.update(client=client, status=exc.code, reason=exc.message)
        # The logger's own level was checked against the original level.
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def configure(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send every logger's records at ``level`` and above to ``stream`` (stderr) in ``fmt``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        if old.name == _HANDLER_NAME:  # a second call replaces the first; others stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(known, MalformedRequests) for known in server.filters):
        server.addFilter(MalformedRequests())
