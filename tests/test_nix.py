"""Checks of the Nix side that need neither nixpkgs nor a binary cache.

Nothing here builds with Nix. What runs:

- every tracked .nix file parses (nix-instantiate --parse), and so does every
  nix block of README.md and docs/;
- modules/aegis.nix, evaluated by nixpkgs' real lib.evalModules against stub
  NixOS options (tests/nix/eval-module.nix), gives the expected service,
  user, tmpfiles rule, firewall port and assertions;
- the ExecStart it evaluates to, split as systemd splits it, starts the
  installed aegis, which then serves a real Unix-socket exporter;
- pkgs/aegis/default.nix, called with stub arguments, has a source that holds
  the Python project, the tests, README.md and docs/, and nothing else;
- the build's check phase, rehearsed: its pytest command on a read-only copy of
  exactly the files that source selects, as an unprivileged user with
  HOME=/homeless-shelter, no network and only the installed package (root);
- the suite collects with --import-mode=importlib, as newer pytestCheckHooks run it;
- the VM test's script is valid Python.

Needs nix-instantiate (Debian: nix-bin) and, for everything but parsing, a
nixpkgs lib: ../shared/nixpkgs-lib/lib next to the repository, or the
directory AEGIS_NIXPKGS_LIB names instead (a checkout of nixpkgs or
nixpkgs.lib, or its lib/ directory). Each check skips, saying why, when what
it needs is missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aegisrun import AEGIS, free_port
from nixeval import (
    NIX_INSTANTIATE,
    REPO,
    NixError,
    eval_module,
    find_nixpkgs_lib,
    nix,
)
from readmeblocks import Block, blocks

import aegis

EVAL_FLAKE = REPO / "tests" / "nix" / "eval-flake.nix"
FAKE_EXPORTER = REPO / "nixos-tests" / "fake_exporter.py"
needs_nix = pytest.mark.skipif(
    NIX_INSTANTIATE is None,
    reason="nix-instantiate is not installed (Debian package nix-bin)",
)


def tracked_nix_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "*.nix"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return sorted(
            str(p.relative_to(REPO)) for p in REPO.rglob("*.nix") if ".git" not in p.parts
        )
    return sorted(name for name in out.decode().split("\0") if name)


@pytest.fixture(scope="session")
def nixpkgs_lib() -> Path:
    found = find_nixpkgs_lib()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def systemd_words(line: str) -> list[str]:
    """Split an Exec*= value into argv as systemd does.

    systemd first replaces specifiers in the whole value ("%%" is "%"),
    splits it into words (double quotes group, C escapes are decoded) and, at
    start, substitutes variables in each word ("$$" is "$"). Any other % or $
    would be expanded into something else; for the module's output that is a
    quoting bug, so it raises.
    """
    if line[:1] in tuple("@-:+!|"):
        raise ValueError(f"unexpected ExecStart prefix in {line!r}")
    line = _undouble(line, "%")
    words: list[str] = []
    i = 0
    while i < len(line):
        if line[i].isspace():
            i += 1
            continue
        word: list[str] = []
        quoted = False
        while i < len(line) and (quoted or not line[i].isspace()):
            char = line[i]
            if char == '"':
                quoted = not quoted
                i += 1
            elif char == "\\":
                decoded, i = _c_unescape(line, i)
                word.append(decoded)
            else:
                word.append(char)
                i += 1
        if quoted:
            raise ValueError(f"unterminated quote in {line!r}")
        words.append(_undouble("".join(word), "$"))
    return words


def _undouble(text: str, char: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == char:
            if text[i + 1 : i + 2] != char:
                raise ValueError(f"systemd would expand {text[i : i + 2]!r} in {text!r}")
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "s": " ",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


def _c_unescape(line: str, i: int) -> tuple[str, int]:
    kind = line[i + 1 : i + 2]
    if kind in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[kind], i + 2
    for prefix, digits in (("x", 2), ("u", 4), ("U", 8)):
        if kind == prefix:
            return chr(int(line[i + 2 : i + 2 + digits], 16)), i + 2 + digits
    if kind.isdigit():
        return chr(int(line[i + 1 : i + 4], 8)), i + 4
    raise ValueError(f"unknown escape {line[i : i + 2]!r} in {line!r}")


# --- parsing ----------------------------------------------------------------


def test_the_nix_files_are_tracked() -> None:
    tracked = set(tracked_nix_files())
    expected = {
        "flake.nix",
        "modules/aegis.nix",
        "nixos-tests/aegis.nix",
        "pkgs/aegis/default.nix",
        "tests/nix/eval-flake.nix",
        "tests/nix/eval-module.nix",
    }
    assert expected <= tracked


@needs_nix
@pytest.mark.parametrize("path", tracked_nix_files())
def test_nix_file_parses(path: str) -> None:
    nix("--parse", path)


@needs_nix
@pytest.mark.parametrize("block", [b for b in blocks() if b.lang == "nix"], ids=str)
def test_the_docs_nix_blocks_parse(block: Block, tmp_path: Path) -> None:
    (tmp_path / "block.nix").write_text(block.text)
    try:
        nix("--parse", str(tmp_path / "block.nix"))
    except NixError as exc:
        raise AssertionError(f"{block}: {exc}") from None


def test_flake_lock_pins_nixos_26_05() -> None:
    lock = json.loads((REPO / "flake.lock").read_text())
    assert lock["version"] == 7
    node = lock["nodes"][lock["nodes"][lock["root"]]["inputs"]["nixpkgs"]]
    assert node["original"] == {
        "owner": "NixOS",
        "repo": "nixpkgs",
        "ref": "nixos-26.05",
        "type": "github",
    }
    locked = node["locked"]
    assert locked["rev"] == "b18a4b905f8d028dc4476412e6d6891728695379"
    assert (locked["owner"], locked["repo"], locked["type"]) == ("NixOS", "nixpkgs", "github")
    # Nix refuses a lock whose narHash is not an SRI SHA-256 of a source tree.
    assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked["narHash"])
    assert isinstance(locked["lastModified"], int)


# --- the module, evaluated with nixpkgs' lib --------------------------------


def test_service_runs_as_aegis_in_group_within(nixpkgs_lib: Path) -> None:
    service = eval_module(nixpkgs_lib, {})["service"]
    config = service["serviceConfig"]
    assert service["wantedBy"] == ["multi-user.target"]
    assert service["after"] == ["network.target"]
    assert config["User"] == "aegis"
    assert config["Group"] == "within"
    assert config["Restart"] == "on-failure"
    assert config["RestartSec"] == "30s"
    assert config["WorkingDirectory"] == "/srv/within/aegis"
    # Each scrape holds two descriptors: systemd's soft limit of 1024 is too low.
    assert config["LimitNOFILE"] == 65536


def test_runtime_directory_lets_group_within_reach_a_unix_listener(nixpkgs_lib: Path) -> None:
    config = eval_module(nixpkgs_lib, {})["service"]["serviceConfig"]
    assert config["RuntimeDirectory"] == "aegis"
    assert config["RuntimeDirectoryMode"] == "0750"


def test_user_and_group_are_declared(nixpkgs_lib: Path) -> None:
    result = eval_module(nixpkgs_lib, {})
    assert result["users"]["aegis"] == {
        "description": "Aegis metrics bridge",
        "isSystemUser": True,
        "group": "within",
        "home": "/srv/within/aegis",
        "createHome": True,
    }
    assert result["groups"] == ["within"]


def test_service_is_hardened_like_the_prometheus_exporters(nixpkgs_lib: Path) -> None:
    config = eval_module(nixpkgs_lib, {})["service"]["serviceConfig"]
    expected = {
        "CapabilityBoundingSet": [""],
        "DeviceAllow": [""],
        "LockPersonality": True,
        "MemoryDenyWriteExecute": True,
        "NoNewPrivileges": True,
        "PrivateDevices": True,
        "PrivateTmp": True,
        "ProtectClock": True,
        "ProtectControlGroups": True,
        "ProtectHome": True,
        "ProtectHostname": True,
        "ProtectKernelLogs": True,
        "ProtectKernelModules": True,
        "ProtectKernelTunables": True,
        "ProtectSystem": "strict",
        "RemoveIPC": True,
        "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"],
        "RestrictNamespaces": True,
        "RestrictRealtime": True,
        "RestrictSUIDSGID": True,
        "SystemCallArchitectures": "native",
        "UMask": "0077",
    }
    assert {key: config.get(key) for key in expected} == expected
    assert "AmbientCapabilities" not in config
    assert "DynamicUser" not in config


def test_targets_under_tmp_or_home_stay_visible(nixpkgs_lib: Path) -> None:
    settings = {
        "targets": {
            "tmp": {"socket": "/tmp/app/metrics.sock"},
            "home": {"socket": "/home/alice/app.sock"},
        }
    }
    config = eval_module(nixpkgs_lib, settings)["service"]["serviceConfig"]
    assert config["PrivateTmp"] is False
    assert config["ProtectHome"] == "read-only"


@pytest.mark.parametrize(
    "path",
    [
        "/tmp/web.yml",
        "/var/tmp/aegis/web.yml",
        "/home/alice/web.yml",
        "/root/web.yml",
        "/run/user/1000/web.yml",
    ],
)
def test_a_web_config_file_the_sandbox_hides_is_refused(nixpkgs_lib: Path, path: str) -> None:
    [message] = eval_module(nixpkgs_lib, {"webConfigFile": path})["failedAssertions"]
    assert f'within.services.aegis.webConfigFile is "{path}"' in message
    setting = "PrivateTmp" if "tmp/" in path else "ProtectHome"
    assert f"which the service cannot read: its unit has {setting} (" in message


@pytest.mark.parametrize(
    ("path", "socket"),
    [
        ("/tmp/web.yml", "/tmp/app/metrics.sock"),
        ("/var/tmp/aegis/web.yml", "/tmp/app/metrics.sock"),
        ("/home/alice/web.yml", "/home/alice/app.sock"),
        ("/run/user/1000/web.yml", "/root/app.sock"),
    ],
)
def test_a_web_config_file_where_a_served_socket_opens_the_sandbox_is_accepted(
    nixpkgs_lib: Path, path: str, socket: str
) -> None:
    """A socket under /tmp or /home makes the unit show those (PrivateTmp off, ProtectHome
    read-only), and the web configuration can then be read there too."""
    settings = {"webConfigFile": path, "targets": {"app": {"socket": socket}}}
    assert eval_module(nixpkgs_lib, settings)["failedAssertions"] == []


def test_a_socket_under_tmp_does_not_open_home_for_the_web_config(nixpkgs_lib: Path) -> None:
    settings = {"webConfigFile": "/root/web.yml", "targets": {"app": {"socket": "/tmp/a.sock"}}}
    [message] = eval_module(nixpkgs_lib, settings)["failedAssertions"]
    assert "its unit has ProtectHome (" in message


@pytest.mark.parametrize("path", ["/run/secrets/web.yml", "/etc/aegis/web.yml", "/srv/tmp/web.yml"])
def test_a_web_config_file_the_sandbox_shows_is_accepted(nixpkgs_lib: Path, path: str) -> None:
    assert eval_module(nixpkgs_lib, {"webConfigFile": path})["failedAssertions"] == []


def test_a_privileged_port_gets_only_net_bind_service(nixpkgs_lib: Path) -> None:
    config = eval_module(nixpkgs_lib, {"hostport": "[::]:80"})["service"]["serviceConfig"]
    assert config["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert config["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]


@pytest.mark.parametrize("sockdir", ["/srv/within/run", "/run/metrics"])
def test_sockdir_is_made_for_group_within(nixpkgs_lib: Path, sockdir: str) -> None:
    settings = {} if sockdir == "/srv/within/run" else {"sockdir": sockdir}
    tmpfiles = eval_module(nixpkgs_lib, settings)["tmpfiles"]
    assert tmpfiles == {
        "10-aegis": {sockdir: {"d": {"user": "root", "group": "within", "mode": "3770"}}}
    }


def test_exec_start_has_the_original_flags(nixpkgs_lib: Path) -> None:
    exec_start = eval_module(nixpkgs_lib, {})["service"]["serviceConfig"]["ExecStart"]
    assert systemd_words(exec_start) == [
        "/aegis-stub/bin/aegis",
        "-hostport",
        "[::1]:31337",
        "-sockdir",
        "/srv/within/run",
    ]


def test_exec_start_carries_targets_web_config_and_extra_flags(nixpkgs_lib: Path) -> None:
    awkward = 'a "quoted" 100% $HOME \\ back\tslash'
    settings = {
        "hostport": "127.0.0.1:9100",
        "sockdir": "/run/sockets",
        "targets": {
            "db": {"socket": "/run/db/metrics.sock"},
            "app": {"socket": "/run/app/app.sock", "path": "/debug/metrics"},
        },
        "webConfigFile": "/run/secrets/web.yml",
        "extraFlags": ["--log.level", "debug", "--web.external-url", awkward],
    }
    exec_start = eval_module(nixpkgs_lib, settings)["service"]["serviceConfig"]["ExecStart"]
    assert systemd_words(exec_start) == [
        "/aegis-stub/bin/aegis",
        "-hostport",
        "127.0.0.1:9100",
        "-sockdir",
        "/run/sockets",
        "--web.config.file",
        "/run/secrets/web.yml",
        "--target",
        "app=/run/app/app.sock,path=/debug/metrics",
        "--target",
        "db=/run/db/metrics.sock",
        "--log.level",
        "debug",
        "--web.external-url",
        awkward,
    ]


def test_a_targets_group_is_joined_by_the_unit_alone(nixpkgs_lib: Path) -> None:
    """A service whose socket is in a directory of its own with a group of its own: Aegis's
    unit joins that group (each group once, whichever targets name it), its user does not."""
    settings = {
        "targets": {
            "grafana": {"socket": "/run/grafana/grafana.sock", "group": "grafana"},
            "dashboards": {"socket": "/run/grafana/other.sock", "group": "grafana"},
            "db": {"socket": "/run/db/metrics.sock", "group": "db-metrics"},
            "plain": {"socket": "/run/plain/metrics.sock"},
        }
    }
    result = eval_module(nixpkgs_lib, settings)
    config = result["service"]["serviceConfig"]
    assert config["SupplementaryGroups"] == ["grafana", "db-metrics"]
    assert (config["User"], config["Group"]) == ("aegis", "within")
    assert result["users"]["aegis"]["group"] == "within"
    assert "extraGroups" not in result["users"]["aegis"]
    # Without a group, nothing is joined.
    plain = eval_module(nixpkgs_lib, {"targets": {"plain": settings["targets"]["plain"]}})
    assert "SupplementaryGroups" not in plain["service"]["serviceConfig"]


@pytest.mark.parametrize("group", ["", "two words", "%u", "a,b", "-x"])
def test_a_group_systemd_would_read_otherwise_is_refused(nixpkgs_lib: Path, group: str) -> None:
    settings = {"targets": {"db": {"socket": "/run/db/metrics.sock", "group": group}}}
    with pytest.raises(NixError, match=re.escape("within.services.aegis.targets.db.group")):
        eval_module(nixpkgs_lib, settings)


@pytest.mark.parametrize(
    ("settings", "ports"),
    [
        ({}, []),
        ({"openFirewall": True}, [31337]),
        ({"openFirewall": True, "hostport": "[::]:8080"}, [8080]),
        ({"openFirewall": True, "hostport": "0.0.0.0:65535"}, [65535]),
    ],
)
def test_open_firewall_opens_the_hostport_port(
    nixpkgs_lib: Path, settings: dict[str, Any], ports: list[int]
) -> None:
    assert eval_module(nixpkgs_lib, settings)["allowedTCPPorts"] == ports


@pytest.mark.parametrize(
    "hostport",
    ["[::1]:31337", "[::]:1", "127.0.0.1:31337", "localhost:65535", "[fe80::1%eth0]:9100"],
)
def test_good_hostport_passes_the_assertions(nixpkgs_lib: Path, hostport: str) -> None:
    assert eval_module(nixpkgs_lib, {"hostport": hostport})["failedAssertions"] == []


@pytest.mark.parametrize(
    "hostport",
    [
        "::1:31337",
        ":31337",
        "localhost",
        "localhost:",
        "localhost:0",
        "localhost:65536",
        "localhost:031337",
        "localhost:http",
        "[::1]",
        "[::1]31337",
        "[1.2.3.4]:80",
        "my host:80",
        "unix:/run/aegis.sock",
    ],
)
def test_bad_hostport_fails_an_assertion_that_says_why(nixpkgs_lib: Path, hostport: str) -> None:
    result = eval_module(nixpkgs_lib, {"hostport": hostport, "openFirewall": True})
    [message] = result["failedAssertions"]
    assert f'within.services.aegis.hostport is "{hostport}"' in message
    assert "host:port or [ipv6]:port with a port from 1 to 65535" in message
    assert result["allowedTCPPorts"] == []


@pytest.mark.parametrize(
    ("settings", "option"),
    [
        ({"sockdir": "run"}, "within.services.aegis.sockdir"),
        ({"targets": {"db": {"socket": "db.sock"}}}, "within.services.aegis.targets.db.socket"),
        (
            {"targets": {"db": {"socket": "/run/db.sock", "path": "metrics"}}},
            "within.services.aegis.targets.db.path",
        ),
    ],
)
def test_relative_paths_are_refused(
    nixpkgs_lib: Path, settings: dict[str, Any], option: str
) -> None:
    with pytest.raises(NixError, match=re.escape(option)):
        eval_module(nixpkgs_lib, settings)


def test_disabled_module_sets_nothing(nixpkgs_lib: Path) -> None:
    with pytest.raises(NixError, match=r"systemd\.services\.aegis"):
        eval_module(nixpkgs_lib, {"enable": False})


# --- the evaluated ExecStart, run ---------------------------------------------


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for_socket(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.is_socket():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture
def fake_exporters(tmp_path: Path) -> Iterator[dict[str, Path]]:
    sockets = {
        "local": tmp_path / "run" / "local.sock",
        "elsewhere": tmp_path / "elsewhere" / "app.sock",
    }
    paths = {"local": "/metrics", "elsewhere": "/internal/metrics"}
    processes = []
    for name, sock in sockets.items():
        sock.parent.mkdir()
        assert len(str(sock)) < 100, "Unix socket path too long for this tmp_path"
        processes.append(
            subprocess.Popen(
                [sys.executable, str(FAKE_EXPORTER), str(sock), name, paths[name]],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        for sock in sockets.values():
            wait_for_socket(sock)
        yield sockets
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


def test_evaluated_exec_start_serves_the_sockets(
    nixpkgs_lib: Path, tmp_path: Path, fake_exporters: dict[str, Path]
) -> None:
    installed = AEGIS
    if installed is None:
        pytest.skip("aegis is not installed on PATH")
    # The stub package's bin/aegis is the installed program, so the module's
    # lib.getExe resolves to it exactly as it would to the Nix-built one.
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "aegis").symlink_to(installed)
    port = free_port()
    settings = {
        "hostport": f"127.0.0.1:{port}",
        "sockdir": str(fake_exporters["local"].parent),
        "targets": {
            "elsewhere": {"socket": str(fake_exporters["elsewhere"]), "path": "/internal/metrics"}
        },
    }
    exec_start = eval_module(nixpkgs_lib, settings, str(prefix))["service"]["serviceConfig"][
        "ExecStart"
    ]
    argv = systemd_words(exec_start)
    assert argv[0] == str(prefix / "bin" / "aegis")

    workdir = tmp_path / "home"
    workdir.mkdir()
    log = tmp_path / "aegis.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, f"aegis exited: {log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"aegis did not listen: {log.read_text()}"
            time.sleep(0.1)

        assert get(f"{base}/local") == (200, b'aegis_fake_up{source="local"} 1\n')
        assert get(f"{base}/elsewhere") == (200, b'aegis_fake_up{source="elsewhere"} 1\n')
        assert get(f"{base}/nope")[0] == 404
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert f"127.0.0.1:{port} -> {settings['sockdir']}" in log.read_text()


# --- the package, with stub arguments ----------------------------------------

PACKAGE_PROBE = """
{ nixpkgsLib, root }:
let
  # lib.fileset reads file types with builtins.readFileType, which Nix 2.14
  # added; on an older Nix (Debian bookworm has 2.8) the same answer comes
  # from readDir of the parent, so lib is imported with that in scope.
  builtinsWithReadFileType = builtins // {
    readFileType =
      builtins.readFileType or (path: (builtins.readDir (dirOf path)).${baseNameOf path});
  };
  importWithReadFileType =
    path:
    scopedImport {
      builtins = builtinsWithReadFileType;
      import = importWithReadFileType;
    } path;
  lib = importWithReadFileType nixpkgsLib;

  package = import (root + "/pkgs/aegis/default.nix");
  stubs = lib.mapAttrs (name: _: name) (builtins.functionArgs package) // {
    # A derivation with outputs: its name as itself, "prometheus.cli" as cli.
    prometheus = { outPath = "prometheus"; cli = "prometheus.cli"; };
  };
  drv = package (stubs // {
    inherit lib;
    buildPythonPackage = attrs: attrs;
  });
  inherit (drv) src;
  # What src holds, found with its filter rather than by copying it.
  kept = path: type:
    src.filter (toString path) type
    && (dirOf path == src.origSrc || kept (dirOf path) "directory");
  files = lib.filter (path: kept path "regular") (lib.filesystem.listFilesRecursive src.origSrc);
