"""``aegis``: argv → configuration → listeners → :func:`aegis.cli.serve.serve`; ``aegis check``
goes to :mod:`.check`.

The program is a thin layer over the library: it owns what is process-wide (argv, logging, the
listening sockets and their files, signals, the descriptor limit, ``process_*`` metrics) and
hands the rest to :func:`aegis.proxy.make_app`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from ..config import Config, ConfigError
from ..configfile import load_targets
from ..proxy import make_app
from ..targets import Target, socket_file_identity
from ..webauth import setup_web_config
from ..webconfig import WebConfig, WebConfigError, load_web_config, server_ssl_context
from . import logformat
from .bounds import ConnectionBounds
from .flags import DEFAULT_HOSTPORT, build_parser, route_prefix
from .listeners import Listener, bind, remove_socket_files, socket_files, systemd_listeners
from .process import open_standard_streams, raise_fd_limit, register_process_metrics
from .serve import HELD_SIGNALS, Serving, serve

__all__ = ["main"]

log = logging.getLogger("aegis")


def main(argv: Sequence[str] | None = None) -> int:
    open_standard_streams()
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["check"]:  # the original takes no word that is not a flag's value
        from .check import main as check  # only then: serving never loads it

        return check(words[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logformat.configure(args.log_level, args.log_format)
    try:
        config = Config(
            sockdir=Path(args.sockdir),
            targets=_targets(parser, args),
            scrape_timeout=args.scrape_timeout,
            timeout_offset=args.timeout_offset,
            external_url=args.external_url,
            route_prefix=route_prefix(args.route_prefix, args.external_url),
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
    # From the start line on, a stop signal waits (pending) until the server takes it: one that
    # came while the listening sockets were being made would otherwise leave their files behind,
    # and end Aegis with 143 instead of its stop.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        return _run(args, config, web_config, listeners, serving)
    finally:
        # Taken here if nothing took it (a failed start): the failure's status stands.
        while signal.sigtimedwait(HELD_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _targets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Target]:
    """``--target`` flags, then ``--config.file``'s targets; a name given twice is an error."""
    targets: dict[str, Target] = {}
    for target in args.target:
        if target.name in targets:
            parser.error(f"--target {target.name}: given twice")
        targets[target.name] = target
    if args.config_file:
        for name, target in load_targets(args.config_file).items():
            if name in targets:
                raise ConfigError(
                    f"target {name!r} given twice: by --target and in "
                    f"{args.config_file} (targets.{name})"
                )
            targets[name] = target
    return targets


def _run(
    args: argparse.Namespace,
    config: Config,
    web_config: WebConfig | None,
    listeners: list[Listener],
    serving: Serving,
) -> int:
    # The original's start line, HOSTPORT -> SOCKDIR.
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
    # A target that is one of these sockets would proxy Aegis to itself: refused (kind loop).
    own = frozenset(identity for sock in socks if (identity := socket_file_identity(sock)))
    config = dataclasses.replace(config, listener_sockets=config.listener_sockets | own)
    try:
        registry = CollectorRegistry(auto_describe=True)
        register_process_metrics(registry)
        app = make_app(config, registry=registry)
        if web_config is not None:
            setup_web_config(app, web_config)
        return serve(app, socks, serving)
    finally:
        remove_socket_files(files)
