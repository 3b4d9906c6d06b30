"""Names → sockets: which Unix socket a request name reaches, and which targets exist.

A name comes from the request path, so it is untrusted: it must be a single path component from a
conservative character set before it is joined to anything. Beyond that, the directory is the
configuration: ``<sockdir>/<name>.sock`` exists and is a socket, or the name is unknown. A symlink
in the directory may point at a socket elsewhere; that is how a service that keeps its socket in
its own runtime directory is added.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SOCKET_SUFFIX = ".sock"
MAX_NAME_LENGTH = 100
# Leading character excludes hidden names, "." and "..", and "-" (reserved for /-/ paths).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_UPSTREAM_PATH = re.compile(r"/[\x21-\x7e]*")


class BadName(ValueError):
    """The request name can never name a target (answered 400)."""


class NoSuchTarget(LookupError):
    """No socket is behind the name (answered 404)."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid target name, else raise :class:`BadName`."""
    if not name:
        raise BadName("empty name")
    if len(name) > MAX_NAME_LENGTH:
        raise BadName(f"name longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise BadName("name must be letters, digits, '_', '-' or '.', not starting with '.' or '-'")
    return name


@dataclass(frozen=True, slots=True)
class Target:
    """An explicit target: a socket anywhere, and the path its service publishes metrics on."""

    name: str
    socket: Path
    path: str = "/metrics"

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket", Path(self.socket))
        if not str(self.socket) or str(self.socket) == ".":
            raise ValueError(f"target {self.name!r}: empty socket path")
        if not self.socket.is_absolute():
            # Relative to whatever directory Aegis was started in (/ under systemd): a trap.
            raise ValueError(
                f"target {self.name!r}: socket path {str(self.socket)!r} is not absolute"
            )
        if not _UPSTREAM_PATH.fullmatch(self.path):
            raise ValueError(
                f"target {self.name!r}: path {self.path!r} must start with '/' and contain no "
                "spaces or control characters"
            )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A resolved target, valid for one request."""

    name: str
    socket: str
    path: str
    #: (st_dev, st_ino) of the socket file: a service that restarts and replaces its socket file
    #: gets a new identity, so pooled connections to the old one are never reused for it.
    identity: tuple[int, int]


class Targets:
    """Resolves names against the explicit targets first, then the socket directory."""

    __slots__ = ("_explicit", "_sockdir")

    def __init__(self, sockdir: Path, explicit: Mapping[str, Target]) -> None:
        self._sockdir = sockdir
        self._explicit = explicit

    @property
    def sockdir(self) -> Path:
        return self._sockdir

    def resolve(self, name: str) -> Endpoint:
        """The endpoint behind ``name``.

        Raises :class:`BadName`, :class:`NoSuchTarget`, or :class:`PermissionError` when the
        socket (or the directory holding it) exists but this process may not look at it.
        """
        explicit = self._explicit.get(name)
        if explicit is not None:
            socket_path, upstream_path = str(explicit.socket), explicit.path
        else:
            check_name(name)
            socket_path = os.path.join(self._sockdir, name + SOCKET_SUFFIX)
            upstream_path = "/metrics"
        try:
            st = os.stat(socket_path)
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchTarget(f"{socket_path}: no such socket") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise NoSuchTarget(f"{socket_path}: not a socket")
        return Endpoint(name, socket_path, upstream_path, (st.st_dev, st.st_ino))

    def names(self) -> list[str]:
        """Every target name: explicit ones always, and each socket in the directory now."""
        found = set(self._explicit)
        found.update(self._scan())
        return sorted(found)

    def _scan(self) -> Iterator[str]:
        try:
            entries = list(os.scandir(self._sockdir))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        for entry in entries:
            name = entry.name.removesuffix(SOCKET_SUFFIX)
            if name == entry.name or not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
                continue
            try:
                if stat.S_ISSOCK(os.stat(entry.path).st_mode):
                    yield name
            except OSError:
                continue
