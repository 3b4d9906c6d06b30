"""``aegis``: argv → configuration → :func:`aegis.server.serve`. Nothing else lives here.

The original program's flags keep working in every spelling its users and its NixOS unit use:
``-hostport X``, ``-hostport=X``, ``--hostport X`` and ``--hostport=X`` (likewise ``-sockdir``;
``-version`` as well).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import signal
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from . import __version__, logs, multiproc
from .config import Config, ConfigError, normalize_route_prefix, parse_duration
from .configfile import load_targets
from .discovery import ExternalURL
from .listeners import Listener, bind, remove_socket_files, socket_files, systemd_listeners
from .process import open_standard_streams, raise_fd_limit
from .proxy import make_app
from .server import Serving, serve
from .targets import Target, check_name
from .timeouts import ConnectionBounds
from .webauth import setup_web_config
from .webconfig import WebConfig, WebConfigError, load_web_config, server_ssl_context

log = logging.getLogger("aegis")

# Stop signals and SIGHUP: the server takes them from the pending set (aegis.server).
_HELD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

DEFAULT_HOSTPORT = "[::]:31337"
DEFAULT_SOCKDIR = "./run"


def default_workers() -> int:
    """One worker per available CPU, at most two: past that a scrape proxy gains little speed
    and each further worker costs about 9 MB (31.5 MB PSS idle with one, 40.8 MB with two)."""
    return max(1, min(2, len(os.sched_getaffinity(0))))


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
    if level not in logs.LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(logs.LEVELS)}")
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


def _route_prefix(given: str | None, external_url: str) -> str:
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
        help="upstream scrapes in flight at once in each worker; past it, 503 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--limit.concurrent-requests-per-target",
        dest="max_concurrent_per_target",
        metavar="N",
        type=_positive_int,
        default=64,
        help="the same for each target, in each worker (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=default_workers(),
        help="worker processes sharing the port (default: %(default)s, from the CPUs available)",
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
        metavar="{" + ",".join(logs.LEVELS) + "}",
        help="only log messages at this level and above (default: %(default)s)",
    )
    parser.add_argument(
        "--log.format",
        dest="log_format",
        default="logfmt",
        choices=logs.FORMATS,
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


def main(argv: Sequence[str] | None = None) -> int:
    open_standard_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    targets: dict[str, Target] = {}
    for target in args.target:
        if target.name in targets:
            parser.error(f"--target {target.name}: given twice")
        targets[target.name] = target
    try:
        if args.config_file:
            for name, target in load_targets(args.config_file).items():
                if name in targets:
                    raise ConfigError(
                        f"target {name!r} given twice: by --target and in "
                        f"{args.config_file} (targets.{name})"
                    )
                targets[name] = target
        config = Config(
            sockdir=Path(args.sockdir),
            targets=targets,
            scrape_timeout=args.scrape_timeout,
            timeout_offset=args.timeout_offset,
            external_url=args.external_url,
            route_prefix=_route_prefix(args.route_prefix, args.external_url),
            max_concurrent=args.max_concurrent,
            max_concurrent_per_target=args.max_concurrent_per_target,
        )
        web_config = load_web_config(args.web_config) if args.web_config else None
        listeners: list[Listener] = args.listen or [Listener.parse(DEFAULT_HOSTPORT)]
        if args.systemd_socket:
            listeners = [*(args.listen or []), *systemd_listeners()]
    except (ConfigError, ValueError, WebConfigError) as exc:
        parser.error(str(exc))
    serving = Serving(
        shutdown_grace=args.grace,
        ssl_context=server_ssl_context(web_config.tls) if web_config and web_config.tls else None,
        bounds=ConnectionBounds(
            read_header_timeout=args.read_header_timeout,
            max_head_bytes=args.max_header_bytes,
            write_timeout=args.write_timeout,
        ),
        idle_timeout=args.idle_timeout,
    )
    # The original's start line, HOSTPORT -> SOCKDIR, with the directory the workers will scan.
    # From here on a stop signal waits (pending) until the server takes it: one that came
    # while the sockets and the metrics directory were being made would otherwise leave them
    # behind, and end Aegis with 143 instead of its stop.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        return _serve(args, config, web_config, listeners, serving)
    finally:
        # Taken here if nothing took it (a failed start): the failure's status stands.
        while signal.sigtimedwait(_HELD_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _serve(
    args: argparse.Namespace,
    config: Config,
    web_config: WebConfig | None,
    listeners: list[Listener],
    serving: Serving,
) -> int:
    log.info("%s -> %s", ", ".join(map(str, listeners)), os.path.abspath(args.sockdir))
    if serving.ssl_context:
        log.info("serving TLS only (%s)", args.web_config)
    try:
        socks = bind(listeners)
    except OSError as exc:
        log.error("cannot listen on %s", exc.strerror or exc)
        return 1
    max_fds = raise_fd_limit()
    log.debug("open files limit: %d", max_fds)
    files = socket_files(listeners)
    try:
        if args.workers == 1:
            return serve(lambda: _app(config, web_config), socks, serving)
        # Several workers: one set of self-metrics for all of them, whichever answers a scrape.
        with multiproc.metrics_dir() as shared:
            path = shared.path

            def orphaned() -> None:
                remove_socket_files(files)
                # Only the last worker to leave removes it: a sibling may still be counting.
                shared.leave()

            return serve(
                lambda: _app(config, web_config, multiprocess_dir=path),
                socks,
                serving,
                workers=args.workers,
                on_worker_start=shared.join,
                on_worker_exit=functools.partial(multiproc.worker_exited, path),
                on_orphaned=orphaned,
            )
    finally:
        remove_socket_files(files)


def _app(
    config: Config, web_config: WebConfig | None, *, multiprocess_dir: Path | None = None
) -> web.Application:
    app = make_app(config, multiprocess_dir=multiprocess_dir)
    if web_config is not None:
        setup_web_config(app, web_config)
    return app


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
