"""The fenced code blocks of README.md and docs/*.md, each with the check its marker asks for.

A block's check is named by an HTML comment on the line right before its opening fence:
``<!-- check: KIND ARG -->`` (docs/design.md lists the kinds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
KINDS = (
    "prometheus",
    "rules",
    "alertmanager",
    "web-config",
    "targets",
    "certificates",
    "caddyfile",
    "library",
    "fragment",
)
#: The language of each kind's block.
LANGUAGES = {
    "certificates": ("sh",),
    "caddyfile": ("text",),
    "library": ("python",),
}
YAML = ("yaml", "yml")

needs_readme = pytest.mark.skipif(
    not README.is_file(),
    reason="no README.md beside tests/ (the Nix package's source holds pkgs/aegis, tests, "
    "README.md and docs/ only)",
)


def pages() -> list[Path]:
    """README.md, then every page of docs/."""
    found = [README] if README.is_file() else []
    return found + sorted(DOCS.glob("*.md"))


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    kind: str | None
    arg: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    found: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.name}:{i + 1}: code block never closed"
        marker = re.fullmatch(r"<!--\s*check:\s*(\S+)\s*(\S*)\s*-->", lines[i - 1]) if i else None
        text = "\n".join(lines[i + 1 : end]) + "\n"
        kind, arg = (marker.group(1), marker.group(2)) if marker else (None, "")
        found.append(Block(page, i + 1, fence.group(1), text, kind, arg))
        i = end + 1
    return found


def blocks() -> list[Block]:
    """Every block of every page (none where the pages are absent: parametrizing must not fail
    where the tests are skipped)."""
    return [block for page in pages() for block in page_blocks(page)]


def of_kind(kind: str) -> list[Block]:
    return [b for b in blocks() if b.kind == kind]


def on_page(kind: str, page: str) -> list[Block]:
    """The blocks of ``kind`` on ``page`` (a path from the repository's root)."""
    return [b for b in of_kind(kind) if b.page == ROOT / page]


def the_block(kind: str, page: str) -> Block:
    """The one block of ``kind`` on ``page``."""
    found = on_page(kind, page)
    assert len(found) == 1, f"expected one <!-- check: {kind} --> block in {page}, found {found}"
    return found[0]


def rules() -> Block:
    found = of_kind("rules")
    assert len(found) == 1, "expected the docs' one block of alert rules"
    return found[0]


def documented_passwords(block: Block) -> dict[str, str]:
    """user -> password, where a comment says the hash on the next line is of ``"password"``."""
    found = re.findall(r'#[^\n]*"([^"\s]+)"[^\n]*\n\s+([\w.-]+):', block.text)
    return {user: password for password, user in found}


def prometheus_major(version_line: str) -> int:
    """3 from "prometheus, version 3.5.3+ds1 (branch: ...)"."""
    found = re.search(r"version (\d+)\.", version_line)
    assert found, version_line
    return int(found.group(1))
