#!/usr/bin/env python3
"""Aegis beside its peers, on loopback, in one run: requests/s, latency, memory, and the ratios.

    bench/run.py [--runs 3] [--seconds 8] [--original ../shared/bench/goaegis] [--baseline CMD]

One nginx serves two generated pages (about 33 KB and 7 MB) on Unix sockets in a scratch
directory; the peers put them on TCP ports: nginx ``proxy_pass`` to the sockets, the Go peer of
``bench/goproxy`` (the original design: one ``httputil.ReverseProxy`` and one fresh Unix
connection per request), Aegis (``aegis`` on PATH, or the command in ``AEGIS_CMD``) and, with
``--baseline`` (or ``AEGIS_BASELINE_CMD``), another Aegis command beside it, such as an earlier
commit installed in a venv of its own. wrk loads each peer in turn; memory is PSS summed over
every process of a peer (its process group), idle and at its highest under load. Then, once:
start-up time and fresh idle memory of each Aegis command, ``/-/sd`` and ``/`` with 10 000
sockets in the directory, and a scrape beside 10 000 sockets against 10.

Standard library only; nginx, wrk and go come from Debian (nginx-light, wrk, golang-go). The
machine's load is printed with each run: compare ratios within a run, not figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGES = {"small": 33 * 1024, "large": 7 * 1024 * 1024}
CONNECTIONS = {"small": 32, "large": 8}
MANY_SOCKETS = 10_000


def exposition(size: int, seed: int = 7) -> bytes:
    """A text exposition of about ``size`` bytes: counters, gauges and histograms with labels,
    shaped like an exporter's page (HELP and TYPE lines, 10-100 series per family)."""
    rnd = random.Random(seed)
    subsystems = ("cpu", "disk", "network", "memory", "http", "filesystem")
    out: list[str] = []
    total = 0
    family = 0
    while total < size:
        kind = ("counter", "gauge", "histogram")[family % 3]
        name = f"bench_{subsystems[family % len(subsystems)]}_metric_{family}"
        suffix = "_total" if kind == "counter" else ""
        lines = [
            f"# HELP {name}{suffix} Generated {kind} number {family} for the benchmark.",
            f"# TYPE {name}{suffix} {kind}",
        ]
        for series in range(rnd.randint(10, 100) if kind != "histogram" else rnd.randint(2, 6)):
            labels = f'device="dev{series}",instance="host-{series % 7}"'
            if kind == "histogram":
                count = 0
                for le in ("0.005", "0.05", "0.5", "5", "+Inf"):
                    count += rnd.randint(0, 1000)
                    lines.append(f'{name}_bucket{{{labels},le="{le}"}} {count}')
                lines.append(f"{name}_sum{{{labels}}} {rnd.uniform(0, 1e4):.6f}")
                lines.append(f"{name}_count{{{labels}}} {count}")
            else:
                lines.append(f"{name}{suffix}{{{labels}}} {rnd.uniform(0, 1e9):.3f}")
        text = "\n".join(lines) + "\n"
        out.append(text)
        total += len(text)
        family += 1
    return "".join(out).encode()


# -- processes ------------------------------------------------------------------------------------


