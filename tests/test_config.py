"""Explicit targets: --config.file, --target, and how their mistakes are reported."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from aegis.cli import main
from aegis.config import ConfigError, parse_duration
from aegis.configfile import load_targets
from aegis.targets import Target
from conftest import AegisFactory, Upstreams


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    """main() sets up logging as the command does; later tests must not write through it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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


# Durations: Prometheus' syntax (model.ParseDuration), one parser for every flag.
_UNIT_SECONDS = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}


@given(
    st.lists(
        st.tuples(st.sampled_from(list(_UNIT_SECONDS)), st.integers(0, 999)),
        min_size=1,
        unique_by=lambda part: part[0],
    )
)
def test_whole_numbers_with_units_biggest_first_add_up(parts: list[tuple[str, int]]) -> None:
    parts.sort(key=lambda part: list(_UNIT_SECONDS).index(part[0]))
    text = "".join(f"{number}{unit}" for unit, number in parts)
    expected = sum(number * _UNIT_SECONDS[unit] for unit, number in parts)
    if expected > (2**63 - 1) / 1e9:  # past Go's time.Duration, as Prometheus refuses
        with pytest.raises(ValueError, match="out of range"):
            parse_duration(text)
    else:
        assert parse_duration(text) == pytest.approx(expected)


@given(st.integers(0, 10**6).map(str).filter(lambda text: text != "0"))
def test_a_number_without_a_unit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="a number needs a unit"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("10s", 10.0), ("1m30s", 90.0), ("250ms", 0.25), ("1d", 86400.0), ("0s", 0.0)],
)
def test_durations_prometheus_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10", "a number needs a unit"),
        ("1.5s", "whole numbers only"),
        ("0.5s", "whole numbers only"),
        ("10x", "unknown unit 'x'"),
        ("10S", "unknown unit 'S'"),
        ("10us", "unknown unit 'us'"),
        ("30s1m", "biggest to the smallest"),
        ("1m1m", "biggest to the smallest"),
        ("", "expected whole numbers"),
        (" 10s", "expected whole numbers"),
        ("-1s", "expected whole numbers"),
        ("s", "expected whole numbers"),
        ("300y", "out of range"),
    ],
)
def test_durations_prometheus_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


def test_prometheus_itself_agrees_on_what_is_a_duration(tmp_path: Path, promtool: str) -> None:
    """promtool reads each text as an alerting rule's ``for:``, which is a model.Duration."""
    texts = ["0", "10", "0s", "1m30s", "250ms", "1.5s", "30s1m", "1m1m", "2w3d", "10x", "1h0m"]
    files = []
    for i, text in enumerate(texts):
        path = tmp_path / f"rules{i}.yml"
        path.write_text(
            f'groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up == 0\n    for: "{text}"\n'
        )
        files.append(path)
    done = subprocess.run(
        [promtool, "check", "rules", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    for text, path in zip(texts, files, strict=True):
        try:
            parse_duration(text)
            ours = True
        except ValueError:
            ours = False
        prometheus = f"Checking {path}\n  SUCCESS" in output
        assert ours == prometheus, f"{text!r}: aegis {ours}, promtool {prometheus}\n{output}"


def test_a_duration_flag_without_a_unit_is_an_error_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--scrape.timeout", "10"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("aegis: error: argument --scrape.timeout: '10' is not a duration")
