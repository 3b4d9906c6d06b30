"""The README's fenced code blocks, each with the check its marker comment asks for.

A block's check is named by an HTML comment on the line right before its opening fence:
``<!-- check: KIND ARG -->`` (the README's last section lists the kinds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
KINDS = ("prometheus", "rules", "web-config", "targets", "fragment")

needs_readme = pytest.mark.skipif(
    not README.is_file(),
    reason="no README.md beside tests/ (the Nix package's source holds pkgs/aegis and tests only)",
)


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    kind: str | None
    arg: str

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def blocks() -> list[Block]:
    found: list[Block] = []
    if not README.is_file():  # parametrizing must not fail where the tests are skipped
        return found
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 1}: code block never closed"
        marker = re.fullmatch(r"<!--\s*check:\s*(\S+)\s*(\S*)\s*-->", lines[i - 1]) if i else None
        text = "\n".join(lines[i + 1 : end]) + "\n"
        kind, arg = (marker.group(1), marker.group(2)) if marker else (None, "")
        found.append(Block(i + 1, fence.group(1), text, kind, arg))
        i = end + 1
    return found


def of_kind(kind: str) -> list[Block]:
    return [b for b in blocks() if b.kind == kind]


def rules() -> Block:
    found = of_kind("rules")
    assert len(found) == 1, "expected the README's one block of alert rules"
    return found[0]


def documented_passwords(block: Block) -> dict[str, str]:
    """user -> password, where a comment says the hash on the next line is of ``"password"``."""
    found = re.findall(r'#[^\n]*"([^"\s]+)"[^\n]*\n\s+([\w.-]+):', block.text)
    return {user: password for password, user in found}
