"""What the command carries when nothing optional is configured, and the benchmark's pages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "run.py"


def test_optional_libraries_are_not_imported_by_the_command() -> None:
    # PyYAML and bcrypt serve --config.file and basic auth only, importlib.metadata --version,
    # ctypes the memory trimming after large heads: the process would carry them always (ctypes
    # and importlib.metadata ~0.9 MB). Only what Aegis itself brings in counts: a
    # dependency's own imports are its business.
    code = (
        "import sys, aiohttp.web, prometheus_client, httptools, uvloop\n"
        "before = set(sys.modules)\n"
        "import aegis.cli, aegis.cli.serve\n"
        "optional = {'yaml', 'bcrypt', 'ctypes', 'importlib.metadata'}\n"
        "print(sorted(optional & (set(sys.modules) - before)))"
    )
    # The installed package, found as the interpreter finds it: in the Nix build that is
    # through PYTHONPATH, which must be left as it is.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_file_still_loads_yaml(tmp_path: Path) -> None:
    from aegis.configfile import load_targets

    config = tmp_path / "aegis.yml"
    config.write_text("targets:\n  node:\n    socket: /run/node.sock\n")
    assert str(load_targets(config)["node"].socket) == "/run/node.sock"


@pytest.mark.skipif(
    not BENCH.exists(), reason="bench/ is not part of the package's source (the Nix build)"
)
def test_benchmark_pages_are_valid_expositions_of_the_asked_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look themselves up
    spec.loader.exec_module(bench)
    for size in (33 * 1024, 300 * 1024):
        page = bench.exposition(size)
        assert size <= len(page) < size + 8 * 1024
        families = list(text_string_to_metric_families(page.decode()))
        assert {family.type for family in families} == {"counter", "gauge", "histogram"}
        assert page == bench.exposition(size)  # the same page every run