in {
  inherit (drv) pname version pyproject sourceRoot build-system dependencies
    nativeCheckInputs enabledTestPaths pytestFlags pythonImportsCheck preCheck postCheck;
  inherit (drv.meta) mainProgram description platforms;
  license = drv.meta.license.spdxId;
  files = map (path: lib.removePrefix "${toString src.origSrc}/" (toString path)) files;
}
"""


def probe_package(nixpkgs_lib: Path, root: Path, tmp_path: Path) -> Any:
    """default.nix called on the repository at ``root``: its attributes and src's files."""
    probe = tmp_path / "probe.nix"
    probe.write_text(PACKAGE_PROBE)
    return json.loads(
        nix(
            "--eval",
            "--strict",
            "--json",
            str(probe),
            "--arg",
            "nixpkgsLib",
            str(nixpkgs_lib),
            "--arg",
            "root",
            str(root),
        )
    )


def test_package_source_is_the_project_and_its_tests(nixpkgs_lib: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for name, text in {
        "pkgs/aegis/default.nix": (REPO / "pkgs/aegis/default.nix").read_text(),
        "pkgs/aegis/pyproject.toml": '[project]\nname = "aegis"\nversion = "1.2.3"\n',
        "pkgs/aegis/aegis/__init__.py": "",
        "tests/pytest.ini": "[pytest]\n",
        "tests/conftest.py": "",
        "tests/test_proxy.py": "",
        "tests/test_nix.py": "",
        "tests/test_systemd.py": "",
        "tests/nix/eval-module.nix": "{ }",
        "modules/aegis.nix": "{ }",
        "flake.nix": "{ }",
        "README.md": "",
        "docs/operating.md": "",
        ".ci/run": "",
        ".gitignore": "",
        ".ci/other": "",
        # What `pip install -e` and running the tests leave in a checkout that is not a flake's
        # source (a flake's holds only what git tracks): callPackage on it must not take them.
        "pkgs/aegis/aegis.egg-info/PKG-INFO": "",
        "pkgs/aegis/aegis/__pycache__/__init__.cpython-311.pyc": "",
        "pkgs/aegis/build/lib/aegis/__init__.py": "",
        "tests/__pycache__/conftest.cpython-311.pyc": "",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    drv = probe_package(nixpkgs_lib, root, tmp_path)

    assert sorted(drv.pop("files")) == [
        ".ci/run",
        ".gitignore",
        "README.md",
        "docs/operating.md",
        "pkgs/aegis/aegis/__init__.py",
        "pkgs/aegis/pyproject.toml",
        "tests/conftest.py",
        "tests/pytest.ini",
        "tests/test_proxy.py",
    ]
    # From sourceRoot, ../.. is the top of the source, where tests/ is.
    assert drv.pop("sourceRoot") == "source/pkgs/aegis"
    # The command-line tests find the installed aegis, and run from the top.
    assert drv.pop("preCheck").split() == ["export", 'PATH="$out/bin:$PATH"', "pushd", "../.."]
    assert drv.pop("postCheck").strip() == "popd"
    assert drv.pop("description")
    platforms = drv.pop("platforms")
    assert {"x86_64-linux", "aarch64-linux"} <= set(platforms)
    assert not [system for system in platforms if "darwin" in system]
    assert drv == {
        "pname": "aegis",
        "version": "1.2.3",
        "pyproject": True,
        "build-system": ["setuptools"],
        "dependencies": ["aiohttp", "bcrypt", "httptools", "prometheus-client", "pyyaml", "uvloop"],
        "nativeCheckInputs": [
            "hypothesis",
            "prometheus",
            "prometheus.cli",
            "pytest-aiohttp",
            "pytestCheckHook",
            "trustme",
        ],
        "enabledTestPaths": ["tests"],
        "pytestFlags": ["-p", "no:cacheprovider"],
        "pythonImportsCheck": ["aegis"],
        "mainProgram": "aegis",
        "license": "MIT",
    }


# --- the Nix build's check phase, rehearsed ----------------------------------------------------

NOBODY = 65534
UNSHARE = shutil.which("unshare")
SETPRIV = shutil.which("setpriv")
IP = shutil.which("ip")


def tracked_files() -> list[str]:
    """What a flake's source holds: the files git tracks (as they are in the work tree)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: a flake's source is the files git tracks")
    return [name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def copy_files(names: list[str], dest: Path) -> None:
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)


def make_read_only(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444 | (path.stat().st_mode & 0o111))
    root.chmod(0o555)


def hidden_ancestor(path: Path) -> Path | None:
    """The first directory above ``path`` that other users cannot enter (such as /root)."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


def exposing(paths: list[Path], hold: Path) -> list[str]:
    """Shell lines, for a private mount namespace, that leave each of ``paths`` where it is
    but replace a closed directory above it (such as /root) with an open tmpfs holding only
    those paths: the installed interpreter and packages, as a build sandbox's store holds them."""
    lines = []
    by_ancestor: dict[Path, list[Path]] = {}
    for path in dict.fromkeys(paths):
        if (ancestor := hidden_ancestor(path)) is not None:
            by_ancestor.setdefault(ancestor, []).append(path)
    for n, (ancestor, inside) in enumerate(by_ancestor.items()):
        held = [hold / f"{n}-{i}" for i in range(len(inside))]
        for path, spot in zip(inside, held, strict=True):
            spot.mkdir()
            lines.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(spot))}")
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(ancestor))}")
        for path, spot in zip(inside, held, strict=True):
            lines.append(f"mkdir -p {shlex.quote(str(path))}")
            lines.append(f"mount --move {shlex.quote(str(spot))} {shlex.quote(str(path))}")
    return lines


