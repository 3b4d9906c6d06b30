"""The README's promises that code can check.

Its library example runs as shown; its command-line table and ``aegis --help`` name the same
flags; ``.ci/run`` runs its test command word for word; and every YAML block is checked by what
reads it, as the comment before the block says (the README's last section explains the
convention): Prometheus configurations and alert rules by ``promtool``, the web configuration
and the explicit targets by Aegis's own loaders.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from readmeblocks import (
    KINDS,
    README,
    ROOT,
    Block,
    blocks,
    documented_passwords,
    needs_readme,
    of_kind,
    rules,
)

from aegis.cli.flags import build_parser
from aegis.configfile import load_targets
from aegis.webconfig import load_web_config
from conftest import Upstreams

pytestmark = needs_readme


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_every_yaml_block_says_how_it_is_checked() -> None:
    yaml_blocks = [b for b in blocks() if b.lang in ("yaml", "yml")]
    assert len(yaml_blocks) >= 5, "the README's YAML examples were not found"
    for block in yaml_blocks:
        assert block.kind in KINDS, (
            f"{block}: a YAML block needs a comment right before it saying how it is checked, "
            f"one of <!-- check: {' | '.join(KINDS)} --> (see the README's last section)"
        )
        assert yaml.safe_load(block.text) is not None, f"{block}: empty"
    for block in blocks():
        if block.kind is not None:
            assert block.lang in ("yaml", "yml"), f"{block}: <!-- check: --> marks YAML only"
        if block.kind == "rules":
            assert re.fullmatch(r"[\w.-]+\.ya?ml", block.arg), (
                f"{block}: say the file name the configurations load: <!-- check: rules F.yml -->"
            )


# Prometheus configurations and alert rules.


@pytest.mark.parametrize("block", of_kind("prometheus"), ids=str)
def test_prometheus_configuration_passes_promtool(
    block: Block, tmp_path: Path, promtool: str
) -> None:
    for rule_file in of_kind("rules"):  # rule_files are checked too, so they must be there
        (tmp_path / rule_file.arg).write_text(rule_file.text)
    (tmp_path / "prometheus.yml").write_text(block.text)
    checked = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, f"{block}:\n{checked.stdout}{checked.stderr}"


def test_promtool_rejects_scheme_in_an_http_sd_entry(tmp_path: Path, promtool: str) -> None:
    # What the README once told users to write: proof that the check above can fail.
    (tmp_path / "prometheus.yml").write_text(
        "scrape_configs:\n  - job_name: aegis\n    http_sd_configs:\n"
        "      - url: https://myhost:31337/-/sd\n        scheme: https\n"
    )
    checked = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode != 0
    assert "field scheme not found" in checked.stdout + checked.stderr


def test_alert_rules_pass_promtool_check_rules(tmp_path: Path, promtool: str) -> None:
    block = rules()
    (tmp_path / block.arg).write_text(block.text)
    checked = run(promtool, "check", "rules", block.arg, cwd=tmp_path)
    assert checked.returncode == 0, f"{block}:\n{checked.stdout}{checked.stderr}"


def expected_alert(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """What promtool should report for ``rule`` firing on a series with ``labels``: the rule's
    own labels added, and its annotations with ``{{ $labels.NAME }}`` filled in."""

    def fill(template: str) -> str:
        def label(match: re.Match[str]) -> str:
            assert match.group(1) in labels, f"annotation names a label it won't have: {template}"
            return labels[match.group(1)]

        filled = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", label, template)
        assert "{{" not in filled, f"this test renders $labels only: {template}"
        return filled

    return {
        "exp_labels": {**labels, **rule.get("labels", {})},
        "exp_annotations": {k: fill(v) for k, v in rule.get("annotations", {}).items()},
    }


def test_alert_rules_catch_a_socket_that_disappears(tmp_path: Path, promtool: str) -> None:
    """Series as Prometheus records them with the README's discovery configuration: "node"'s
    socket disappears after 20 minutes, so its target leaves /-/sd and its ``up`` series ends
    in a staleness marker, never 0; "broken" keeps its socket but stops answering; "postgres"
    is fine throughout; Aegis itself stops answering after 40 minutes."""
    block = rules()
    (tmp_path / block.arg).write_text(block.text)
    by_name = {r["alert"]: r for g in yaml.safe_load(block.text)["groups"] for r in g["rules"]}
    host = "myhost:31337"

    def target(name: str) -> dict[str, str]:
        return {"instance": host, "job": "aegis", "target": name}

    def series(labels: dict[str, str], values: str) -> dict[str, str]:
        selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return {"series": f"up{{{selector}}}", "values": values}

    def alerts(name: str, at: str, *fired: dict[str, str]) -> dict[str, Any]:
        wanted = [expected_alert(by_name[name], labels) for labels in fired]
        return {"eval_time": at, "alertname": name, "exp_alerts": wanted}

    self_labels = {"instance": host, "job": "aegis-self"}
    test = {
        "rule_files": [block.arg],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series(target("node"), "1x20 stale"),
                    series(target("broken"), "1x10 0x80"),
                    series(target("postgres"), "1x90"),
                    series(self_labels, "1x40 0x50"),
                ],
                "alert_rule_test": [
                    alerts("AegisTargetGone", "20m"),
                    alerts("AegisTargetDown", "20m", target("broken")),
                    # The point: up == 0 never fires for node; the comparison with the last
                    # day's targets does.
                    alerts("AegisTargetGone", "30m", target("node")),
                    alerts("AegisTargetDown", "30m", target("broken")),
                    alerts("AegisDown", "30m"),
                    alerts("AegisTargetGone", "60m", target("node")),
                    alerts("AegisDown", "60m", self_labels),
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    tested = run(promtool, "test", "rules", "test.yml", cwd=tmp_path)
    assert tested.returncode == 0, f"{block}:\n{tested.stdout}{tested.stderr}"


# Aegis's own files.


@pytest.mark.parametrize("block", of_kind("web-config"), ids=str)
def test_web_configuration_passes_aegis_checker(block: Block, tmp_path: Path) -> None:
    data = yaml.safe_load(block.text)
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    pems = {
        "cert_file": server.cert_chain_pems[0],
        "key_file": server.private_key_pem,
        "client_ca_file": ca.cert_pem,
    }
    for key, name in (data.get("tls_server_config") or {}).items():
        if key in pems:
            assert not Path(name).is_absolute(), f"{block}: {key} {name} must be relative here"
            pems[key].write_to_path(str(tmp_path / name))
    (tmp_path / "web.yml").write_text(block.text)
    config = load_web_config(tmp_path / "web.yml")
    assert (config.tls is not None) == ("tls_server_config" in data)
    assert set(config.users) == set(data.get("basic_auth_users") or {})
    assert (config.rate_limit is not None) == bool((data.get("rate_limit") or {}).get("interval"))
    # A user's password is given in a comment, and the hash must be of it.
    passwords = documented_passwords(block)
    assert set(passwords) == set(config.users), f"{block}: say each user's password"
    for user, password in passwords.items():
        assert bcrypt.checkpw(password.encode(), config.users[user]), f"{block}: {user}"


@pytest.mark.parametrize("block", of_kind("targets"), ids=str)
def test_targets_file_passes_aegis_loader(block: Block, tmp_path: Path) -> None:
    (tmp_path / "aegis.yml").write_text(block.text)
    targets = load_targets(tmp_path / "aegis.yml")
    assert set(targets) == set(yaml.safe_load(block.text)["targets"])


# The command line and the commands at the top.


def flag_table() -> dict[str, int]:
    """Each flag the README's command-line table names in its first column, and its line."""
    lines = README.read_text().splitlines()
    header = next((i for i, line in enumerate(lines) if re.match(r"\|\s*flag\s*\|", line)), None)
    assert header is not None, "README.md lost its table of flags (a | flag | ... | header)"
    flags: dict[str, int] = {}
    for n, row in enumerate(lines[header + 2 :], start=header + 3):
        if not row.startswith("|"):
            break
        first = re.split(r"(?<!\\)\|", row)[1]  # GFM: a | inside a cell is written \|
        for code in re.findall(r"`([^`]+)`", first):
            flag = re.split(r"[\s=]", code.strip(), maxsplit=1)[0]
            if flag.startswith("-"):
                assert flag not in flags, f"README.md:{n}: {flag} is also on line {flags[flag]}"
                flags[flag] = n
    return flags


