"""Where Aegis listens: TCP addresses, Unix socket paths and sockets systemd passes.

Each listener is one socket, bound before anything is served (:func:`bind`): a port in use, by
anyone, a second Aegis included, is one clear error at start, and no other program can join the
port, since nothing sets ``SO_REUSEPORT``. A Unix socket path that
something accepts on is "in use" the same way; a socket file nothing accepts on (left by a
killed Aegis) is replaced, and anything that is not a socket is never removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Listener", "bind", "remove_socket_files", "socket_files", "systemd_listeners"]

_SD_LISTEN_FDS_START = 3
_BACKLOG = 1024
_NOT_SENT_LOW_WATER = 512 * 1024
# Unix listeners are created owner and group read-write, whatever the umask: connecting needs
# write permission, so the socket's group (the directory's, if it is setgid) can scrape and
# nobody else can. A directory that is itself closed keeps even the group out.
_UNIX_SOCKET_UMASK = 0o117
# How long the probe of an existing socket file may wait for a listener to take it.
_UNIX_PROBE_TIMEOUT = 1.0


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


def bind(listeners: Sequence[Listener]) -> list[socket.socket]:
    """One listening socket per listener.

    An ``OSError`` names the listener that failed: "address in use" alone does not say which.
    """
    socks: list[socket.socket] = []
    try:
        for listener in listeners:
            try:
                socks.append(_bind_one(listener))
            except OSError as exc:
                raise OSError(exc.errno, f"{listener}: {exc.strerror or exc}") from exc
    except OSError:
        # The socket files bound so far go too: left behind, they would look like a killed run's.
        remove_socket_files(socket_files(listeners[: len(socks)]))
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind_one(listener: Listener) -> socket.socket:
    if listener.fd >= 0:
        sock = socket.socket(fileno=listener.fd)
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _bound_unsent(sock)
        return sock
    if listener.unix_path:
        return _bind_unix(listener.unix_path)
    return _bind_tcp(listener.host, listener.port)


def _bind_tcp(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR only lets a restart bind past connections in TIME_WAIT; never
        # SO_REUSEPORT, which would let a second program (or a second Aegis) share the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bound_unsent(sock)
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


def _bound_unsent(sock: socket.socket) -> None:
    """Keep at most ``_NOT_SENT_LOW_WATER`` bytes not yet sent in the kernel per connection
    (accepted sockets inherit it). Without it the kernel takes megabytes of answers for a client
    that does not read, and the transport never sees a full buffer, so the write deadline
    (``--web.write-timeout``) would never start."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NOT_SENT_LOW_WATER)


def _bind_unix(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        # Only a socket file is ever replaced (nothing else is ours to remove, and a symlink is
        # not followed: bind() then fails with "Address already in use"), and only one nobody
        # accepts on: left behind by a killed run. Unlinking a live one would take its address
        # from a running server (a second Aegis) and leave it unreachable.
        if stat.S_ISSOCK(os.lstat(path).st_mode) and not _accepting(path):
            os.unlink(path)
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


def _accepting(path: str) -> bool:
    """Whether something listens on the socket file at ``path``; raises "Address already in use"
    if it does, False if the file is stale (connection refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_UNIX_PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        except FileNotFoundError:
            return False  # gone meanwhile: bind() will create it
        except (BlockingIOError, TimeoutError):
            pass  # a listener whose queue is full is a listener
    raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))


def socket_files(listeners: Sequence[Listener]) -> dict[str, int]:
    """The Unix-socket files just bound, each with its inode, for :func:`remove_socket_files`."""
    files = {}
    for item in listeners:
        if item.unix_path:
            with contextlib.suppress(OSError):
                files[item.unix_path] = os.stat(item.unix_path).st_ino
    return files


def remove_socket_files(files: dict[str, int]) -> None:
    """Remove the socket files Aegis created, unless another process has bound the path since."""
    for path, inode in files.items():
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == inode:
                os.unlink(path)
