"""Log lines in the Prometheus ecosystem's format: logfmt as slog writes it, and JSON."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aegisrun import Children, needs_aegis
from hypothesis import given
from hypothesis import strategies as st

from aegis.cli.logformat import JSONFormatter, LogfmtFormatter, configure, logfmt_value
from aegis.logs import RateLimited, Throttled
from conftest import raw_http

_GO_UNESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_PAIR = re.compile(r'([^\s="]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')


def go_unquote(text: str) -> str:
    """Go's strconv.Unquote, for the escapes strconv.Quote writes."""
    assert text.startswith('"'), text
    assert text.endswith('"'), text
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        kind = body[i + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(kind)
        if width:
            out.append(chr(int(body[i + 2 : i + 2 + width], 16)))
            i += 2 + width
        else:
            out.append(_GO_UNESCAPES.get(kind, kind))
            i += 2
    return "".join(out)


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: the whole line must be key=value pairs split by single spaces."""
    pairs = list(_PAIR.finditer(line))
    assert " ".join(match.group(0) for match in pairs) == line, line
    return {
        key: go_unquote(value) if value.startswith('"') else value
        for key, value in (match.groups() for match in pairs)
    }


def record(msg: str, *args: object, at: int = logging.INFO, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("aegis.test")
    made = logger.makeRecord(
        logger.name, at, "/somewhere/aegis/cli.py", 123, msg, args, None, extra=extra
    )
    made.created = 1795608083.129  # 2026-11-25T12:01:23.129Z
    return made


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_line_is_time_level_source_msg_then_the_fields_in_order() -> None:
    line = LogfmtFormatter().format(
        record("%s -> %s", "[::]:31337", "/srv/within/run", target="node", code=502)
    )
    assert line == (
        "time=2026-11-25T12:01:23.129Z level=info source=cli.py:123 "
        'msg="[::]:31337 -> /srv/within/run" target=node code=502'
    )


@pytest.mark.parametrize(
    ("level", "name"),
    [
        (logging.DEBUG, "debug"),
        (logging.INFO, "info"),
        (logging.WARNING, "warn"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "error"),
    ],
)
def test_levels_are_lower_case_as_prometheus_flags_spell_them(level: int, name: str) -> None:
    assert f" level={name} " in LogfmtFormatter().format(record("x", at=level))


@pytest.mark.skipif(
    not Path("/usr/share/zoneinfo/Europe/Berlin").exists(), reason="no tzdata on this machine"
)
def test_local_time_carries_its_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    assert LogfmtFormatter().format(record("x")).startswith("time=2026-11-25T13:01:23.129+01:00 ")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain", "plain"),
        ("", '""'),
        ("two words", '"two words"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", "back\\slash"),  # slog quotes only for space, quote, = or unprintable
        ("line\nbreak", '"line\\nbreak"'),
        ("tab\there", '"tab\\there"'),
        ("café", "café"),
        ("日本", "日本"),
        ("\x00nul", '"\\x00nul"'),
        ("\x7f", '"\\x7f"'),
        ("zero\u200bwidth", '"zero\\u200bwidth"'),
        ("\u2028", '"\\u2028"'),
        (True, "true"),
        (None, "<nil>"),
        (0.25, "0.25"),
    ],
)
def test_values_are_quoted_and_escaped_as_slog_does(value: object, written: str) -> None:
    assert logfmt_value(value) == written


@given(st.text(), st.text(alphabet=st.characters(codec="utf-8", exclude_characters='"= ')))
def test_any_message_and_field_are_one_line_that_reads_back(msg: str, field: str) -> None:
    line = LogfmtFormatter().format(record("%s", msg, user=field))
    assert "\n" not in line
    assert "\r" not in line
    parsed = parse_logfmt(line)
    assert parsed["msg"] == msg
    assert parsed["user"] == field


def test_a_field_named_like_a_fixed_key_is_renamed_not_repeated() -> None:
    parsed = parse_logfmt(LogfmtFormatter().format(record("x", level="mine", time="t")))
    assert parsed["level"] == "info"
    assert parsed["logged_level"] == "mine"
    assert parsed["logged_time"] == "t"


def test_an_exception_is_one_err_field_holding_the_traceback() -> None:
    try:
        raise ValueError('bad "thing"')
    except ValueError:
        made = record("target %d failed", 1, at=logging.ERROR)
        made.exc_info = sys.exc_info()
    line = LogfmtFormatter().format(made)
    assert "\n" not in line
    err = parse_logfmt(line)["err"]
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.endswith('ValueError: bad "thing"')


def test_json_has_the_same_keys_and_native_numbers() -> None:
    line = JSONFormatter().format(record("a -> b", target="node", code=502, took=0.5, path=None))
    assert json.loads(line) == {
        "time": "2026-11-25T12:01:23.129Z",
        "level": "info",
        "source": "cli.py:123",
        "msg": "a -> b",
        "target": "node",
        "code": 502,
        "took": 0.5,
        "path": None,
    }
    assert "\n" not in line


def test_configure_sends_every_logger_through_the_format_at_the_level() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure("info", "logfmt", io.StringIO())
        configure("warn", "json", stream)  # replaces the first, keeps pytest's own handlers
        assert [h.name for h in root.handlers].count("aegis.logs") == 1
        others = [h for h in saved[0] if h.name != "aegis.logs"]
        assert [h for h in root.handlers if h.name != "aegis.logs"] == others
        logging.getLogger("aegis.anything").info("not shown")
        logging.getLogger("aiohttp.server").warning("shown %d", 1)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["shown 1"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_lines_count_what_they_held_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limited = RateLimited(logging.getLogger("aegis.test"), interval=60, clock=clock)
    caplog.set_level(logging.DEBUG, "aegis.test")
    for user in ("a", "b", "c"):
        limited.log("refused credentials", {"user": user})
        clock.now += 10
    clock.now += 40  # 70 s after the first
    limited.log("refused credentials", {"user": "d"})

    seen = [(r.levelno, r.__dict__["user"], r.__dict__.get("suppressed")) for r in caplog.records]
    assert seen == [
        (logging.WARNING, "a", None),
        (logging.DEBUG, "b", None),
        (logging.DEBUG, "c", None),
        (logging.WARNING, "d", 2),
    ]
    # The line's source is where the event happened, not the limiter.
    assert {r.filename for r in caplog.records} == {"test_logs.py"}


def test_throttled_lines_are_limited_per_key(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    throttled = Throttled(logging.getLogger("aegis.test"), interval=60, max_keys=2, clock=clock)
    caplog.set_level(logging.DEBUG, "aegis.test")
    for _ in range(3):
        throttled.log(("refused", "a"), logging.WARNING, "502 a")
        throttled.log(("refused", "b"), logging.WARNING, "502 b")  # not held back by a's
    error = RuntimeError("bug")
    throttled.log(("internal", "a"), logging.ERROR, "bug in a", exc_info=error)  # a third key
    throttled.log(("refused", "a"), logging.WARNING, "502 a")  # forgotten: said again
    throttled.log(("internal", "a"), logging.ERROR, "bug in a", exc_info=error)
    seen = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert seen == [
        (logging.WARNING, "502 a", False),
        (logging.WARNING, "502 b", False),
        (logging.DEBUG, "502 a", False),
        (logging.DEBUG, "502 b", False),
        (logging.DEBUG, "502 a", False),
        (logging.DEBUG, "502 b", False),
        (logging.ERROR, "bug in a", True),
        (logging.WARNING, "502 a", False),
        (logging.DEBUG, "bug in a", False),  # the traceback goes with the full line only
    ]
    assert {r.filename for r in caplog.records} == {"test_logs.py"}


MALFORMED = [
    b"GET /x HTTP/1.1\r\nHost: x\r\nX Y: 1\r\n\r\n",  # a space in a header name
    b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",  # NUL in a value
    b"GET /x HTTP/1.2\r\nHost: x\r\n\r\n",
    b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello\r\n\r\n",  # TLS to a plain listener
]


@needs_aegis
@pytest.mark.parametrize("level", ["info", "debug"])
async def test_malformed_requests_are_answered_400_and_never_logged_as_errors(
    sockdir: Path, children: Children, level: str
) -> None:
    """Any client can send them, as fast as it likes: a traceback each would drown the log."""
    aegis, port = await children.serve(sockdir, "--log.level", level)
    for request in MALFORMED * 5:
        answer = await raw_http(port, request)
        assert answer == b"" or answer.split(b" ", 2)[1] == b"400", answer
    assert await aegis.stop() == 0
    log = aegis.output()
    assert "Traceback" not in log, log
    assert "level=error" not in log, log
    lines = [line for line in log.splitlines() if 'msg="malformed request"' in line]
    if level == "info":
        assert lines == []
    else:
        assert len(lines) >= 5 * (len(MALFORMED) - 1), log
        assert all("level=debug" in line and "client=127.0.0.1" in line for line in lines)
        assert all("status=400" in line for line in lines)
