"""The command line: every flag, its type and its default, and ``--version``.

The original program's flags keep working in every spelling its users and its NixOS unit use:
``-hostport X``, ``-hostport=X``, ``--hostport X`` and ``--hostport=X`` (likewise ``-sockdir``;
``-version`` as well).
"""

from __future__ import annotations

import argparse
import platform
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from .. import __version__
from ..config import normalize_route_prefix, parse_duration
from ..discovery import ExternalURL
from ..targets import Target, check_name
from . import logformat
from .listeners import Listener

__all__ = ["DEFAULT_HOSTPORT", "DEFAULT_SOCKDIR", "build_parser", "route_prefix", "version_text"]

DEFAULT_HOSTPORT = "[::]:31337"
DEFAULT_SOCKDIR = "./run"


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_duration(text: str) -> float:
    seconds = _duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return seconds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _log_level(text: str) -> str:
    level = "warn" if text == "warning" else text  # the name earlier versions used
    if level not in logformat.LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(logformat.LEVELS)}")
    return level


def _external_url(text: str) -> str:
    """Checked as the flag is read, so the error names it; its path is the route prefix's
    default, so it must be one too."""
    if not text:
        return text
    try:
        ExternalURL.parse(text)
        normalize_route_prefix(urllib.parse.urlsplit(text).path or "/")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _prefix_flag(text: str) -> str:
    try:
        normalize_route_prefix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def route_prefix(given: str | None, external_url: str) -> str:
    """Prometheus' rule: the external URL's path unless --web.route-prefix says otherwise."""
    if given is not None:
        return given
    return urllib.parse.urlsplit(external_url).path or "/"


def _listener(text: str) -> Listener:
    try:
        return Listener.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _target(text: str) -> Target:
    """``NAME=SOCKET`` or ``NAME=SOCKET,path=/upstream/path``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=SOCKET[,path=/metrics]")
    socket, _, options = rest.partition(",")
    path = "/metrics"
    if options:
        key, sep, value = options.partition("=")
        if key != "path" or not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: the only option is path=/upstream/path")
        path = value
    try:
        check_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{name!r}: {exc}") from None
    try:
        return Target(name, Path(socket), path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armv7l": "arm"}


def version_text() -> str:
    """What ``--version`` prints, in the shape of Prometheus' ``version.Print``."""
    import importlib.metadata  # here, not at the top: it brings in zipfile, csv and more (~0.5 MB)

    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio"
    machine = platform.machine()
    return (
        f"aegis, version {__version__}\n"
        f"  python version:   {platform.python_version()} ({platform.python_implementation()})\n"
        f"  aiohttp version:  {aiohttp.__version__}\n"
        f"  event loop:       {loop}\n"
        f"  platform:         {platform.system().lower()}/{_GO_ARCH.get(machine, machine)}\n"
    )


