"""Running the proxy as a process: listening sockets, worker processes, signals, graceful stop.

This is the command line's engine, not the library: it installs signal handlers and forks. Other
programs mount :func:`aegis.proxy.make_app` in their own server instead.

Several workers share each TCP port through ``SO_REUSEPORT`` (the kernel spreads connections
across them); Unix-socket and systemd-provided listeners are one socket that every worker accepts
on. The parent binds everything before forking, so a port in use is one clear error at start, and
then only supervises: it forwards SIGTERM/SIGINT, restarts a worker that died, and exits 0 once
every worker finished its in-flight scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from .timeouts import HeadTimeout

log = logging.getLogger("aegis.server")

_SD_LISTEN_FDS_START = 3
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_BACKLOG = 1024
# Unix listeners are created owner and group read-write, whatever the umask: connecting needs
# write permission, so the socket's group (the directory's, if it is setgid) can scrape and
# nobody else can. A directory that is itself closed keeps even the group out.
_UNIX_SOCKET_UMASK = 0o117


@dataclass(frozen=True, slots=True)
class Listener:
    """Where to accept scrapes: TCP ``host:port``, ``unix:/path``, or an inherited descriptor."""

    host: str = ""
    port: int = 0
    unix_path: str = ""
    fd: int = -1

    @classmethod
    def parse(cls, text: str) -> Listener:
        """``host:port``, ``[v6]:port``, ``:port`` (every address) or ``unix:/path``."""
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path:
                raise ValueError(f"{text!r}: unix: needs a socket path")
            return cls(unix_path=path)
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r} is not host:port (IPv6 in brackets: [::1]:31337)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host or "[" in host or "]" in host:
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets, like [::1]:31337")
        return cls(host=host, port=int(port_text))

    def __str__(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        if self.fd >= 0:
            return f"fd:{self.fd}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def systemd_listeners() -> list[Listener]:
    """The sockets systemd passed (``LISTEN_FDS``), or an error saying why there are none."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        raise ValueError("--web.systemd-socket: LISTEN_PID does not name this process")
    count = int(os.environ.get("LISTEN_FDS", "0") or "0")
    if count < 1:
        raise ValueError("--web.systemd-socket: systemd passed no sockets (LISTEN_FDS)")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return [Listener(fd=fd) for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + count)]


def bind(listeners: Sequence[Listener], workers: int) -> list[list[socket.socket]]:
    """The listening sockets of each worker (index = worker).

    An ``OSError`` names the listener that failed: "address in use" alone does not say which.
    """
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    for listener in listeners:
        try:
            _bind_one(listener, per_worker)
        except OSError as exc:
            raise OSError(exc.errno, f"{listener}: {exc.strerror or exc}") from exc
    return per_worker


def _bind_one(listener: Listener, per_worker: list[list[socket.socket]]) -> None:
    if listener.fd >= 0:
        shared = socket.socket(fileno=listener.fd)
        shared.setblocking(False)
        for socks in per_worker:
            socks.append(shared)
    elif listener.unix_path:
        shared = _bind_unix(listener.unix_path)
        for socks in per_worker:
            socks.append(shared)
    else:
        port = listener.port
        for socks in per_worker:
            sock = _bind_tcp(listener.host, port, reuse_port=len(per_worker) > 1)
            port = sock.getsockname()[1]  # with port 0, the others join the one picked
            socks.append(sock)


