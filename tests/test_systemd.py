"""The NixOS module's own unit under a real systemd: Debian's, booted in systemd-nspawn.

Two systems are booted, each test running on both: this machine's own (Debian 12, systemd 252,
the tests' Python) and the Debian 13 root that ``.ci/debian13`` makes (systemd 257, Python 3.13,
as nixpkgs 26.05 has them), running the aegis installed in that root's venv with nixpkgs'
versions of the dependencies.

modules/aegis.nix, evaluated with nixpkgs' real lib (tests/nix/eval-module.nix, as in
test_nix.py), gives systemd.services.aegis, users.users, users.groups and
systemd.tmpfiles.settings. They are written here as a unit file, a sysusers.d and a tmpfiles.d
file, as NixOS writes them, and bound into a container that boots the system's /usr
(``--directory=/ --volatile=yes`` for this machine's) into a target of its own, so that only the
units under test start. The container shares the host's network: the test scrapes Aegis from
outside.

The package: the module is evaluated with its store path at PACKAGE, whose bin/aegis, written
here, runs an installed aegis, as Nix's Python wrapper runs a store interpreter on the store's
packages. On this machine that is the interpreter running these tests on the packages they
import, whose prefix and package directories are bound into the container under
/opt/aegis-test, because the unit's ProtectHome hides /root and /home and its PrivateTmp hides
/tmp. In the Debian 13 root it is the root's venv, which --volatile=yes keeps: it is under /usr.
Every other setting is the module's, as rendered. What NixOS adds besides (Environment=PATH and
friends, the wantedBy symlinks) is left out: the test's target wants the units instead.

Root only; needs systemd-nspawn (Debian: systemd-container) and nix-instantiate with a nixpkgs
lib. The container is always torn down, and every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
from aegisrun import child_pids, free_port
from nixeval import REPO, eval_module, find_nixpkgs_lib

import aegis

NSPAWN = shutil.which("systemd-nspawn")
NSENTER = shutil.which("nsenter")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        Path("/etc/aegis-ci-root").is_file(),
        reason="inside the Debian 13 root of .ci/debian13: the host's run of this file boots it",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="booting a container with systemd-nspawn needs root"
    ),
    pytest.mark.skipif(
        NSPAWN is None, reason="systemd-nspawn is not installed (Debian package systemd-container)"
    ),
    pytest.mark.skipif(NSENTER is None, reason="nsenter is not installed (util-linux)"),
]

OPT = "/opt/aegis-test"
PACKAGE = f"{OPT}/package"
SOCKDIR = "/srv/within/run"
LOCAL_SOCKET = f"{SOCKDIR}/local.sock"
# A service that keeps its socket in a runtime directory of its own, 0750 with a group of its
# own: Aegis reaches it only by joining that group (the module's targets.<name>.group).
GROUPED = "fake-grouped"
GROUPED_SOCKET = f"/run/{GROUPED}/metrics.sock"
LISTEN_SOCKET = "/run/aegis/aegis.sock"
WEB_DIR = "/etc/aegis"
TARGET = "aegis-test.target"
USER, PASSWORD = "prometheus", "scrape-secret"
# Where .ci/debian13 makes the Debian 13 root, and the venv in it with nixpkgs' versions.
DEBIAN13 = Path(os.environ.get("AEGIS_DEBIAN13_ROOT", "/var/cache/aegis-ci/debian13"))
DEBIAN13_VENV = "/usr/local/aegis-ci/nixpkgs"
BOOT_WITHIN = 90.0
# Without systemd as the host's init there is no machined to register with and no manager to ask
# for a scope: the container then stays in the test's own cgroup.
HOST_WITHOUT_SYSTEMD = (
    [] if Path("/run/systemd/system").is_dir() else ["--register=no", "--keep-unit"]
)


# --- the module's settings as the files NixOS writes ------------------------------------------


def unit_value(value: bool | int | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_unit(service: dict[str, Any]) -> str:
    """systemd.services.<name> as a unit file: a list gives one line per element, as NixOS's
    attrsToSection does, which is how CapabilityBoundingSet = [ "" ] resets the set."""
    lines = ["[Unit]", f"Description={service['description']}"]
    lines += [f"After={unit}" for unit in service["after"]]
    lines.append("[Service]")
    for key, value in service["serviceConfig"].items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key}={unit_value(item)}")
    return "\n".join(lines) + "\n"


def render_sysusers(users: dict[str, Any], groups: list[str]) -> str:
    lines = [f"g {group} -" for group in groups]
    for name, user in users.items():
        assert user["isSystemUser"], f"{name}: only system users are rendered"
        lines.append(f'u {name} -:{user["group"]} "{user["description"]}" {user["home"]}')
    return "\n".join(lines) + "\n"


def render_tmpfiles(settings: dict[str, Any], users: dict[str, Any]) -> str:
    lines = []
    for entries in settings.values():
        for path, rules in entries.items():
            for kind, rule in rules.items():
                lines.append(f"{kind} {path} {rule['mode']} {rule['user']} {rule['group']} -")
    # NixOS's createHome makes the home directory 0700, owned by the user and its group.
    for name, user in users.items():
        if user["createHome"]:
            lines.append(f"d {user['home']} 0700 {name} {user['group']} -")
    return "\n".join(lines) + "\n"


# --- the tests' interpreter and packages, as the container sees them -------------------------


@dataclass
class Installed:
    """Host directories to bind into the container, and the interpreter there."""

    binds: dict[str, Path] = field(default_factory=dict)
    python: str = ""
    library_path: str = ""
    sys_path: list[str] = field(default_factory=list)

    def visible(self, host: Path, name: str) -> str:
        """Where ``host`` is inside: itself under /usr (the container's own), else bound."""
        if host.is_relative_to("/usr"):
            return str(host)
        inside = f"{OPT}/{name}"
        self.binds[inside] = host
        return inside


def installed_here() -> Installed:
    found = Installed()
    base = Path(sys.base_prefix).resolve()
    executable = Path(sys.executable).resolve()
    if not executable.is_relative_to(base):
        pytest.skip(f"the interpreter {executable} is outside its prefix {base}")
    prefix = found.visible(base, "python")
    found.python = f"{prefix}/{executable.relative_to(base)}"
    if prefix != str(base) and list((base / "lib").glob("libpython*.so*")):
        # A shared libpython is found through the build's absolute RUNPATH, which moved.
        found.library_path = f"{prefix}/lib"
    package_root = Path(aegis.__file__).resolve().parent.parent
    tests = REPO / "tests"
    directories = [package_root] + [
        Path(entry).resolve() for entry in sys.path if entry and Path(entry).is_dir()
    ]
    for directory in dict.fromkeys(directories):
        if directory.is_relative_to(base) or directory.is_relative_to(tests):
            continue  # the interpreter finds its own; the tests are not the package
        found.sys_path.append(found.visible(directory, f"path{len(found.sys_path)}"))
    return found


def package_here(installed: Installed) -> dict[str, str]:
    """PACKAGE's bin/aegis and bin/python, running the tests' interpreter and packages."""
    [entry] = [e for e in metadata.entry_points(group="console_scripts") if e.name == "aegis"]
    module, _, function = entry.value.partition(":")
    environment = f"LD_LIBRARY_PATH={installed.library_path} " if installed.library_path else ""
    return {
        "bin/python": f'#!/bin/sh\n{environment}exec {installed.python} -s "$@"\n',
        "bin/aegis": f'#!/bin/sh\nexec {PACKAGE}/bin/python {PACKAGE}/lib/aegis "$@"\n',
        "lib/aegis": (
            "import sys\n"
            f"sys.path[0:1] = {installed.sys_path!r}\n"
            f"from {module} import {function}\n"
            f"sys.exit({function}())\n"
        ),
    }


def package_in_venv(venv: str) -> dict[str, str]:
    """PACKAGE's bin/aegis and bin/python, running a venv's."""
    return {
        "bin/python": f'#!/bin/sh\nexec {venv}/bin/python -s "$@"\n',
        "bin/aegis": f'#!/bin/sh\nexec {venv}/bin/aegis "$@"\n',
    }


def debian13_root() -> Path | str:
    """The Debian 13 root with this checkout's aegis installed in its venv, or why there is none.
    A venv installed from other sources would test other code under the same name."""
    if not (DEBIAN13 / "etc" / "aegis-ci-root").is_file():
        return f"no Debian 13 root at {DEBIAN13} (.ci/debian13 root makes one)"
    venv = DEBIAN13 / DEBIAN13_VENV.lstrip("/")
    how = "(.ci/debian13 venv nixpkgs .ci/nixpkgs-26.05.txt installs it)"
    installed = list(venv.glob("lib/python3*/site-packages/aegis"))
    if len(installed) != 1 or not (venv / "bin" / "aegis").is_file():
        return f"no aegis in a venv at {venv} {how}"
    source = REPO / "pkgs" / "aegis" / "aegis"
    names = {p.name for p in source.glob("*.py")} | {p.name for p in installed[0].glob("*.py")}
    differ = sorted(
        name
        for name in names
        if not (source / name).is_file()
        or not (installed[0] / name).is_file()
        or (source / name).read_bytes() != (installed[0] / name).read_bytes()
    )
    if differ:
        return f"the aegis in {venv} is not this checkout's ({', '.join(differ)}) {how}"
    return DEBIAN13


def write_package(root: Path, files: dict[str, str]) -> None:
    """PACKAGE's files, and the fake exporter."""
    files = files | {
        "lib/fake_exporter.py": (REPO / "nixos-tests" / "fake_exporter.py").read_text(),
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if name.startswith("bin/") else 0o644)
    for directory in (root, root / "bin", root / "lib"):
        directory.chmod(0o755)


def write_web_config(root: Path) -> trustme.CA:
    """TLS and basic auth, in a directory user aegis can read."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(root / "server.crt")
    server.private_key_pem.write_to_path(root / "server.key")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (root / "web.yml").write_text(
        "tls_server_config:\n"
        f"  cert_file: {WEB_DIR}/server.crt\n"
        f"  key_file: {WEB_DIR}/server.key\n"
        "basic_auth_users:\n"
        f"  {USER}: '{hashed}'\n"
    )
    for path in root.iterdir():
        path.chmod(0o644)  # a throwaway key; a real one would be 0640 root:within
    root.chmod(0o755)
    return ca


# --- the container ---------------------------------------------------------------------------


class Container:
    """One booted container; commands run in it with nsenter."""

    def __init__(self, name: str, directory: Path, binds: dict[str, Path], log: Path) -> None:
        assert NSPAWN is not None
        self.log = log
        argv = [
            NSPAWN,
            "--quiet",
            *HOST_WITHOUT_SYSTEMD,
            f"--directory={directory}",
            "--volatile=yes",
            f"--machine={name}",
            *(f"--bind-ro={host}:{inside}" for inside, host in binds.items()),
            "--boot",
            "systemd.firstboot=off",
            f"systemd.unit={TARGET}",
        ]
        with log.open("wb") as out:
            self.nspawn = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def init_pid(self) -> int:
        deadline = time.monotonic() + 30
        while not (children := child_pids(self.nspawn.pid)):
            assert self.nspawn.poll() is None, f"systemd-nspawn exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no container init:\n{self.output()}"
            time.sleep(0.1)
        return children[0]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert NSENTER is not None
        result = subprocess.run(
            [NSENTER, f"--target={self.init_pid()}", "--all", "--", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert result.returncode == 0, f"{argv} failed: {result.stdout}{result.stderr}"
        return result

    def out(self, *argv: str) -> str:
        return self.run(*argv).stdout.strip()

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        text = self.out("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in text.splitlines())

    def wait_booted(self) -> None:
        """Until systemd has reached the test's target (its bus is not there before it runs)."""
        deadline = time.monotonic() + BOOT_WITHIN
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state == "running":
                return
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            assert state != "degraded", f"units failed at boot: {failed}\n{self.output()}"
            assert time.monotonic() < deadline, f"system is {state!r}:\n{self.output()}"
            time.sleep(0.2)

    def wait_active(self, unit: str, within: float = BOOT_WITHIN) -> dict[str, str]:
        deadline = time.monotonic() + within
        while (state := self.show(unit, "ActiveState", "MainPID"))["ActiveState"] != "active":
            assert state["ActiveState"] != "failed", self.journal(unit)
            assert time.monotonic() < deadline, f"{unit} is {state}:\n{self.journal(unit)}"
            time.sleep(0.2)
        return state

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def terminate(self) -> None:
        """Shut the container down (nspawn passes SIGTERM on as a clean shutdown), or kill it."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)


@dataclass
class Booted:
    container: Container
    port: int
    ca: trustme.CA
    rendered: dict[str, Any]

    def scrape(self, path: str, auth: bool = True) -> tuple[int, bytes]:
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}")
        if auth:
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        try:
            with urllib.request.urlopen(request, timeout=15, context=context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def connect_as(self, user: str, group: str, path: str) -> str:
        """Connecting to a Unix socket as ``user``: "ok" or the errno's name."""
        probe = (
            "import errno, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\n    print('ok')\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
        )
        return self.container.out(
            "setpriv",
            f"--reuid={user}",
            f"--regid={group}",
            "--init-groups",
            f"{PACKAGE}/bin/python",
            "-c",
            probe,
            path,
        )


FAKE_LOCAL = f"""[Unit]
Description=Fake local metrics on {LOCAL_SOCKET}
[Service]
ExecStart={PACKAGE}/bin/python {PACKAGE}/lib/fake_exporter.py {LOCAL_SOCKET} local
User=fake-exporter
Group=within
# Group within must be able to connect.
UMask=0007
"""

FAKE_GROUPED = f"""[Unit]
Description=Fake metrics on {GROUPED_SOCKET}, for group {GROUPED} only
[Service]
ExecStart={PACKAGE}/bin/python {PACKAGE}/lib/fake_exporter.py {GROUPED_SOCKET} grouped
User={GROUPED}
Group={GROUPED}
RuntimeDirectory={GROUPED}
RuntimeDirectoryMode=0750
UMask=0007
"""


@pytest.fixture(scope="module", params=["debian12-host", "debian13"])
def booted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Booted]:
    lib = find_nixpkgs_lib()
    if isinstance(lib, str):
        pytest.skip(lib)
    if request.param == "debian13":
        system = debian13_root()
        if isinstance(system, str):
            pytest.skip(system)
        package, package_binds = package_in_venv(DEBIAN13_VENV), {}
    else:
        system = Path("/")
        installed = installed_here()
        package, package_binds = package_here(installed), installed.binds
    tmp = tmp_path_factory.mktemp(f"nspawn-{request.param}")
    port = free_port()
    rendered = eval_module(
        lib,
        {
            "hostport": f"127.0.0.1:{port}",
            "webConfigFile": f"{WEB_DIR}/web.yml",
            "extraFlags": ["--web.listen-address", f"unix:{LISTEN_SOCKET}"],
            "targets": {"grouped": {"socket": GROUPED_SOCKET, "group": GROUPED}},
        },
        PACKAGE,
    )
    assert rendered["failedAssertions"] == []
    users = rendered["users"] | {
        "fake-exporter": {
            "isSystemUser": True,
            "group": "within",
            "description": "fake exporter",
            "home": "/",
            "createHome": False,
        },
        GROUPED: {
            "isSystemUser": True,
            "group": GROUPED,
            "description": "fake exporter with a group of its own",
            "home": "/",
            "createHome": False,
        },
    }
    files = {
        "system/aegis.service": render_unit(rendered["service"]),
        "system/fake-local.service": FAKE_LOCAL,
        f"system/{GROUPED}.service": FAKE_GROUPED,
        f"system/{TARGET}": (
            "[Unit]\nDescription=Aegis under test\n"
            f"Wants=aegis.service fake-local.service {GROUPED}.service\n"
        ),
        "sysusers.d/aegis.conf": render_sysusers(users, [*rendered["groups"], GROUPED]),
        "tmpfiles.d/aegis.conf": render_tmpfiles(rendered["tmpfiles"], users),
    }
    for name, text in files.items():
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_text(text)
    (tmp / "web").mkdir()
    ca = write_web_config(tmp / "web")
    write_package(tmp / "package", package)
    binds = package_binds | {
        "/etc/systemd/system": tmp / "system",
        "/etc/sysusers.d": tmp / "sysusers.d",
        "/etc/tmpfiles.d": tmp / "tmpfiles.d",
        WEB_DIR: tmp / "web",
        PACKAGE: tmp / "package",
    }
    for directory in binds.values():
        if directory.is_relative_to(tmp):  # the host's own directories stay as they are
            directory.chmod(0o755)

    container = Container(
        f"aegis-test-{os.getpid()}-{request.param}", system, binds, tmp / "nspawn.log"
    )
    try:
        container.wait_booted()
        container.wait_active("fake-local.service")
        container.wait_active(f"{GROUPED}.service")
        container.wait_active("aegis.service")
        booted = Booted(container, port, ca, rendered)
        deadline = time.monotonic() + 30
        while booted_scrape_fails(booted):
            assert time.monotonic() < deadline, container.journal("aegis.service")
            time.sleep(0.2)
        yield booted
    finally:
        container.terminate()