class _PrintVersion(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        sys.stdout.write(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aegis",
        description="Expose the Prometheus metrics of Unix-socket services on one TCP port: "
        "GET /NAME is answered by SOCKDIR/NAME.sock, path /metrics.",
        epilog="aegis check [FLAGS] looks at every target once and says what a scrape gets "
        "(aegis check --help).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-hostport",
        "--hostport",
        metavar="HOST:PORT",
        action="append",
        type=_listener,
        dest="listen",
        help="the original's name for --web.listen-address",
    )
    parser.add_argument(
        "--web.listen-address",
        metavar="ADDRESS",
        action="append",
        type=_listener,
        dest="listen",
        help="where to listen: TCP host:port (IPv6 in brackets, [::]:PORT is every address) or "
        f"unix:/path; repeatable (default: {DEFAULT_HOSTPORT})",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config",
        metavar="FILE",
        help="exporter-toolkit web configuration: TLS, basic auth, headers, rate limit",
    )
    parser.add_argument(
        "-sockdir",
        "--sockdir",
        metavar="DIR",
        default=DEFAULT_SOCKDIR,
        help="directory full of Unix sockets to expose (default: %(default)s)",
    )
    parser.add_argument(
        "--target",
        metavar="NAME=SOCKET[,path=P]",
        action="append",
        type=_target,
        default=[],
        help="an explicit target: a socket anywhere, and the path its metrics are on (repeatable)",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        metavar="FILE",
        help="YAML file of explicit targets: targets: {NAME: {socket: /path, path: /metrics}}",
    )
    parser.add_argument(
        "--web.external-url",
        dest="external_url",
        metavar="URL",
        type=_external_url,
        default="",
        help="how Prometheus reaches Aegis (scheme, host:port, path prefix), for /-/sd "
        "(default: the Host each client used)",
    )
    parser.add_argument(
        "--web.route-prefix",
        dest="route_prefix",
        metavar="PATH",
        type=_prefix_flag,
        help="serve every path under this prefix, e.g. /aegis for a reverse proxy that passes "
        "/aegis/NAME on unchanged; / is the root (default: the path of --web.external-url)",
    )
    parser.add_argument(
        "--web.systemd-socket",
        dest="systemd_socket",
        action="store_true",
        help="serve on the sockets systemd passes (socket activation, LISTEN_FDS); then "
        "listen elsewhere only where --web.listen-address says",
    )
    parser.add_argument(
        "--web.read-header-timeout",
        dest="read_header_timeout",
        metavar="DURATION",
        type=_positive_duration,
        default="10s",
        help="time a client has to send a request's headers (and finish a TLS handshake) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--web.idle-timeout",
        dest="idle_timeout",
        metavar="DURATION",
        type=_positive_duration,
        default="2m",
        help="time a keep-alive connection may wait for its next request (default: %(default)s)",
    )
    parser.add_argument(
        "--web.max-header-bytes",
        dest="max_header_bytes",
        metavar="BYTES",
        type=_positive_int,
        default=64 * 1024,
        help="largest request head (request line and headers) accepted; past it, 431 and the "
        "connection is closed (default: %(default)s)",
    )
    parser.add_argument(
        "--web.write-timeout",
        dest="write_timeout",
        metavar="DURATION",
        type=_positive_duration,
        default="30s",
        help="time a client may read nothing of Aegis's answer (the connection's buffers full) "
        "before it is disconnected; any progress starts it again (default: %(default)s)",
    )
    parser.add_argument(
        "--limit.concurrent-requests",
        dest="max_concurrent",
        metavar="N",
        type=_positive_int,
        default=256,
        help="upstream scrapes in flight at once; past it, 503 (default: %(default)s)",
    )
    parser.add_argument(
        "--limit.concurrent-requests-per-target",
        dest="max_concurrent_per_target",
        metavar="N",
        type=_positive_int,
        default=64,
        help="the same for each target (default: %(default)s)",
    )
    parser.add_argument(
        "--scrape.timeout",
        dest="scrape_timeout",
        metavar="DURATION",
        type=_duration,
        default="10s",
        help="upstream deadline when the scraper sends no X-Prometheus-Scrape-Timeout-Seconds "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--scrape.timeout-offset",
        dest="timeout_offset",
        metavar="DURATION",
        type=_duration,
        default="500ms",
        help="subtracted from the scraper's timeout, so Aegis answers 504 before it gives up "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown.grace-period",
        dest="grace",
        metavar="DURATION",
        type=_duration,
        default="10s",
        help="how long in-flight scrapes may take to finish at SIGTERM (default: %(default)s)",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        type=_log_level,
        metavar="{" + ",".join(logformat.LEVELS) + "}",
        help="only log messages at this level and above (default: %(default)s)",
    )
    parser.add_argument(
        "--log.format",
        dest="log_format",
        default="logfmt",
        choices=logformat.FORMATS,
        help="log lines as Prometheus writes them: logfmt or json (default: %(default)s)",
    )
    parser.add_argument(
        "-version",
        "--version",
        action=_PrintVersion,
        nargs=0,
        help="print what aegis, Python and aiohttp this is, and exit",
    )
    return parser