def test_flag_table_names_every_flag_of_the_parser_and_no_other() -> None:
    parser = build_parser()
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    spellings = {s for a in actions for s in a.option_strings}
    table = flag_table()
    unknown = sorted(f"{flag} (line {n})" for flag, n in table.items() if flag not in spellings)
    missing = [a.option_strings for a in actions if not set(a.option_strings) & set(table)]
    assert (unknown, missing) == ([], []), (
        f"README.md's flag table names flags aegis does not have: {unknown}; "
        f"and lacks these flags of aegis --help: {missing}"
    )


def quick_start() -> list[str]:
    first = next((b for b in blocks() if b.lang == "sh"), None)
    assert first is not None, "README.md lost its commands at the top"
    return first.text.splitlines()


def test_ci_runs_the_readme_test_command_word_for_word() -> None:
    commands = quick_start()
    assert len(commands) == 2, "the README starts with two commands: run Aegis, run the tests"
    test_command = commands[1].split("#")[0].strip()
    assert "pytest tests" in test_command
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands_run = [line for line in ci if line and not line.startswith("#")]
    # Last, because set -e ignores a failure before the last && of a list: only as the
    # script's last command does a failed install fail CI.
    assert commands_run[-1] == test_command, (
        f".ci/run does not end with the README's test command: {test_command}"
    )


def test_the_venv_the_commands_make_is_ignored_by_git() -> None:
    venvs = {re.search(r"python3 -m venv (\S+)", c) for c in quick_start()}
    assert None not in venvs, "each command at the top makes its virtual environment"
    ignored = (ROOT / ".gitignore").read_text().split()
    for venv in {m.group(1) for m in venvs if m}:
        assert venv in ignored or f"{venv}/" in ignored, f".gitignore does not ignore {venv}"


# The library example.


def readme_example() -> str:
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md lost its marked library example"
    return match.group(1)


async def test_readme_library_example_serves_sockets(
    upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the example's sockdir is ./run
    (tmp_path / "run").mkdir()
    await upstreams.metrics(tmp_path / "run" / "node.sock", "node_up 1\n")
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, web.Application)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert await (await client.get("/")).text() == "my own application\n"
        response = await client.get("/sockets/node")
        assert (response.status, await response.text()) == (200, "node_up 1\n")
        assert (await client.get("/sockets/absent")).status == 404
