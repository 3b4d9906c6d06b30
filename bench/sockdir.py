"""How Aegis copes with a crowded socket directory (issue 10): run ``python bench/sockdir.py``.

For 10 and for 10 000 sockets in the directory it starts ``aegis`` (on PATH, or the command in
``AEGIS_CMD``) and prints the latency of ``/-/sd``, ``/`` (HTML and JSON, then again once 256
targets have a last scrape to show), ``/-/metrics`` and of a scrape of one live target, and
Aegis's memory (PSS) before and after the directory's names changed completely several times and
20 000 unknown names were asked for. Only loopback is used; every
file lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingMixIn, UnixStreamServer

PAGE = b"".join(b'bench_metric{i="%d"} %d\n' % (i, i) for i in range(1000))  # about 30 KB


class _Page(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *_: object) -> None:
        pass


class _Server(ThreadingMixIn, UnixStreamServer):
    daemon_threads = True


def serve_upstream(path: str) -> None:
    with _Server(path, _Page) as server:
        server.serve_forever()


def stale_sockets(directory: Path, names: list[str]) -> None:
    """Socket files nobody listens on: what the listing and the stat calls cost is the same."""
    for name in names:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(directory / f"{name}.sock"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def timed(conn: http.client.HTTPConnection, path: str, n: int, **headers: str) -> list[float]:
    took = []
    for _ in range(n):
        start = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        took.append((time.perf_counter() - start) * 1000)
        assert response.status in (200, 404, 502), (path, response.status)
    return took


def row(label: str, took: list[float]) -> str:
    took = sorted(took)
    p95 = took[int(len(took) * 0.95) - 1]
    return f"  {label:<28} median {statistics.median(took):7.2f} ms   p95 {p95:7.2f} ms"


def run(count: int, rounds: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="aegis-sockdir-bench-"))
    sockdir = base / "run"
    sockdir.mkdir()
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--upstream", str(sockdir / "live.sock")]
    )
    stale_sockets(sockdir, [f"service-{i:05d}" for i in range(count - 1)])
    port = free_port()
    aegis = subprocess.Popen(
        [
            *shlex.split(os.environ.get("AEGIS_CMD", "aegis")),
            *("--web.listen-address", f"127.0.0.1:{port}", "--sockdir", str(sockdir)),
            *("--log.level", "error"),
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/live")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "aegis did not serve /live in 20 s"
            time.sleep(0.05)
        print(f"{count} sockets:")
        timed(conn, "/-/sd", 5)  # warm: the first listing stats every entry
        print(row("/-/sd", timed(conn, "/-/sd", rounds)))
        print(row("/ (HTML)", timed(conn, "/", rounds)))
        print(row("/ (JSON)", timed(conn, "/", rounds, Accept="application/json")))
        print(row("/-/metrics", timed(conn, "/-/metrics", rounds)))
        print(row("/live (a scrape, 30 KB)", timed(conn, "/live", rounds * 4)))
        # The landing page with as many last scrapes as it records, each joined in per answer.
        for index in range(min(count - 1, 255)):
            timed(conn, f"/service-{index:05d}", 1)
        print(row("/ (HTML, 256 last scrapes)", timed(conn, "/", rounds)))
        print(
            row("/ (JSON, 256 last scrapes)", timed(conn, "/", rounds, Accept="application/json"))
        )
        before = pss_kb(aegis.pid)
        # Every name in the directory replaced three times over, each listing seen by Aegis.
        for generation in range(3):
            for entry in os.scandir(sockdir):
                if entry.name != "live.sock":
                    os.unlink(entry.path)
            stale_sockets(sockdir, [f"gen{generation}-{i:05d}" for i in range(count - 1)])
            for _ in range(4):
                timed(conn, "/-/sd", 1)
                timed(conn, "/", 1)
        for _ in range(20000):
            timed(conn, f"/{uuid.uuid4().hex}", 1)
        after = pss_kb(aegis.pid)
        print(
            f"  memory (PSS): {before / 1024:.1f} MB after start, "
            f"{after / 1024:.1f} MB after {3 * (count - 1)} more names came and went "
            "and 20 000 unknown names"
        )
        conn.close()
    finally:
        aegis.terminate()
        aegis.wait(15)
        upstream.terminate()
        upstream.wait(5)
        shutil.rmtree(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=50, help="requests per endpoint")
    parser.add_argument("--counts", default="10,10000", help="socket counts to compare")
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(args.upstream)
        return
    for count in map(int, args.counts.split(",")):
        run(count, args.rounds)


if __name__ == "__main__":
    main()