def booted_scrape_fails(booted: Booted) -> bool:
    try:
        return booted.scrape("/-/healthy")[0] != 200
    except OSError:
        return True


# --- what a NixOS host would show ------------------------------------------------------------


def test_systemd_accepts_every_setting_of_the_rendered_unit(booted: Booted) -> None:
    # systemd ignores, with a warning, a key it does not know or a value it cannot parse; when
    # it loads units at boot, before journald runs, the warning goes to the console only.
    console = re.sub(r"\x1b\[[0-9;]*m", "", booted.container.output())
    boot_log = booted.container.out("journalctl", "--no-pager", "-o", "cat", "-b")
    lines = console.splitlines() + boot_log.splitlines()
    assert [line for line in lines if "aegis.service:" in line] == []
    assert booted.container.out("systemctl", "cat", "aegis.service").endswith(
        render_unit(booted.rendered["service"]).strip()
    )


def test_the_fake_exporter_puts_a_group_socket_in_the_socket_directory(booted: Booted) -> None:
    stat = booted.container.out("stat", "-c", "%U:%G %a", SOCKDIR, LOCAL_SOCKET)
    assert stat.splitlines() == ["root:within 3770", "fake-exporter:within 770"]


def test_aegis_runs_as_aegis_with_the_modules_hardening(booted: Booted) -> None:
    main = booted.container.show("aegis.service", "MainPID")["MainPID"]
    status = booted.container.out("cat", f"/proc/{main}/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    owner = booted.container.out("stat", "-c", "%U:%G", f"/proc/{main}")
    assert owner == "aegis:within"
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # the system-call filter
    assert fields["CapBnd"] == fields["CapEff"] == fields["CapPrm"] == "0" * 16
    limit = booted.rendered["service"]["serviceConfig"]["LimitNOFILE"]
    assert booted.container.show("aegis.service", "LimitNOFILE") == {"LimitNOFILE": str(limit)}
    # systemd sets the closest the container allows: it cannot exceed what it inherited.
    effective = min(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    limits = booted.container.out("cat", f"/proc/{main}/limits")
    assert re.search(rf"Max open files\s+{effective}\s+{effective}\s", limits), limits
    # What systemd made of each hardening setting of the rendered unit.
    config = booted.rendered["service"]["serviceConfig"]
    expected = {
        key: "yes" if value is True else "no" if value is False else str(value)
        for key, value in config.items()
        if key.startswith(("Protect", "Private", "Restrict", "Lock", "Memory", "NoNew", "Remove"))
        and key != "RestrictAddressFamilies"
    }
    assert booted.container.show("aegis.service", *expected) == expected
    shown = booted.container.show(
        "aegis.service", "RestrictAddressFamilies", "CapabilityBoundingSet", "UMask", "User"
    )
    assert sorted(shown["RestrictAddressFamilies"].split()) == sorted(
        config["RestrictAddressFamilies"]
    )
    assert shown["CapabilityBoundingSet"] == ""
    assert shown["UMask"] == config["UMask"]
    assert shown["User"] == "aegis"


def proc_status_files(booted: Booted) -> list[str]:
    listing = booted.container.out("ls", "/proc")
    return [f"/proc/{name}/status" for name in listing.split() if name.isdigit()]


def test_aegis_is_one_process_on_uvloop(booted: Booted) -> None:
    main = booted.container.show("aegis.service", "MainPID")["MainPID"]
    children = booted.container.run(
        "grep", "-lE", f"^PPid:[[:space:]]+{main}$", *proc_status_files(booted), check=False
    ).stdout.split()
    assert children == []
    assert "/uvloop/loop." in booted.container.out("cat", f"/proc/{main}/maps")


def test_the_host_scrapes_the_socket_over_tls_with_basic_auth(booted: Booted) -> None:
    assert booted.scrape("/local") == (200, b'aegis_fake_up{source="local"} 1\n')
    assert booted.scrape("/local", auth=False)[0] == 401
    assert booted.scrape("/nope")[0] == 404


def test_nobody_cannot_reach_the_sockets(booted: Booted) -> None:
    assert booted.connect_as("nobody", "nogroup", LOCAL_SOCKET) == "EACCES"
    assert booted.connect_as("nobody", "nogroup", LISTEN_SOCKET) == "EACCES"
    # A member of group within can, as the documentation of extraFlags says.
    assert booted.connect_as("fake-exporter", "within", LISTEN_SOCKET) == "ok"


def test_the_unix_listener_has_the_documented_owner_and_mode(booted: Booted) -> None:
    stat = booted.container.out("stat", "-c", "%U:%G %a", "/run/aegis", LISTEN_SOCKET)
    assert stat.splitlines() == ["aegis:within 750", "aegis:within 660"]


def test_a_service_with_a_group_of_its_own_is_reached_through_the_units_group(
    booted: Booted,
) -> None:
    container = booted.container
    stat = container.out("stat", "-c", "%U:%G %a", f"/run/{GROUPED}", GROUPED_SOCKET)
    assert stat.splitlines() == [f"{GROUPED}:{GROUPED} 750", f"{GROUPED}:{GROUPED} 770"]
    # Aegis's user and group alone cannot reach it; the unit joins the service's group.
    assert booted.connect_as("aegis", "within", GROUPED_SOCKET) == "EACCES"
    shown = container.show("aegis.service", "SupplementaryGroups")
    assert shown == {"SupplementaryGroups": GROUPED}
    main = container.show("aegis.service", "MainPID")["MainPID"]
    status = container.out("cat", f"/proc/{main}/status")
    [groups] = [
        line.split(":", 1)[1].split() for line in status.splitlines() if line.startswith("Groups:")
    ]
    gid = container.out("getent", "group", GROUPED).split(":")[2]
    assert gid in groups
    assert booted.scrape("/grouped") == (200, b'aegis_fake_up{source="grouped"} 1\n')


def unit_argv(container: Container) -> list[str]:
    """The unit's command line, as systemd runs it."""
    shown = container.out("systemctl", "show", "--property=ExecStart", "--value", "aegis.service")
    found = re.search(r"argv\[\]=(.*?) ;", shown)
    assert found, shown
    return found[1].split()


def aegis_check(container: Container, *identity: str) -> tuple[int, dict[str, Any]]:
    """``aegis check`` with the unit's own flags, as the user and groups ``identity`` gives
    (setpriv's arguments: runuser would need PAM's configuration, which the volatile container
    does not have)."""
    argv = unit_argv(container)
    done = container.run(
        "setpriv", *identity, argv[0], "check", *argv[1:], "--output", "json", check=False
    )
    assert done.stdout, f"aegis check printed nothing (status {done.returncode}): {done.stderr}"
    return done.returncode, json.loads(done.stdout)


def test_aegis_check_as_the_unit_finds_every_target_fine(booted: Booted) -> None:
    # As the unit runs: user aegis, group within, and the targets' groups.
    as_the_unit = ("--reuid=aegis", "--regid=within", f"--groups={GROUPED}")
    status, report = aegis_check(booted.container, *as_the_unit)
    results = {target["name"]: target["result"] for target in report["targets"]}
    assert (status, report["ok"], results) == (0, True, {"grouped": "ok", "local": "ok"}), report
    user, _, groups = report["user"].partition(" in groups ")
    assert (user, set(groups.split(","))) == ("aegis", {"within", GROUPED})
    by_name = {target["name"]: target for target in report["targets"]}
    assert (by_name["grouped"]["owner"], by_name["grouped"]["group"]) == (GROUPED, GROUPED)
    assert by_name["grouped"]["prometheus3"] is True
    # Aegis's user with its own groups only, as `sudo -u aegis` gives: the grouped socket is out
    # of reach, and the check says so.
    status, report = aegis_check(
        booted.container, "--reuid=aegis", "--regid=within", "--init-groups"
    )
    results = {target["name"]: target["result"] for target in report["targets"]}
    assert (status, results) == (1, {"grouped": "permission", "local": "ok"}), report


def documented_exposure() -> float:
    text = (REPO / "docs" / "nixos.md").read_text()
    found = re.search(r"`systemd-analyze security aegis\.service` rates it \*\*(\d+\.\d)\*\*", text)
    assert found, "docs/nixos.md records no exposure figure"
    return float(found[1])


def test_the_exposure_is_at_most_the_documented_one(booted: Booted) -> None:
    report = booted.container.out("systemd-analyze", "security", "--no-pager", "aegis.service")
    found = re.search(r"Overall exposure level for aegis\.service: (\d+\.\d)", report)
    assert found, report
    assert float(found[1]) <= documented_exposure(), report


def test_a_killed_aegis_restarts_after_restart_sec(booted: Booted) -> None:
    container = booted.container
    restart_sec = booted.rendered["service"]["serviceConfig"]["RestartSec"]
    assert container.show("aegis.service", "RestartUSec")["RestartUSec"] == restart_sec
    seconds = float(restart_sec.removesuffix("s"))
    before = container.show("aegis.service", "MainPID", "NRestarts")
    container.out("kill", "-KILL", before["MainPID"])
    killed = time.monotonic()
    # Until systemd has seen the death: until then the unit still shows active.
    while container.show("aegis.service", "ActiveState")["ActiveState"] == "active":
        assert time.monotonic() - killed < 10, container.journal("aegis.service")
        time.sleep(0.05)
    after = container.wait_active("aegis.service", within=seconds + 60)
    assert time.monotonic() - killed >= seconds - 1
    assert after["MainPID"] != before["MainPID"]
    restarts = container.show("aegis.service", "NRestarts")["NRestarts"]
    assert int(restarts) == int(before["NRestarts"]) + 1
    deadline = time.monotonic() + 30
    while booted_scrape_fails(booted):
        assert time.monotonic() < deadline, container.journal("aegis.service")
        time.sleep(0.2)
    assert booted.scrape("/local")[0] == 200


def test_stopping_aegis_leaves_it_inactive_not_failed(booted: Booted) -> None:
    container = booted.container
    container.out("systemctl", "stop", "aegis.service")
    state = container.show("aegis.service", "ActiveState", "Result")
    assert state == {"ActiveState": "inactive", "Result": "success"}, container.journal(
        "aegis.service"
    )
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", booted.port), timeout=5).close()
    container.out("systemctl", "start", "aegis.service")
    container.wait_active("aegis.service")
