"""``aegis``: argv → configuration → :func:`aegis.server.serve`. Nothing else lives here.

The original program's flags keep working in every spelling its users and its NixOS unit use:
``-hostport X``, ``-hostport=X``, ``--hostport X`` and ``--hostport=X`` (likewise ``-sockdir``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, multiproc
from .config import Config, ConfigError, parse_duration
from .configfile import load_targets
from .proxy import make_app
from .server import Listener, bind, serve, systemd_listeners
from .targets import Target

log = logging.getLogger("aegis")

DEFAULT_HOSTPORT = "[::]:31337"
DEFAULT_SOCKDIR = "./run"


def default_workers() -> int:
    """One worker per available CPU, at most two: past that a scrape proxy gains little speed
    and each further worker costs about 20 MB."""
    return max(1, min(2, len(os.sched_getaffinity(0))))


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


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
        return Target(name, Path(socket), path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        dest="listen",
        help=f"TCP host:port to listen on, IPv6 in brackets (default: {DEFAULT_HOSTPORT})",
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
        default="",
        help="how Prometheus reaches Aegis (scheme, host:port, path prefix), for /-/sd "
        "(default: the Host each client used)",
    )
    parser.add_argument(
        "--web.systemd-socket",
        dest="systemd_socket",
        action="store_true",
        help="serve on the sockets systemd passes (socket activation, LISTEN_FDS) as well",
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
        default="0.5s",
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
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"aegis {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
        )
        listeners = [Listener.parse(text) for text in args.listen or [DEFAULT_HOSTPORT]]
        if args.systemd_socket:
            listeners = [Listener.parse(text) for text in args.listen or []]
            listeners += systemd_listeners()
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    log.info("%s -> %s", ", ".join(map(str, listeners)), args.sockdir)
    try:
        socks = bind(listeners, args.workers)
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    if args.workers == 1:
        return serve(lambda: make_app(config), socks, shutdown_grace=args.grace)
    # Several workers: one set of self-metrics for all of them, whichever answers a scrape.
    with contextlib.ExitStack() as stack:
        path = stack.enter_context(multiproc.metrics_dir())
        return serve(
            lambda: make_app(config, multiprocess_dir=path),
            socks,
            shutdown_grace=args.grace,
            on_worker_exit=functools.partial(multiproc.worker_exited, path),
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
