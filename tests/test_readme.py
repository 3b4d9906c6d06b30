"""What README.md and docs/*.md promise that code can check.

Every block in a code fence is checked by what reads it, as the comment before the block says
(docs/design.md lists the kinds): Prometheus configurations, alert rules and Alertmanager's
configuration by their own tools, the web configuration and the explicit targets by Aegis's own
loaders, the Caddyfile by Caddy, the library example by running it. And the README's flag table
and ``aegis --help`` name the same flags, its failure table names every kind with its status,
``.ci/run`` runs its test command word for word, and the links between the pages lead somewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import prometheus_client
import pytest
import trustme
import yaml
from aegisrun import child_env, free_port
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheusrun import Build
from readmeblocks import (
    KINDS,
    LANGUAGES,
    README,
    ROOT,
    YAML,
    Block,
    blocks,
    documented_passwords,
    needs_readme,
    of_kind,
    pages,
    prometheus_major,
    rules,
    the_block,
)

from aegis.cli.check import build_check_parser
from aegis.cli.flags import build_parser
from aegis.configfile import load_targets
from aegis.proxy import FAILURE_STATUS
from aegis.webconfig import load_web_config
from conftest import AegisFactory, Upstreams

pytestmark = needs_readme


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def start_logged(argv: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A child whose output goes to ``log``, for the failure messages to quote."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(**env),
        )


def test_every_block_says_how_it_is_checked() -> None:
    assert len([b for b in blocks() if b.lang in YAML]) >= 8, "the docs' YAML was not found"
    assert {p.name for p in pages()} >= {"README.md", "operating.md", "prometheus.md"}
    for block in blocks():
        if block.lang in (*YAML, "python"):
            assert block.kind in KINDS, (
                f"{block}: a YAML or Python block needs a comment right before it saying how it "
                f"is checked, one of <!-- check: {' | '.join(KINDS)} --> (see docs/design.md)"
            )
        if block.kind is None:
            continue
        assert block.kind in KINDS, f"{block}: unknown check {block.kind!r}"
        assert block.lang in LANGUAGES.get(block.kind, YAML), (
            f"{block}: <!-- check: {block.kind} --> marks a block of "
            f"{' or '.join(LANGUAGES.get(block.kind, YAML))}"
        )
        if block.lang in YAML:
            assert yaml.safe_load(block.text) is not None, f"{block}: empty"
        if block.kind == "rules":
            assert re.fullmatch(r"[\w.-]+\.ya?ml", block.arg), (
                f"{block}: say the file name the configurations load: <!-- check: rules F.yml -->"
            )
        elif block.kind == "prometheus":
            assert block.arg in ("", "3"), f"{block}: <!-- check: prometheus [3] -->"
        else:
            assert block.arg == "", f"{block}: {block.kind} takes no argument"


# Prometheus configurations and alert rules.


@pytest.mark.parametrize("block", of_kind("prometheus"), ids=str)
def test_prometheus_configuration_passes_promtool(
    block: Block, tmp_path: Path, prometheus_build: Build, promtool: str
) -> None:
    for rule_file in of_kind("rules"):  # rule_files are checked too, so they must be there
        (tmp_path / rule_file.arg).write_text(rule_file.text)
    # promtool looks for the client certificate and key files: here, under tmp_path.
    etc = tmp_path / "etc"
    text = block.text.replace(" /etc/", f" {etc}/")
    for name in re.findall(rf" ({re.escape(str(etc))}/\S+)", text):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).touch()
    (tmp_path / "prometheus.yml").write_text(text)
    checked = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    output = checked.stdout + checked.stderr
    if block.arg == "3" and prometheus_major(prometheus_build.version()) < 3:
        # Marked for Prometheus 3 only: then Prometheus 2 must refuse it, or the mark is wrong.
        assert checked.returncode != 0, f"{block}: Prometheus 2 takes it; drop the 3"
        assert "not found in type config" in output, f"{block}:\n{output}"
        return
    assert checked.returncode == 0, f"{block}:\n{output}"


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
    """Series as Prometheus records them with the docs' discovery configuration: "node"'s
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
                    # The timings docs/prometheus.md gives: pending at the first evaluation
                    # that sees the change, firing `for: 5m` later. broken's up is 0 from 11m,
                    # node's series ends at 21m, Aegis's up is 0 from 41m.
                    alerts("AegisTargetDown", "15m"),
                    alerts("AegisTargetDown", "16m", target("broken")),
                    alerts("AegisTargetGone", "25m"),
                    alerts("AegisTargetGone", "26m", target("node")),
                    alerts("AegisDown", "45m"),
                    alerts("AegisDown", "46m", self_labels),
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