@dataclass
class Peer:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path = field(default_factory=Path)  # its output

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Processes:
    """Every child in its own process group, each group killed at the end whatever happens."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: Sequence[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._procs.append(proc)
        return proc, log

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        # Anything the command started is in its group too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            self.stop(proc)
        self._procs.clear()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ok(peer: Peer, path: str, limit: float = 20.0) -> float:
    """Seconds until ``path`` first answers 200 (polled every 2 ms), counted from now."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if peer.proc.poll() is not None:
            raise SystemExit(f"{peer.name} exited: {peer.log.read_text()[-2000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if get(peer.port, path, timeout=2.0)[0] == 200:
                return time.monotonic() - started
        time.sleep(0.002)
    raise SystemExit(f"{peer.name}: no 200 at {path} within {limit:.0f} s; {peer.log}")


# -- memory ---------------------------------------------------------------------------------------


def group_members(pgid: int) -> Iterator[str]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            yield entry


def group_cpu_seconds(pgid: int) -> float:
    """User and system CPU time of every process in the group. Per request, it says how much
    work a peer does, whatever else the machine is busy with at the time."""
    ticks = 0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def group_pss_kib(pgid: int, field: str = "Pss:") -> int:
    """PSS of every process in the group, added up: shared pages split among their users.

    ``field="Pss_Anon:"``: only the anonymous part, the processes' own memory. The file-backed
    rest (the interpreter, libc, the extension modules) is split among every process on the
    machine that maps the same files, so it moves with whatever else runs."""
    total = 0
    for pid in group_members(pgid):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            continue
    return total


@contextlib.contextmanager
def pss_sampler(pgid: int, every: float = 0.25) -> Iterator[list[int]]:
    """PSS samples (KiB) taken in the background while the block runs."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            samples.append(group_pss_kib(pgid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


# -- load -----------------------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: str
    requests: int = 0


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def wrk(url: str, connections: int, seconds: float) -> Load:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and p50 and p99 and count):
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    errors = " ".join(
        line.strip() for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line
    )
    return Load(
        float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), errors, int(count.group(1))
    )


# -- the bench ------------------------------------------------------------------------------------


def check_tools(commands: Sequence[list[str]]) -> None:
    missing = [tool for tool in ("nginx", "wrk", "go") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)}; apt-get install -y nginx-light wrk golang-go"
        )
    for command in commands:
        if shutil.which(command[0]) is None:
            raise SystemExit(
                f"{command[0]!r} is not on PATH: pip install ./pkgs/aegis, or set AEGIS_CMD"
            )


def go_build(source: Path, out: Path) -> Path:
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", GOTOOLCHAIN="local")
    env.setdefault("GOCACHE", str(Path(tempfile.gettempdir()) / "aegis-bench-gocache"))
    subprocess.run(["go", "build", "-o", str(out), "."], cwd=source, env=env, check=True)
    return out


def nginx_conf(work: Path, name: str, body: str, workers: int = 1) -> Path:
    root = "user root;\n" if os.geteuid() == 0 else ""
    temp = " ".join(
        f"{kind}_temp_path {work}/{name}-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = work / f"{name}.conf"
    conf.write_text(
        f"{root}worker_processes {workers};\n"
        f"daemon off;\npid {work}/{name}.pid;\nerror_log {work}/{name}.err warn;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; {temp}\n{body}\n}}\n"
    )
    return conf


#: The peer names of the Aegis commands: the one measured, and the one it is compared with.
AEGIS = "aegis"
BASELINE = "baseline"


class Bench:
    def __init__(
        self,
        work: Path,
        aegis: dict[str, list[str]],
        seconds: float,
        original: Path | None,
    ) -> None:
        self.work = work
        self.aegis = aegis  # peer name -> command, AEGIS first
        self.seconds = seconds
        self.original = original
        self.procs = Processes(work)
        self.sockdir = work / "run"
        self.peers: list[Peer] = []

    def start_upstream(self) -> None:
        www = self.work / "www"
        www.mkdir()
        self.sockdir.mkdir()
        servers = []
        for page, size in PAGES.items():
            (www / page).write_bytes(exposition(size))
            servers.append(
                f"server {{ listen unix:{self.sockdir}/{page}.sock; location = /metrics {{ "
                f'default_type "text/plain; version=0.0.4"; alias {www}/{page}; }} }}'
            )
        conf = nginx_conf(self.work, "upstream", "\n".join(servers))
        self.procs.start("upstream", ["nginx", "-c", str(conf)])
        for page in PAGES:
            sock = self.sockdir / f"{page}.sock"
            deadline = time.monotonic() + 10
            while not sock.exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"nginx did not create {sock}: {self.work}/upstream.err")
                time.sleep(0.02)

    def start_peers(self) -> None:
        port = free_port()
        ups = "\n".join(
            f"upstream up_{page} {{ server unix:{self.sockdir}/{page}.sock; keepalive 32; }}"
            for page in PAGES
        )
        locations = " ".join(
            f"location = /{page} {{ proxy_http_version 1.1; proxy_set_header Connection ''; "
            f"proxy_pass http://up_{page}/metrics; }}"
            for page in PAGES
        )
        # One worker: one process, as Aegis is.
        server = f"server {{ listen 127.0.0.1:{port}; {locations} }}"
        conf = nginx_conf(self.work, "nginx", f"{ups}\n{server}", workers=1)
        proc, log = self.procs.start("nginx", ["nginx", "-c", str(conf)])
        self.peers.append(Peer("nginx", port, proc, log))
        # The original's flags, which Aegis keeps: -sockdir DIR -hostport HOST:PORT.
        go = go_build(HERE / "goproxy", self.work / "goproxy")
        self.peers.append(self.start_proxy("go", [str(go)], self.sockdir))
        if self.original is not None:
            original = go_build(self.original, self.work / "go-original")
            self.peers.append(self.start_proxy("go-original", [str(original)], self.sockdir))
        for name in self.aegis:
            self.peers.append(self.start_aegis(name, name, self.sockdir))
        for peer in self.peers:
            wait_ok(peer, "/small")

    def start_proxy(self, name: str, command: Sequence[str], sockdir: Path) -> Peer:
        port = free_port()
        argv = [*command, "-sockdir", str(sockdir), "-hostport", f"127.0.0.1:{port}"]
        proc, log = self.procs.start(name, argv)
        return Peer(name, port, proc, log)

    def start_aegis(self, which: str, name: str, sockdir: Path) -> Peer:
        """The Aegis command ``which`` (AEGIS or BASELINE), as the peer ``name``."""
        return self.start_proxy(name, self.aegis[which], sockdir)


@dataclass
class Row:
    load: Load
    idle_kib: int
    peak_kib: int
    samples: list[int]
    cpu_us: float  # CPU time of the peer per request, in microseconds


def measure(peer: Peer, page: str, seconds: float) -> tuple[Load, float]:
    """wrk's figures and the peer's CPU time per request (microseconds)."""
    cpu = group_cpu_seconds(peer.proc.pid)
    load = wrk(peer.url(f"/{page}"), CONNECTIONS[page], seconds)
    return load, (group_cpu_seconds(peer.proc.pid) - cpu) * 1e6 / max(load.requests, 1)


def one_run(bench: Bench, number: int) -> dict[str, dict[str, Row]]:
    """Every page through every peer: wrk for the set seconds after a one-second warm-up. The
    order turns with each run, so that no peer always runs while the machine is busiest."""
    rows: dict[str, dict[str, Row]] = {}
    shift = number % len(bench.peers)
    order = bench.peers[shift:] + bench.peers[:shift]
    for page in PAGES:
        rows[page] = {peer.name: Row(Load(0, 0, 0, ""), 0, 0, [], 0) for peer in bench.peers}
        for peer in order:
            url = peer.url(f"/{page}")
            idle = group_pss_kib(peer.proc.pid)
            wrk(url, CONNECTIONS[page], 1)
            with pss_sampler(peer.proc.pid) as samples:
                load, cpu = measure(peer, page, bench.seconds)
            rows[page][peer.name] = Row(load, idle, max(samples, default=idle), samples, cpu)
    return rows


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


HEADER = (
    f"{'page':6} {'peer':12} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'pre MB':>7} "
    f"{'load MB':>7} {'cpu us/req':>10} | {'x go req/s':>10} {'x go p99':>8} {'x go cpu':>8}"
)


def line(page: str, name: str, rows: list[Row], go: list[Row]) -> str:
    """One peer's figures: the median of the runs given, each ratio taken within its run (the
    CPU ratio is Go's CPU per request over the peer's: above 1, the peer does less work)."""

    def med(figure: Callable[[Row, Row], float]) -> float:
        return statistics.median(figure(row, g) for row, g in zip(rows, go, strict=True))

    return (
        f"{page:6} {name:12} {med(lambda r, _: r.load.rps):7.0f} "
        f"{med(lambda r, _: r.load.p50_ms):7.2f} {med(lambda r, _: r.load.p99_ms):7.2f} "
        f"{mib(med(lambda r, _: r.idle_kib)):>7} {mib(med(lambda r, _: r.peak_kib)):>7} "
        f"{med(lambda r, _: r.cpu_us):10.0f} | {med(lambda r, g: r.load.rps / g.load.rps):10.2f} "
        f"{med(lambda r, g: r.load.p99_ms / g.load.p99_ms):8.2f} "
        f"{med(lambda r, g: g.cpu_us / max(r.cpu_us, 1e-9)):8.2f}"
    )


def print_rows(rows: dict[str, dict[str, Row]], title: str) -> None:
    print(f"\n{title}\n{HEADER}")
    for page, by_peer in rows.items():
        for name, row in by_peer.items():
            errors = f"  {row.load.errors}" if row.load.errors else ""
            print(line(page, name, [row], [by_peer["go"]]) + errors)


def medians(runs: list[dict[str, dict[str, Row]]]) -> None:
    """The median of each figure, and the median of each run's own ratio to the Go peer."""
    print(f"\nMEDIAN OF {len(runs)} RUNS (ratios are taken within each run, then the median)")
    print(HEADER)
    for page in PAGES:
        for name in runs[0][page]:
            print(
                line(
                    page, name, [run[page][name] for run in runs], [run[page]["go"] for run in runs]
                )
            )
    for name in runs[0]["large"]:
        if name not in (AEGIS, BASELINE):
            continue
        large = [run["large"][name] for run in runs]
        print(
            f"{name} PSS while streaming 7 MB pages (MB, each run: idle / lowest / highest "
            "sample): "
            + "; ".join(
                f"{mib(r.idle_kib)} / {mib(min(r.samples, default=0))} / {mib(r.peak_kib)}"
                for r in large
            )
        )
    print_ratios(runs)