def _bind_tcp(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "[::]:31337" means every address, IPv4 included, as it does for the Go original.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_unix(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left behind by an earlier run; anything else is not ours to remove
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(_UNIX_SOCKET_UMASK)  # set at bind(): no moment with a wider mode
    try:
        sock.bind(path)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(umask)
    return sock


def socket_files(listeners: Sequence[Listener]) -> dict[str, int]:
    """The Unix-socket files just bound, each with its inode, for :func:`remove_socket_files`."""
    return {item.unix_path: os.stat(item.unix_path).st_ino for item in listeners if item.unix_path}


def remove_socket_files(files: dict[str, int]) -> None:
    """Remove the socket files Aegis created, unless another process has bound the path since."""
    for path, inode in files.items():
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == inode:
                os.unlink(path)


@dataclass(frozen=True, slots=True)
class Serving:
    """How the workers serve their listeners."""

    shutdown_grace: float = 10.0
    #: TLS on every listener (``--web.config.file``), or plain HTTP.
    ssl_context: ssl.SSLContext | None = None
    #: Seconds from accept (or a request's first byte) to the end of its head; also bounds
    #: the TLS handshake.
    read_header_timeout: float = 10.0
    #: Seconds a connection may wait for its next request.
    idle_timeout: float = 120.0


AppFactory = Callable[[], web.Application]


def serve(
    app_factory: AppFactory,
    socks: list[list[socket.socket]],
    serving: Serving,
    *,
    on_worker_exit: Callable[[int], None] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status. ``on_worker_exit(pid)`` is called
    in the parent for each worker process that ended."""
    if len(socks) == 1:
        return _run_worker(app_factory, socks[0], serving)
    return _supervise(app_factory, socks, serving, on_worker_exit)


def _run_worker(app_factory: AppFactory, socks: list[socket.socket], serving: Serving) -> int:
    async def main() -> None:
        runner = web.AppRunner(
            app_factory(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=serving.shutdown_grace,
            keepalive_timeout=serving.idle_timeout,
            # A scraper that hangs up cancels its handler, so the upstream exchange, its
            # connection and its concurrency slot are given back at once.
            handler_cancellation=True,
        )
        await runner.setup()
        assert runner.server is not None
        # Not web.SockSite: it cannot wrap the connection's protocol (the head deadline), and it
        # would listen() again with a backlog of 128.
        protocol = HeadTimeout.factory(runner.server, serving.read_header_timeout)
        loop = asyncio.get_running_loop()
        handshake = serving.read_header_timeout if serving.ssl_context else None
        servers = [
            await loop.create_server(
                protocol,
                sock=sock,
                ssl=serving.ssl_context,
                ssl_handshake_timeout=handshake,
                backlog=_BACKLOG,
            )
            for sock in socks
        ]
        # Everything built so far lives as long as the worker: keep the collector off it.
        gc.freeze()
        stop = asyncio.Event()
        for signum in _STOP_SIGNALS:
            loop.add_signal_handler(signum, stop.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        await stop.wait()
        log.debug("worker %d stopping: finishing in-flight scrapes", os.getpid())
        for server in servers:
            server.close()  # not wait_closed(): that waits for every connection
        await runner.cleanup()

    # A stop signal that comes while the worker starts waits for its handler, rather than
    # killing the worker half-started (and its supervisor then reporting a failure).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return None
    return uvloop.new_event_loop


def _supervise(
    app_factory: AppFactory,
    socks: list[list[socket.socket]],
    serving: Serving,
    on_worker_exit: Callable[[int], None] | None,
) -> int:
    watched = {signal.SIGCHLD, *_STOP_SIGNALS}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    # What the parent imported is shared with every worker until someone writes to it; the
    # collector's bookkeeping is such a write, so the start-up objects are kept out of its way.
    gc.collect()
    gc.freeze()
    every_socket = {sock for per_worker in socks for sock in per_worker}

    def spawn(index: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, {*old_mask, *_STOP_SIGNALS})
                # Other workers' sockets came along with the fork; kept, they would hold the
                # port open while this worker finishes its scrapes after SIGTERM.
                for sock in every_socket.difference(socks[index]):
                    sock.close()
                code = _run_worker(app_factory, socks[index], serving)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        return pid

    workers = {spawn(index): index for index in range(len(socks))}
    log.info("%d workers: %s", len(workers), " ".join(map(str, workers)))
    grace = serving.shutdown_grace
    stopping_since: float | None = None
    failed = False
    while workers:
        info = signal.sigtimedwait(watched, 1.0)
        if info is not None and info.si_signo in _STOP_SIGNALS and stopping_since is None:
            stopping_since = time.monotonic()
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            # The parent's copies keep each port listening after the workers closed theirs:
            # new connections would queue for nobody and be reset at exit instead of refused.
            for sock in every_socket:
                sock.close()
        while workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            index = workers.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if on_worker_exit is not None:
                on_worker_exit(pid)
            if stopping_since is None:
                log.error("worker %d (pid %d) exited with %d; starting a new one", index, pid, code)
                time.sleep(1.0)  # a worker that dies at once must not become a fork loop
                workers[spawn(index)] = index
            elif code != 0:
                failed = True
        if stopping_since is not None and time.monotonic() - stopping_since > grace + 5:
            log.error("workers did not stop within %.0f s; killing them", grace + 5)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            failed = True
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 1 if failed else 0
