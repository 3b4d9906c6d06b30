"""What Prometheus makes of a scraped page, for ``aegis check``.

Which parser a page gets depends on its ``Content-Type`` and on the Prometheus:

- Prometheus 3 takes ``text/plain``, ``application/openmetrics-text`` and
  ``application/vnd.google.protobuf`` (any parameters); a missing, unparseable or other type fails
  the scrape, unless the job sets ``fallback_scrape_protocol``.
- Prometheus 2 (2.42 read for this) reads OpenMetrics and protobuf by their types and everything
  else, a missing or unparseable type included, as the text format.

So both use the same parser whenever Prometheus 3 takes the page, and a page is parsed once.
prometheus_client's text and OpenMetrics parsers stand in for Prometheus' own; a page must be
UTF-8, as Prometheus wants of label values.
"""

from __future__ import annotations

import io
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO, cast

from prometheus_client.openmetrics.parser import (
    text_fd_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_fd_to_metric_families as text_families

__all__ = ["MAX_LINE", "PageError", "Parsed", "Reading", "decode", "media_type", "parse", "reading"]

TEXT = "text"
OPENMETRICS = "openmetrics"
PROTOBUF = "protobuf"
#: What each format is called in a sentence.
FORMAT_NAMES = {TEXT: "the text format", OPENMETRICS: "OpenMetrics", PROTOBUF: "protobuf"}

# Prometheus 3's media types (textparse), and the parser each picks.
_TAKEN = {
    "text/plain": TEXT,
    "application/openmetrics-text": OPENMETRICS,
    "application/vnd.google.protobuf": PROTOBUF,
}
# RFC 2045's tspecials: what a token may not hold (nor spaces and control characters).
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
# A parser's message can quote the offending line, which can be the whole page.
_MAX_MESSAGE = 200
#: The longest line parsed, in characters; real exporters' lines are well under a kilobyte.
MAX_LINE = 256 * 1024


class PageError(Exception):
    """The page could not be decoded within the bound. ``kind`` as in the report."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reading:
    """How a page with some Content-Type is read."""

    #: The parser Prometheus 2 uses, and Prometheus 3 too unless it refuses the page.
    format: str
    #: Why Prometheus 3 refuses the page; "" when it takes it.
    refusal: str


@dataclass(frozen=True, slots=True)
class Parsed:
    samples: int
    #: Why the page does not parse; "" when it does.
    error: str
    #: Why it was not parsed to its end (a line too long, out of time): then neither says.
    unchecked: str = ""


def reading(content_type: str | None) -> Reading:
    if not content_type:
        return Reading(TEXT, "no Content-Type")
    try:
        media = media_type(content_type)
    except ValueError as exc:
        return Reading(TEXT, f"the Content-Type does not parse ({exc})")
    taken = _TAKEN.get(media)
    if taken is None:
        return Reading(TEXT, f"unsupported Content-Type {media}")
    return Reading(taken, "")


def media_type(value: str) -> str:
    """The media type of a Content-Type value, in lower case, by the rules of Go's
    ``mime.ParseMediaType`` (which Prometheus uses): ``type/subtype`` (or a single token), then
    ``; name=value`` parameters, each value a token or a quoted string, no name twice, trailing
    semicolons allowed. ValueError says what is wrong."""
    base, _, _ = value.partition(";")
    media = base.strip().lower()
    kind, slash, subtype = media.partition("/")
    if not _is_token(kind):
        raise ValueError("no media type")
    if slash and not _is_token(subtype):
        raise ValueError("no subtype after the slash")
    rest = value[len(base) :]
    names: set[str] = set()
    while rest.strip():
        name, rest = _parameter(rest)
        if name is None:
            if rest.strip() == ";":
                break
            raise ValueError("invalid media parameter")
        if name in names:
            raise ValueError(f"parameter {name} given twice")
        names.add(name)
    return media


def _parameter(text: str) -> tuple[str | None, str]:
    """One ``; name=value``: its name in lower case and what follows, or None and ``text``."""
    rest = text.lstrip()
    if not rest.startswith(";"):
        return None, text
    rest = rest[1:].lstrip()
    end = _token_end(rest)
    name = rest[:end].lower()
    rest = rest[end:].lstrip()
    if not name or not rest.startswith("="):
        return None, text
    rest = rest[1:].lstrip()
    if rest.startswith('"'):
        after = _quoted_end(rest)
        if after < 0:
            return None, text
        return name, rest[after:]
    end = _token_end(rest)
    if end == 0:
        return None, text
    return name, rest[end:]


def _token_end(text: str) -> int:
    for i, char in enumerate(text):
        if not _is_token_char(char):
            return i
    return len(text)


def _quoted_end(text: str) -> int:
    """The index after the quoted string ``text`` starts with, or -1 if it never ends."""
    i = 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return i + 1
        if char in "\r\n":
            return -1
        i += 2 if char == "\\" and i + 1 < len(text) and text[i + 1] in _TSPECIALS else 1
    return -1


def _is_token_char(char: str) -> bool:
    return " " < char < "\x7f" and char not in _TSPECIALS


def _is_token(text: str) -> bool:
    return bool(text) and all(_is_token_char(char) for char in text)


def decode(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The page as Prometheus reads it: gunzipped when the upstream says ``gzip`` (exactly, as
    Prometheus compares), at most ``max_bytes`` of it (:class:`PageError` past that, or for a
    broken gzip stream), else as it came."""
    if content_encoding != "gzip":
        return body
    out: list[bytes] = []
    size = 0
    rest = body
    while True:  # one gzip member after another, as Go's reader takes them
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            piece = inflate.decompress(rest, max_bytes - size + 1)
        except zlib.error as exc:
            raise PageError("parse", f"gzip: {exc}") from None
        size += len(piece)
        if size > max_bytes or inflate.unconsumed_tail:
            raise PageError("too_large", f"page over {max_bytes} bytes once gunzipped")
        out.append(piece)
        if not inflate.eof:
            raise PageError("parse", "gzip: the stream is cut short")
        rest = inflate.unused_data
        if not rest:
            return b"".join(out)


def parse(page: bytes, fmt: str, deadline: float) -> Parsed:
    """Whether ``page`` parses as ``fmt`` (text or OpenMetrics), and its samples, by the
    monotonic clock's ``deadline``. Never raises: whatever a parser raises on a hostile page is
    the page's fault.

    The parser reads lines from the page's bytes as it goes (only ``\\n`` ends one, as for
    Prometheus): no decoded copy of a whole page is made. Its time grows with the square of a
    line's length for some lines (a label value of escaped quotes: a minute for 2 MiB), so a
    line past :data:`MAX_LINE` is not parsed, and the deadline is looked at between lines."""
    families = openmetrics_families if fmt == OPENMETRICS else text_families
    samples = 0
    try:
        # Both parsers only iterate over their "file": a generator of lines will do.
        for family in families(cast(TextIO, _lines(page, deadline))):
            samples += len(family.samples)
    except _Unchecked as exc:
        return Parsed(samples, "", exc.reason)
    except UnicodeDecodeError:
        return Parsed(samples, "not UTF-8")
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "..."
        return Parsed(samples, message)
    return Parsed(samples, "")


class _Unchecked(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _lines(page: bytes, deadline: float) -> Iterator[str]:
    reader = io.TextIOWrapper(io.BytesIO(page), encoding="utf-8", newline="\n")
    for number, line in enumerate(reader, 1):
        if len(line) > MAX_LINE:
            raise _Unchecked(f"line {number} is over {MAX_LINE} characters: not parsed")
        if time.monotonic() > deadline:
            raise _Unchecked(f"parsing stopped at line {number}: out of time")
        yield line