def print_ratios(runs: list[dict[str, dict[str, Row]]]) -> None:
    """Aegis against each other peer, each ratio taken within a run: CPU per request (below 1,
    Aegis does less work), requests/s and p99 (each Aegis's over the peer's)."""
    print(f"\n{AEGIS.upper()} / EACH PEER (within each run: run 1, run 2, ...; then the median)")
    for page in PAGES:
        for name in runs[0][page]:
            if name == AEGIS:
                continue
            pairs = [(run[page][AEGIS], run[page][name]) for run in runs]
            figures = {
                "cpu/req": [a.cpu_us / max(b.cpu_us, 1e-9) for a, b in pairs],
                "req/s": [a.load.rps / max(b.load.rps, 1e-9) for a, b in pairs],
                "p99": [a.load.p99_ms / max(b.load.p99_ms, 1e-9) for a, b in pairs],
            }
            print(
                f"{page:6} vs {name:12} "
                + "  ".join(
                    f"{label} {statistics.median(values):.2f} "
                    f"({', '.join(f'{v:.2f}' for v in values)})"
                    for label, values in figures.items()
                )
            )


def timed(fn: Callable[[], object], times: int) -> list[float]:
    out = []
    for _ in range(times):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def ms_summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} ms, max {max(values):.1f} ms"


