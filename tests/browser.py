"""Headless Chromium (Debian's ``chromium``) for the tests that check a page as a browser renders
it: the DOM it built, and a screenshot. Loopback only; each run has a profile of its own under
the test's directory, and every run is bounded in time."""

from __future__ import annotations

import asyncio
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = "chromium is not installed (Debian package chromium; .ci/run installs it)"

# No sandbox: the tests run as root, which Chromium's sandbox refuses. Nothing reaches out: no
# component updates, no sync, no background requests, no QUIC.
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


async def chromium(tmp_path: Path, *args: str, within: float = 90.0) -> bytes:
    """Chromium's standard output for ``args``; a failure or a timeout fails the test."""
    assert CHROMIUM is not None, MISSING
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *_FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"HOME": str(profile), "PATH": "/usr/bin:/bin"},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"chromium {args} took more than {within} s") from None
    assert process.returncode == 0, f"chromium {args}: {err.decode(errors='replace')[-2000:]}"
    return out


async def dump_dom(tmp_path: Path, url: str) -> str:
    """The DOM Chromium built from ``url``, serialized once the page loaded."""
    return (await chromium(tmp_path, "--dump-dom", url)).decode()


async def screenshot(tmp_path: Path, url: str, size: tuple[int, int]) -> Path:
    """A PNG of ``url`` rendered in a window of ``size``; its dimensions are checked."""
    path = tmp_path / "screenshot.png"
    await chromium(tmp_path, f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == size
    return path


class Element:
    """A parsed element: its tag, attributes, children and text."""

    def __init__(self, tag: str, attrs: dict[str, str | None]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.children: list[Element] = []
        self.parts: list[str] = []

    def text(self) -> str:
        return "".join(self.parts)

    def all(self, tag: str) -> list[Element]:
        found = []
        for child in self.children:
            if child.tag == tag:
                found.append(child)
            found += child.all(tag)
        return found


_VOID = {"meta", "link", "br", "img", "input", "hr", "col", "base", "source", "wbr"}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs))
        self.open[-1].children.append(element)
        if tag not in _VOID:
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.open) - 1, 0, -1):
            if self.open[index].tag == tag:
                del self.open[index:]
                return

    def handle_data(self, data: str) -> None:
        for element in self.open:  # an element's text is all the text inside it
            element.parts.append(data)


def parse(markup: str) -> Element:
    """The element tree of serialized DOM (well formed, as Chromium writes it)."""
    builder = _Builder()
    builder.feed(markup)
    builder.close()
    return builder.root
