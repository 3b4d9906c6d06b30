"""Explicit targets: --config.file, --target, and how their mistakes are reported."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiohttp import web

from aegis.cli import main
from aegis.config import ConfigError
from aegis.configfile import load_targets
from aegis.targets import Target
from conftest import AegisFactory, Upstreams


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aegis.yml"
    path.write_text(text)
    return path


def test_config_file_targets_with_default_and_given_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "targets:\n"
        "  node:\n    socket: /run/node/metrics.sock\n"
        "  app:\n    socket: /run/app/admin.sock\n    path: /internal/metrics\n",
    )
    assert load_targets(path) == {
        "node": Target("node", Path("/run/node/metrics.sock"), "/metrics"),
        "app": Target("app", Path("/run/app/admin.sock"), "/internal/metrics"),
    }


def test_empty_config_file_has_no_targets(tmp_path: Path) -> None:
    assert load_targets(write(tmp_path, "")) == {}
    assert load_targets(write(tmp_path, "targets:\n")) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("target:\n  a: {socket: /s}\n", r"aegis\.yml: target: unknown key"),
        ("targets:\n  a: {sokcet: /s}\n", r"aegis\.yml: targets\.a\.sokcet: unknown key"),
        ("targets:\n  a: {path: /m}\n", r"aegis\.yml: targets\.a: missing socket"),
        ("targets:\n  a: {socket: run/a.sock}\n", r"aegis\.yml: targets\.a: .*not absolute"),
        ("targets:\n  a: {socket: /s, path: metrics}\n", r"targets\.a: .*must start with '/'"),
        ("targets:\n  -bad: {socket: /s}\n", r"aegis\.yml: targets\.-bad: bad target name"),
        ("targets:\n  a: {socket: 7}\n", r"aegis\.yml: targets\.a\.socket: must be a non-empty"),
        ("targets:\n  a: /s\n", r"aegis\.yml: targets\.a: must be a mapping"),
        ("targets: [a]\n", r"aegis\.yml: targets: must be a mapping"),
        ("targets:\n  a: {socket: /s}\n  a: {socket: /t}\n", r"aegis\.yml: .*'a' given twice"),
        ("targets: {a: [}\n", r"aegis\.yml: not valid YAML"),
    ],
)
def test_config_file_errors_name_the_file_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_targets(write(tmp_path, text))


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yml: cannot read"):
        load_targets(tmp_path / "nope.yml")


def test_cli_refuses_a_name_given_by_flag_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "targets:\n  app: {socket: /run/app.sock}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config.file", str(path), "--target", "app=/run/other.sock"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'app' given twice: by --target and in" in err
    assert f"{path} (targets.app)" in err


def test_cli_reports_config_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "targets:\n  app: {socket: /s, colour: red}\n")
    with pytest.raises(SystemExit):
        main(["--config.file", str(path)])
    assert f"{path}: targets.app.colour: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("app=relative.sock", "not absolute"),
        ("app=/s,path=metrics", "must start with '/'"),
        ("-app=/s", "must be letters"),
        ("app", "is not NAME=SOCKET"),
    ],
)
def test_cli_target_flag_errors_name_the_entry(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([f"--target={flag}"])
    assert message in capsys.readouterr().err


async def test_explicit_targets_are_served_listed_and_discovered(
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "svc" / "admin.sock"
    elsewhere.parent.mkdir()
    seen = await upstreams.http(elsewhere, _answer, route="/internal/metrics")
    await upstreams.metrics(sockdir / "scanned.sock", "up 1\n")
    targets = load_targets(
        write(tmp_path, f"targets:\n  svc:\n    socket: {elsewhere}\n    path: /internal/metrics\n")
    )
    client = await aegis(targets=targets)
    response = await client.get("/svc")
    assert response.status == 200
    assert await response.text() == "svc 1\n"
    assert seen == ["/internal/metrics"]
    landing = await (await client.get("/", headers={"Accept": "application/json"})).json()
    assert [t["name"] for t in landing["targets"]] == ["scanned", "svc"]
    sd = await (await client.get("/-/sd")).json()
    assert [g["labels"]["target"] for g in sd] == ["scanned", "svc"]


async def _answer(_: web.Request) -> web.Response:
    return web.Response(text="svc 1\n")


async def test_missing_explicit_socket_is_a_warning_at_start_not_a_failure(
    aegis: AegisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    later = tmp_path / "later.sock"
    with caplog.at_level(logging.WARNING, logger="aegis.proxy"):
        client = await aegis(targets={"later": Target("later", later)})
    assert f"target later: socket {later} does not exist (yet)" in caplog.text
    assert (await client.get("/later")).status == 404
    assert (await client.get("/-/healthy")).status == 200