def private_tmp(keep: list[Path]) -> list[str]:
    """Shell lines that give the namespace an empty /tmp of its own, as the build has, with each
    of ``keep`` that lies under the host's /tmp (the build directory; the checkout and its
    virtual environment, where CI cloned into /tmp) still in place; a tmpfs on /mnt holds them
    meanwhile."""
    tmp = Path("/tmp")
    inside = [path for path in dict.fromkeys(keep) if path.is_relative_to(tmp)]
    # A path under another one that is kept comes along with it.
    outer = [p for p in inside if not any(p != o and p.is_relative_to(o) for o in inside)]
    lines = ["mount -t tmpfs -o mode=0700 tmpfs /mnt"]
    for n, path in enumerate(outer):
        lines += [f"mkdir /mnt/{n}", f"mount --bind {shlex.quote(str(path))} /mnt/{n}"]
    lines.append("mount -t tmpfs -o mode=1777 tmpfs /tmp")
    for n, path in enumerate(outer):
        quoted = shlex.quote(str(path))
        # The directories above it are root's 0755, as /build's parents are.
        lines += [f"mkdir -p {quoted}", f"mount --move /mnt/{n} {quoted}"]
    return lines


@dataclass
class Sandbox:
    """Like the Nix build's: an unprivileged user, no network but loopback, a HOME that does
    not exist, and nothing of the host's but what the interpreter needs."""

    setup: list[str]
    env: dict[str, str]

    def run(self, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        assert UNSHARE is not None
        assert SETPRIV is not None
        assert IP is not None
        script = "\n".join(
            [
                "set -e",
                *self.setup,
                f"{IP} link set lo up",
                f"cd {shlex.quote(str(cwd))}",
                f'exec {SETPRIV} --reuid={NOBODY} --regid={NOBODY} --clear-groups -- env -i "$@"',
            ]
        )
        command = [f"{key}={value}" for key, value in self.env.items()] + argv
        return subprocess.run(
            [UNSHARE, "--mount", "--net", "--", "sh", "-c", script, "sh", *command],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )


@pytest.fixture
def build_dir() -> Iterator[Path]:
    """A directory the unprivileged user can enter (tmp_path's parents are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="aegis-check-phase-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in path.rglob("*"):
            if sub.is_dir() and not sub.is_symlink():
                sub.chmod(0o755)
        shutil.rmtree(path)


@pytest.mark.slow
def test_the_check_phase_passes_on_exactly_the_packaged_files(
    nixpkgs_lib: Path, tmp_path: Path, build_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user in a private namespace needs root")
    for tool, name in ((UNSHARE, "unshare"), (SETPRIV, "setpriv"), (IP, "ip")):
        if tool is None:
            pytest.skip(f"{name} is not installed (util-linux, iproute2)")
    if not Path("/mnt").is_dir():
        pytest.skip("no /mnt to hold the copy while /tmp is replaced")
    if AEGIS is None:
        pytest.skip("aegis is not installed")

    # What src selects, from default.nix itself, out of what the flake would see.
    checkout = tmp_path / "checkout"
    copy_files(tracked_files(), checkout)
    drv = probe_package(nixpkgs_lib, checkout, tmp_path)
    source = build_dir / "source"
    copy_files(drv["files"], source)
    make_read_only(source)
    [pushd] = re.findall(r"pushd (\S+)", drv["preCheck"])
    cwd = (build_dir / drv["sourceRoot"] / pushd).resolve()
    assert cwd.is_relative_to(source)

    hold = tmp_path / "hold"
    hold.mkdir()
    bin_dir = Path(AEGIS).parent
    needed = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), bin_dir.resolve()]
    needed.append(Path(aegis.__file__).resolve().parent.parent)
    # Nix runs the plain interpreter and finds the package and every dependency through
    # PYTHONPATH (the installed package's site-packages and each dependency's): so does this
    # copy, with the virtual environment's site-packages and the installed package's directory
    # (an editable install's .pth file is not read from PYTHONPATH). A test that replaced
    # PYTHONPATH for a child would lose the dependencies here as in the build.
    python = getattr(sys, "_base_executable", sys.executable)
    found = dict.fromkeys(
        [sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), str(needed[-1])]
    )
    sandbox = Sandbox(
        exposing(needed, hold) + private_tmp([build_dir, *needed]),
        {
            # preCheck puts the package's bin first on PATH; prometheus and promtool follow.
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": os.pathsep.join(found),
            "HOME": "/homeless-shelter",
            # As short as the build's /build: Unix socket paths under it are near their limit.
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
        },
    )

    where = sandbox.run([python, "-c", "import aegis; print(aegis.__file__)"], cwd)
    assert where.returncode == 0, where.stderr
    assert not Path(where.stdout.strip()).is_relative_to(build_dir), "the copy shadows aegis"

    # The check phase's pytest command; -q and -rs only shorten the output and list the skips.
    argv = [python, "-m", "pytest", *drv["pytestFlags"], "-q", "-rs"]
    result = sandbox.run([*argv, *drv["enabledTestPaths"]], cwd)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    skips = re.findall(r"^SKIPPED \[\d+\] ([^:]+:\d+): ?(.*)$", report, re.MULTILINE)
    unexplained = [where for where, reason in skips if len(reason.strip()) < 10]
    assert unexplained == [], report


def test_the_suite_collects_in_importlib_mode() -> None:
    """Newer pytestCheckHooks run --import-mode=importlib, which puts nothing on sys.path."""
    argv = ["--import-mode=importlib", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the flake's outputs, with a stub nixpkgs ------------------------------------


@pytest.fixture(scope="module")
def flake(nixpkgs_lib: Path) -> Any:
    return json.loads(
        nix(
            "--eval",
            "--strict",
            "--json",
            str(EVAL_FLAKE),
            "--argstr",
            "nixpkgsLib",
            str(nixpkgs_lib),
        )
    )


def test_flake_outputs_are_wired_for_each_system(flake: Any) -> None:
    systems = ["aarch64-linux", "x86_64-linux"]
    assert flake["inputs"] == "github:NixOS/nixpkgs/nixos-26.05"
    assert flake["systems"] == dict.fromkeys(
        ["apps", "checks", "devShells", "formatter", "packages"], systems
    )
    for system in systems:
        assert flake["packages"][system] == {
            "aegis": f"aegis-{system}",
            "default": f"aegis-{system}",
        }
        assert flake["aegisIsApplication"][system] is True
        assert flake["apps"][system] == {
            "type": "app",
            "program": f"/stub/aegis-{system}/bin/aegis",
            "meta": {"description": "stub description"},
        }
        assert flake["checks"][system] == {"aegis": f"aegis-{system}", "vm": f"vm-{system}"}
        assert flake["formatter"][system] == "nixfmt-tree"
    assert flake["aegisSource"] == str(REPO / "pkgs" / "aegis")
    assert flake["vmImports"] == [str(REPO / "nixos-tests" / "aegis.nix")]
    assert flake["nixosModules"] == ["aegis", "default"]


def test_dev_shell_has_what_the_suite_imports(flake: Any) -> None:
    """``nix develop`` then ``python -m pytest tests``: the package's dependencies (from its
    Nix expression) and the test extras pyproject.toml lists, with the checkout importable."""
    project = tomllib.loads((REPO / "pkgs" / "aegis" / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = {re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0].lower() for spec in wanted}
    assert sorted(flake["devShell"]["pythonPackages"]) == sorted(names)
    assert 'PYTHONPATH="$PWD/pkgs/aegis' in flake["devShell"]["shellHook"]


def test_overlay_adds_the_library_and_the_application(flake: Any) -> None:
    assert flake["overlay"] == {
        "keepsOtherExtensions": True,
        "pythonAegis": str(REPO / "pkgs" / "aegis"),
        "aegisIsApplication": True,
    }


def test_flake_module_runs_the_flakes_package_without_the_overlay(flake: Any) -> None:
    assert systemd_words(flake["moduleExecStart"])[0] == "/stub/aegis-x86_64-linux/bin/aegis"


# --- the VM test's script ------------------------------------------------------


def test_vm_test_script_is_valid_python(nixpkgs_lib: Path, tmp_path: Path) -> None:
    script = json.loads(
        nix(
            "--eval",
            "--strict",
            "--json",
            "--expr",
            f"(import ./nixos-tests/aegis.nix {{ lib = import {nixpkgs_lib}; }}).testScript",
        )
    )
    compile(script, "testScript", "exec")
    ruff = shutil.which("ruff")
    if ruff is None:
        return
    path = tmp_path / "test_script.py"
    path.write_text(script)
    # The driver provides these names; anything else undefined is a bug.
    driver_names = '["start_all", "server", "prometheus", "subtest"]'
    subprocess.run(
        [
            ruff,
            "check",
            "--isolated",
            "--select",
            "F,E9",
            "--config",
            f"builtins = {driver_names}",
            str(path),
        ],
        check=True,
    )