# Alertmanager's configuration.

AMTOOL = shutil.which("amtool")
# Debian's package names the server prometheus-alertmanager; nixpkgs, alertmanager.
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
needs_alertmanager = pytest.mark.skipif(
    AMTOOL is None or ALERTMANAGER is None,
    reason="amtool and alertmanager are not on PATH (Debian: apt-get install "
    "prometheus-alertmanager)",
)


@needs_alertmanager
@pytest.mark.parametrize("block", of_kind("alertmanager"), ids=str)
def test_alertmanager_configuration_passes_amtool(block: Block, tmp_path: Path) -> None:
    assert AMTOOL is not None
    (tmp_path / "alertmanager.yml").write_text(block.text)
    checked = run(AMTOOL, "check-config", "alertmanager.yml", cwd=tmp_path)
    assert checked.returncode == 0, f"{block}:\n{checked.stdout}{checked.stderr}"


@needs_alertmanager
@pytest.mark.slow
async def test_aegis_down_inhibits_the_alerts_of_its_targets(tmp_path: Path) -> None:
    """A real Alertmanager with the docs' configuration, sent the alerts of the docs' rules:
    while an Aegis is down, its targets' alerts are inhibited; another Aegis's are not."""
    assert ALERTMANAGER is not None
    block = the_block("alertmanager", "docs/prometheus.md")
    rule_labels = {
        r["alert"]: r.get("labels", {})
        for g in yaml.safe_load(rules().text)["groups"]
        for r in g["rules"]
    }
    (tmp_path / "alertmanager.yml").write_text(block.text)
    api = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "alertmanager.log"
    server = start_logged(
        [
            ALERTMANAGER,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address={api.removeprefix('http://')}",
            "--cluster.listen-address=",  # no cluster port of its own
        ],
        log,
    )

    def alert(name: str, **labels: str) -> dict[str, Any]:
        return {"labels": {"alertname": name, **rule_labels[name], **labels}}

    down, up = "myhost:31337", "otherhost:31337"
    sent = [
        alert("AegisDown", job="aegis-self", instance=down),
        alert("AegisTargetDown", job="aegis", instance=down, target="node"),
        alert("AegisTargetGone", job="aegis", instance=down, target="shop"),
        alert("AegisTargetDown", job="aegis", instance=up, target="node"),
    ]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            deadline = time.monotonic() + 30
            while True:
                assert server.poll() is None, log.read_text()
                try:
                    async with session.post(f"{api}/api/v2/alerts", json=sent) as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            while True:
                async with session.get(f"{api}/api/v2/alerts") as response:
                    got = await response.json()
                state = {
                    (a["labels"]["alertname"], a["labels"]["instance"]): a["status"]["state"]
                    for a in got
                }
                if len(state) == len(sent):
                    break
                assert time.monotonic() < deadline, got
                await asyncio.sleep(0.1)
    finally:
        server.terminate()
        server.wait(15)
    assert state == {
        ("AegisDown", down): "active",
        ("AegisTargetDown", down): "suppressed",
        ("AegisTargetGone", down): "suppressed",
        ("AegisTargetDown", up): "active",
    }, got


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


CADDY = shutil.which("caddy")