def extras(bench: Bench) -> None:
    print(f"\nEXTRAS ({', '.join(bench.aegis)})")
    # Start-up, from the command to the first proxied 200; then the memory of a fresh server
    # that answered that one scrape and /-/metrics (the "idle" of the targets). The Aegis
    # commands take turns, so that neither always starts while the machine is busiest.
    fresh: dict[str, tuple[list[float], list[int], list[int]]] = {
        which: ([], [], []) for which in bench.aegis
    }
    for turn in range(3):
        for which, (times, idle, own) in sorted(fresh.items(), reverse=turn % 2 == 1):
            peer = bench.start_aegis(which, f"startup-{which}", bench.sockdir)
            times.append(wait_ok(peer, "/small") * 1000)
            get(peer.port, "/-/metrics")
            time.sleep(1.0)
            idle.append(group_pss_kib(peer.proc.pid))
            own.append(group_pss_kib(peer.proc.pid, "Pss_Anon:"))
            bench.procs.stop(peer.proc)
    for which, (times, idle, own) in fresh.items():
        print(
            f"{which}: start-up to first 200 {ms_summary(times)}; fresh idle PSS "
            f"{' '.join(mib(kib) for kib in idle)} MB, of it anonymous (the processes' own) "
            f"{' '.join(mib(kib) for kib in own)} MB"
        )

    # A directory of 10 000 sockets (files left by closed listeners: sockets all the same)
    # beside one of 10, both holding links to the upstream's sockets.
    dirs = {}
    for count in (10, MANY_SOCKETS):
        directory = bench.work / f"dir{count}"
        directory.mkdir()
        for page in PAGES:
            (directory / f"{page}.sock").symlink_to(bench.sockdir / f"{page}.sock")
        for i in range(count - len(PAGES)):
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(str(directory / f"svc-{i:05d}.sock"))
        dirs[count] = bench.start_aegis(AEGIS, f"dir{count}", directory)
    crowded = {
        which: bench.start_aegis(
            which, f"dir{MANY_SOCKETS}-{which}", bench.work / f"dir{MANY_SOCKETS}"
        )
        for which in bench.aegis
        if which != AEGIS
    }
    for peer in [*dirs.values(), *crowded.values()]:
        wait_ok(peer, "/small")
    # A listing is kept only once the directory's last change is a second old: until then each
    # request lists it anew, and the first timings would depend on how soon they come.
    time.sleep(1.5)
    many = dirs[MANY_SOCKETS]
    for which, peer in {AEGIS: many, **crowded}.items():
        for path in ("/-/sd", "/"):
            started = time.perf_counter()
            status, body = get(peer.port, path)
            first = (time.perf_counter() - started) * 1000
            lat = timed(functools.partial(get, peer.port, path), 20)
            print(
                f"{which}: {path} with {MANY_SOCKETS} sockets: first {first:.1f} ms (the "
                f"process lists the directory), then {ms_summary(lat)} (status {status}, "
                f"{len(body)} bytes)"
            )
        if which != AEGIS:
            bench.procs.stop(peer.proc)
    rates = {}
    for count, peer in dirs.items():
        wrk(peer.url("/small"), CONNECTIONS["small"], 1)
        rates[count] = measure(peer, "small", bench.seconds)
    (many_load, many_cpu), (few_load, few_cpu) = rates[MANY_SOCKETS], rates[10]
    print(
        f"{AEGIS}: 33 KB scrape beside {MANY_SOCKETS} sockets vs 10: CPU {many_cpu:.0f} vs "
        f"{few_cpu:.0f} us/request; {many_load.rps:.0f} vs {few_load.rps:.0f} req/s, "
        f"p99 {many_load.p99_ms:.2f} vs {few_load.p99_ms:.2f} ms"
    )
    # Every socket asked for once (none answers: their listeners are closed).
    before = group_pss_kib(many.proc.pid)
    conn = http.client.HTTPConnection("127.0.0.1", many.port, timeout=10)
    codes: dict[int, int] = {}
    for i in range(MANY_SOCKETS - len(PAGES)):
        conn.request("GET", f"/svc-{i:05d}")
        response = conn.getresponse()
        response.read()
        codes[response.status] = codes.get(response.status, 0) + 1
    conn.close()
    started = time.perf_counter()
    _, metrics = get(many.port, "/-/metrics", timeout=120)
    scrape_ms = (time.perf_counter() - started) * 1000
    print(
        f"{AEGIS}: PSS after asking for each of the {MANY_SOCKETS} sockets once: {mib(before)} -> "
        f"{mib(group_pss_kib(many.proc.pid))} MB (answers {codes}); "
        f"then /-/metrics took {scrape_ms:.0f} ms for {len(metrics)} bytes"
    )


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}, {os.cpu_count()} CPUs ({model}), Linux {platform.release()}"


