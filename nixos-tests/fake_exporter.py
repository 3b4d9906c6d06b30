"""A stand-in for a service that serves Prometheus metrics on a Unix socket.

Usage: fake_exporter.py SOCKET NAME [PATH]

Answers GET PATH (default /metrics) with one sample labelled with NAME, and
404 for anything else. It removes its socket when stopped, as a well-behaved
service does. Used by the NixOS VM test and by tests/test_nix.py.
"""

import os
import signal
import socketserver
import sys
from http.server import BaseHTTPRequestHandler
from types import FrameType


def make_handler(name: str, path: str) -> type[BaseHTTPRequestHandler]:
    body = f'aegis_fake_up{{source="{name}"}} 1\n'.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != path:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def address_string(self) -> str:
            # A Unix-socket peer has no address; the default would fail.
            return "unix"

    return Handler


def main(argv: list[str]) -> None:
    socket_path, name = argv[1], argv[2]
    path = argv[3] if len(argv) > 3 else "/metrics"
    server = socketserver.UnixStreamServer(socket_path, make_handler(name, path))

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {name} on {socket_path}{path}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        os.unlink(socket_path)


if __name__ == "__main__":
    main(sys.argv)