@pytest.mark.skipif(CADDY is None, reason="caddy is not on PATH (Debian: apt-get install caddy)")
@pytest.mark.slow
async def test_caddy_with_the_docs_origins_is_scraped_through_aegis(
    tmp_path: Path, sockdir: Path, aegis: AegisFactory
) -> None:
    """The docs' Caddyfile, its socket moved into the socket directory: Caddy's admin API
    answers Aegis's Host: localhost, and keeps answering Caddy's own commands."""
    assert CADDY is not None
    block = the_block("caddyfile", "docs/prometheus.md")
    sock = sockdir / "caddy.sock"
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(block.text.replace("/run/caddy/admin.sock", str(sock)))
    home = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    adapted = run(CADDY, "adapt", "--config", str(caddyfile), cwd=tmp_path)
    assert adapted.returncode == 0, adapted.stderr
    assert "localhost" in json.loads(adapted.stdout)["admin"]["origins"], adapted.stdout
    log = tmp_path / "caddy.log"
    caddy = start_logged([CADDY, "run", "--config", str(caddyfile)], log, **home)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert caddy.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        client = await aegis()
        response = await client.get("/caddy")
        page = await response.text()
        assert response.status == 200, page
        assert "caddy_admin_http_requests_total" in page or "go_goroutines" in page, page
        reload = await asyncio.create_subprocess_exec(
            *(CADDY, "reload", "--config", str(caddyfile), "--address", f"unix/{sock}"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(**home),
        )
        said, _ = await asyncio.wait_for(reload.communicate(), 30)
        assert reload.returncode == 0, said.decode(errors="replace")
    finally:
        caddy.terminate()
        caddy.wait(15)


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


def table(page: Path, first_column: str) -> list[list[str]]:
    """The cells of each row of the table on ``page`` whose first column is ``first_column``."""
    lines = page.read_text().splitlines()
    header = next(
        (i for i, line in enumerate(lines) if re.match(rf"\|\s*{first_column}\s*\|", line)), None
    )
    assert header is not None, f"{page.name} lost its table of {first_column}"
    rows = []
    for row in lines[header + 2 :]:
        if not row.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]])
    return rows


def test_failure_table_names_every_kind_with_its_status() -> None:
    documented = {row[0].strip("`"): row[1] for row in table(README, "kind")}
    # A scraper that hung up is counted 499 (nginx's code), never answered.
    wanted = {
        kind: str(status) for kind, status in {**FAILURE_STATUS, "client_closed": 499}.items()
    }
    assert documented == wanted


def test_the_flags_of_aegis_check_are_documented() -> None:
    serving = {s for a in build_parser()._actions for s in a.option_strings}
    own = {
        s for a in build_check_parser()._actions for s in a.option_strings if s not in serving
    } - {"-h", "--help"}
    assert own, "aegis check has flags of its own"
    text = (ROOT / "docs" / "operating.md").read_text()
    assert [flag for flag in sorted(own) if f"`{flag}" not in text] == []


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


# The library example and the links.


async def test_library_example_serves_sockets_and_metrics_on_the_global_registry(
    upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (block,) = of_kind("library")
    # The example mounts Aegis on prometheus_client's global REGISTRY: here a fresh one that
    # holds what the global one does (the process's collectors), so the test leaves the real
    # one as it was, and the example must not clash with them.
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)
    monkeypatch.chdir(tmp_path)  # the example's sockdir is ./run
    (tmp_path / "run").mkdir()
    await upstreams.metrics(tmp_path / "run" / "node.sock", "node_up 1\n")
    namespace: dict[str, object] = {"__name__": "library_example"}
    exec(compile(block.text, str(block), "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, web.Application)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert await (await client.get("/")).text() == "my own application\n"
        response = await client.get("/sockets/node")
        assert (response.status, await response.text()) == (200, "node_up 1\n")
        assert (await client.get("/sockets/absent")).status == 404
        metrics = await (await client.get("/sockets/-/metrics")).text()
    assert 'aegis_requests_total{code="200",target="node"} 1.0' in metrics, metrics
    assert "process_cpu_seconds_total" in metrics, metrics


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page``."""
    found = set()
    for line in page.read_text().splitlines():
        if heading := re.fullmatch(r"#+ (.+)", line):
            text = re.sub(r"[^\w\- ]", "", heading.group(1).lower().replace("`", ""))
            found.add(text.replace(" ", "-"))
    return found


def test_links_between_the_pages_lead_somewhere() -> None:
    # The Nix package's source holds README.md and docs/ but not the rest of the repository
    # (bench/, LICENSE...): there, only the links between the pages can be followed.
    whole = (ROOT / "flake.nix").is_file()
    broken = []
    for page in pages():
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", link):
                continue  # a URL: not ours to check
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not whole and target not in pages():
                continue
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert broken == []