def versions(aegis: dict[str, list[str]]) -> str:
    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return (done.stdout + done.stderr).strip().splitlines()[0]

    return "; ".join(
        [
            *(f"{name}: {first_line([*command, '--version'])}" for name, command in aegis.items()),
            first_line(["nginx", "-v"]),
            first_line(["wrk", "-v"]).split(" [")[0],
            first_line(["go", "version"]),
        ]
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of every peer (default 3)")
    parser.add_argument("--seconds", type=float, default=8, help="wrk duration (default 8)")
    parser.add_argument(
        "--original",
        type=Path,
        help="also build and measure this Go program (e.g. ../shared/bench/goaegis)",
    )
    parser.add_argument(
        "--baseline",
        default=os.environ.get("AEGIS_BASELINE_CMD", ""),
        metavar="CMD",
        help="another Aegis command measured beside AEGIS_CMD, e.g. an earlier commit in a venv "
        "of its own (default: AEGIS_BASELINE_CMD, if set)",
    )
    parser.add_argument("--no-extras", action="store_true", help="only the peers' table")
    args = parser.parse_args(argv)
    aegis = {AEGIS: shlex.split(os.environ.get("AEGIS_CMD", "aegis"))}
    if args.baseline:
        aegis[BASELINE] = shlex.split(args.baseline)
    check_tools(list(aegis.values()))
    original = args.original.resolve() if args.original else None
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}")
    print(versions(aegis))
    print("; ".join(f"{name} command: {shlex.join(command)}" for name, command in aegis.items()))
    print(
        f"pages: small {PAGES['small']} B ({CONNECTIONS['small']} connections), large "
        f"{PAGES['large']} B ({CONNECTIONS['large']} connections); wrk {args.seconds:g} s each"
    )
    work = Path(tempfile.mkdtemp(prefix="aegis-bench-"))
    work.chmod(0o755)
    bench = Bench(work, aegis, args.seconds, original)
    try:
        bench.start_upstream()
        bench.start_peers()
        runs = []
        for number in range(1, args.runs + 1):
            load = load_average()
            runs.append(one_run(bench, number))
            print_rows(
                runs[-1], f"RUN {number} (load average before: {load}, after: {load_average()})"
            )
            sys.stdout.flush()
        medians(runs)
        if not args.no_extras:
            extras(bench)
    finally:
        bench.procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
