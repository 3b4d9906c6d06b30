"""nix-instantiate and nixpkgs' lib, for the tests that evaluate the Nix files (test_nix.py,
test_systemd.py). Nothing here builds with Nix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EVAL_MODULE = REPO / "tests" / "nix" / "eval-module.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")


def nix(*args: str) -> str:
    assert NIX_INSTANTIATE is not None
    result = subprocess.run(
        [NIX_INSTANTIATE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise NixError(result.stderr)
    return result.stdout


class NixError(Exception):
    pass


# nixpkgs' lib (26.05), shared read-only next to the repository by every developer and CI.
SHARED_NIXPKGS_LIB = REPO.parent / "shared" / "nixpkgs-lib" / "lib"


def find_nixpkgs_lib() -> Path | str:
    """The nixpkgs lib directory to evaluate against, or why there is none."""
    if NIX_INSTANTIATE is None:
        return "nix-instantiate is not installed (Debian package nix-bin)"
    value = os.environ.get("AEGIS_NIXPKGS_LIB")
    if not value:
        if (SHARED_NIXPKGS_LIB / "default.nix").is_file():
            return SHARED_NIXPKGS_LIB.resolve()
        return f"no nixpkgs lib at {SHARED_NIXPKGS_LIB}, and AEGIS_NIXPKGS_LIB is not set"
    for candidate in (Path(value), Path(value) / "lib"):
        if (candidate / "default.nix").is_file() and (candidate / "modules.nix").is_file():
            return candidate.resolve()
    return f"AEGIS_NIXPKGS_LIB={value} holds no nixpkgs lib/default.nix"


def eval_module(lib: Path, settings: dict[str, Any], prefix: str = "/aegis-stub") -> Any:
    out = nix(
        "--eval",
        "--strict",
        "--json",
        str(EVAL_MODULE),
        "--argstr",
        "nixpkgsLib",
        str(lib),
        "--argstr",
        "settings",
        json.dumps(settings),
        "--argstr",
        "aegisPrefix",
        prefix,
    )
    return json.loads(out)
