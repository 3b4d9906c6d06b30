"""Names → sockets: which Unix socket a request name reaches, and which targets exist.

A name comes from the request path, so it is untrusted: it must be a single path component from a
conservative character set before it is joined to anything. Beyond that, the directory is the
configuration: ``<sockdir>/<name>.sock`` exists and is a socket, or the name is unknown. A symlink
in the directory may point at a socket elsewhere; that is how a service that keeps its socket in
its own runtime directory is added.

A link is followed only when it is owned by the directory's owner or by the user Aegis runs as,
as the kernel's ``fs.protected_symlinks`` does for sticky directories: the directory is usually
writable by a group (``3770 root:within``), and a member's link would reach any socket Aegis
can open, a ``0600`` one of Aegis's own user included, that the member cannot open itself. Any
other link is a 404 for its name, is left out of the lists, and is logged once (at most a line
a minute per owner). A link is read from the link itself (its owner and its text in one open
descriptor), so it cannot be swapped between the check and the use; a link that leads to
another entry of the directory has that entry checked in turn.

The directory itself can fail (missing, unreadable, not a directory, a symlink loop): then
:class:`DirectoryUnavailable` says so, rather than every name looking unknown and the list empty.

A Unix socket address holds at most 107 bytes of path (``sun_path``); the event loop refuses or
silently truncates a longer one, and a truncated path can name a different socket. A longer
socket path is opened with ``O_PATH`` and reached through ``/proc/self/fd/N``, which names
exactly the inode that was checked.

The list of targets (:meth:`Targets.catalog`) carries each socket's file, owner, group and mode,
taken from the status the listing reads anyway to tell sockets from other files: they cost no
system call of their own. A socket's facts are read again when the directory changes, unless
they were read well after the file last changed (its ctime): a service that binds its socket
and then changes its owner or mode at once is seen as it ends up. A change much later to a
socket that stays shows once the socket is made anew (the service restarts) or Aegis restarts.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import re
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .logs import Throttled
from .socketinfo import OwnerNames, SocketFile

SOCKET_SUFFIX = ".sock"
MAX_NAME_LENGTH = 100
#: The longest socket path connected to by name: ``sun_path`` is 108 bytes, Python wants a NUL in
#: it, and uvloop cuts a longer path at 108 without a word.
MAX_SOCKET_ADDRESS = 107
# Descriptors kept open for the sockets connected to through /proc/self/fd (every entry of the
# socket directory, and long paths): one per socket in use, bounded; past it, opened per request.
_MAX_PINNED = 256
# How old the directory's time stamps must be before a listing is reused on their word: well
# past the file system clock's tick (a jiffy, up to 10 ms).
_SETTLED_NS = 1_000_000_000
# Leading character excludes hidden names, "." and "..", and "-" (reserved for /-/ paths).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_UPSTREAM_PATH = re.compile(r"/[\x21-\x7e]*")
_MISSING = (errno.ENOENT, errno.ENOTDIR)
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
_PROC_FD = "/proc/self/fd"
# Links followed within the socket directory for one name (the kernel allows 40 in a path).
_MAX_LINKS = 8
# Untrusted links remembered as logged already (then forgotten all at once, and logged again).
_MAX_WARNED = 1024

log = logging.getLogger("aegis.sockdir")


class BadName(ValueError):
    """The request name can never name a target (answered 400)."""


class NoSuchTarget(LookupError):
    """No socket is behind the name (answered 404)."""


class DirectoryUnavailable(Exception):
    """The socket directory cannot be read or searched: no name in it can be resolved or listed.

    ``reason`` is one line for people, e.g. ``"/run/metrics: permission denied"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid target name, else raise :class:`BadName`."""
    if not name:
        raise BadName("empty name")
    if len(name) > MAX_NAME_LENGTH:
        raise BadName(f"name longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise BadName("name must be letters, digits, '_', '-' or '.', not starting with '.' or '-'")
    return name


def directory_problem(path: Path) -> str | None:
    """Why names in ``path`` cannot be listed and looked up, or None when they can: it must be a
    directory this process may read (list) and search (stat the entries)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _OUT_OF_DESCRIPTORS:
            # Nothing is wrong with the directory; the connect that follows fails and says why.
            return None
        return f"{path}: {_describe(exc)}"
    try:
        # A lookup relative to the directory needs its search (x) permission, as every name does.
        os.stat(".", dir_fd=fd)
    except OSError as exc:
        return f"{path}: {_describe(exc)}"
    finally:
        os.close(fd)
    return None


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "does not exist"
    if exc.errno == errno.ENOTDIR:
        return "is not a directory"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return (exc.strerror or str(exc)).lower()


def fits_an_address(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` fits a socket address whole (else it is reached through /proc)."""
    path = os.fspath(path)
    if path.isascii():
        return len(path) <= MAX_SOCKET_ADDRESS
    return len(os.fsencode(path)) <= MAX_SOCKET_ADDRESS


def socket_file_identity(sock: socket.socket) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file a Unix socket is bound to: what a target that names the
    same socket resolves to (:attr:`Endpoint.identity`). None for other sockets (TCP, abstract,
    unnamed) and for a file that is gone or was replaced by something else."""
    if sock.family != socket.AF_UNIX:
        return None
    name = sock.getsockname()
    if not isinstance(name, str) or not name or name.startswith("\0"):
        return None
    try:
        st = os.stat(name)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


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
        if len(os.fsencode(self.socket)) >= os.pathconf("/", "PC_PATH_MAX"):
            raise ValueError(f"target {self.name!r}: socket path longer than the system allows")
        if not _UPSTREAM_PATH.fullmatch(self.path):
            raise ValueError(
                f"target {self.name!r}: path {self.path!r} must start with '/' and contain no "
                "spaces or control characters"
            )


class _Pinned:
    """An ``O_PATH`` descriptor of one socket file, closed once nothing refers to it: a request
    that holds its endpoint can never see the number reused for another file."""

    __slots__ = ("fd", "identity")

    def __init__(self, fd: int, identity: tuple[int, int] | None) -> None:
        self.fd = fd
        self.identity = identity

    @classmethod
    def open(cls, path: str, *, follow: bool = True) -> _Pinned:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None)

    def __del__(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A resolved target, valid for one request."""

    name: str
    #: The socket's path, for people (logs, errors).
    socket: str
    path: str
    #: (st_dev, st_ino) of the socket file: a service that restarts and replaces its socket file
    #: gets a new identity, so pooled connections to the old one are never reused for it.
    identity: tuple[int, int]
    #: What to connect to: ``socket`` itself, or for a path too long for a socket address, a
    #: ``/proc/self/fd`` name of that very file, valid while this endpoint exists.
    address: str = ""
    _pinned: _Pinned | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.address:
            object.__setattr__(self, "address", self.socket)


@dataclass(frozen=True, slots=True, eq=False)
class Catalog:
    """Every target now, and its socket's facts: what ``/-/sd`` and the landing page list.

    The same object while nothing in it changes (:meth:`Targets.catalog`), so what is built
    from it can be kept, and ``is`` tells whether it still holds."""

    #: Every target name, sorted.
    names: tuple[str, ...]
    #: Each name's socket: where its links lead, its owner, group and mode. An explicit target
    #: whose socket cannot be looked at (missing, or in a directory this process may not
    #: search) has its configured path, and empty owner, group and mode.
    sockets: Mapping[str, SocketFile]


class Targets:
    """Resolves names against the explicit targets first, then the socket directory."""

    __slots__ = (
        "_catalog",
        "_catalog_from",
        "_explicit",
        "_files",
        "_kinds",
        "_link_log",
        "_listing",
        "_pinned",
        "_sockdir",
        "_warned",
    )

    def __init__(self, sockdir: Path, explicit: Mapping[str, Target]) -> None:
        self._sockdir = sockdir
        self._explicit = explicit
        self._warned: set[tuple[int, int]] = set()  # untrusted links logged, by (dev, inode)
        self._link_log = Throttled(log)
        self._pinned: dict[str, _Pinned] = {}
        self._kinds: dict[str, _Kind] = {}
        self._listing: _Listing | None = None
        # The last catalog, and what it was made of: the listing and the facts of the links'
        # and explicit targets' sockets, which are looked at anew each time.
        self._catalog: Catalog | None = None
        self._catalog_from: tuple[_Listing | None, dict[str, SocketFile]] = (None, {})
        # Facts of sockets reached through links or explicit targets, by the path named: the
        # same while the file's status says the same (a path's links are resolved only then).
        self._files: dict[str, tuple[tuple[int, ...], SocketFile]] = {}

    @property
    def sockdir(self) -> Path:
        return self._sockdir

    @property
    def explicit(self) -> Mapping[str, Target]:
        return self._explicit

    def resolve(self, name: str) -> Endpoint:
        """The endpoint behind ``name``.

        Raises :class:`BadName`, :class:`NoSuchTarget`, :class:`DirectoryUnavailable` (a name in
        the socket directory when the directory itself fails), :class:`PermissionError` when
        an explicit target's socket exists but this process may not look at it, or another
        OSError when the process is out of descriptors (EMFILE, ENFILE).
        """
        explicit = self._explicit.get(name)
        try:
            if explicit is not None:
                # The operator's own: followed wherever it leads.
                socket_path, upstream_path = str(explicit.socket), explicit.path
                path, st, inside = socket_path, os.stat(socket_path), False
            else:
                check_name(name)
                socket_path = os.path.join(self._sockdir, name + SOCKET_SUFFIX)
                upstream_path = "/metrics"
                path, st, inside = self._follow(socket_path)
        except OSError as exc:
            raise self._lookup_failure(exc, socket_path, in_directory=explicit is None) from None
        if not stat.S_ISSOCK(st.st_mode):
            raise NoSuchTarget(f"{socket_path}: not a socket")
        identity = (st.st_dev, st.st_ino)
        # An entry of the socket directory is reached through a descriptor of the very file
        # checked: connected to by name, a group member could rename a link over the entry
        # between the check and the connect, and reach any socket Aegis can open. Without
        # /proc there is no such name: then the path, as for the operator's own targets.
        fits = fits_an_address(path)
        if fits and not inside:
            return Endpoint(name, socket_path, upstream_path, identity, path)
        pinned = self._pin(path, identity, follow=not inside, needed=not fits)
        if pinned is None:
            return Endpoint(name, socket_path, upstream_path, identity, path)
        return Endpoint(
            name, socket_path, upstream_path, identity, f"{_PROC_FD}/{pinned.fd}", pinned
        )

    def _follow(self, entry: str) -> tuple[str, os.stat_result, bool]:
        """The path to connect to for the directory entry ``entry``, its status, and whether
        it is an entry of the socket directory (else a trusted link led out of it): links in
        the socket directory are followed only when a trusted user owns them (see the module's
        description); where a link leads outside it, the system follows the rest. Raises
        :class:`NoSuchTarget` for a link that is not trusted, OSError as ``os.stat`` does."""
        st = os.lstat(entry)
        if not stat.S_ISLNK(st.st_mode):
            return entry, st, True  # the common case: one system call, as a plain stat was
        directory = os.stat(self._sockdir)
        trusted = {directory.st_uid, os.geteuid()}
        path = entry
        for _ in range(_MAX_LINKS):
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                link = os.fstat(fd)
                if not stat.S_ISLNK(link.st_mode):
                    return path, link, True
                if link.st_uid not in trusted:
                    self._untrusted(entry, path, link, directory.st_uid)
                    raise NoSuchTarget(f"{path}: a link owned by {_user(link.st_uid)}")
                text = os.readlink("", dir_fd=fd)  # the text of this very link (readlinkat)
            finally:
                os.close(fd)
            path = os.path.join(os.path.dirname(path), text)
            try:
                parent = os.stat(os.path.dirname(path) or ".")
            except OSError:
                parent = None
            if parent is None or (parent.st_dev, parent.st_ino) != (
                directory.st_dev,
                directory.st_ino,
            ):
                # Out of the directory: the system follows it.
                return path, os.stat(path), False
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), entry)

    def _untrusted(self, entry: str, path: str, link: os.stat_result, owner: int) -> None:
        key = (link.st_dev, link.st_ino)
        if key in self._warned:
            return
        if len(self._warned) >= _MAX_WARNED:
            self._warned.clear()
        self._warned.add(key)
        via = "" if path == entry else f" (reached through {entry})"
        self._link_log.log(
            ("untrusted link", link.st_uid),
            logging.WARNING,
            f"link {path}{via} is owned by {_user(link.st_uid)}, neither the socket "
            f"directory's owner ({_user(owner)}) nor aegis's user ({_user(os.geteuid())}): not "
            "followed; its name is a 404 and is not listed",
        )

    def _lookup_failure(self, exc: OSError, socket_path: str, *, in_directory: bool) -> Exception:
        if in_directory and (problem := directory_problem(self._sockdir)) is not None:
            return DirectoryUnavailable(problem)
        if isinstance(exc, PermissionError):
            # An explicit socket's, or with the directory searchable, where an entry of it links
            # to: a name that exists, so it may be a label. The handler explains file and group
            # of where the links lead.
            return PermissionError(exc.errno, exc.strerror, os.path.realpath(socket_path))
        if exc.errno in _MISSING:
            return NoSuchTarget(f"{socket_path}: no such socket")
        return NoSuchTarget(f"{socket_path}: {_describe(exc)}")

    def _pin(
        self, socket_path: str, identity: tuple[int, int], *, follow: bool, needed: bool
    ) -> _Pinned | None:
        """A descriptor of the socket file ``identity`` names: the cached one while the path
        still names that file (a link at the path is followed only if ``follow``). Without
        /proc, None, unless ``needed`` (a path too long to connect to by name)."""
        pinned = self._pinned.get(socket_path)
        if pinned is None or pinned.identity != identity:
            if not os.path.isdir(_PROC_FD):
                if not needed:
                    return None
                raise NoSuchTarget(
                    f"{socket_path}: longer than {MAX_SOCKET_ADDRESS} bytes, and {_PROC_FD} "
                    "(mount /proc) is needed to reach it"
                )
            try:
                pinned = _Pinned.open(socket_path, follow=follow)
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    raise  # nothing wrong with the socket: the connect would fail the same way
                raise NoSuchTarget(f"{socket_path}: {_describe(exc)}") from None
            if pinned.identity != identity:  # replaced between stat and open: ask again later
                raise NoSuchTarget(f"{socket_path}: replaced while being looked up")
            if len(self._pinned) >= _MAX_PINNED:
                # Requests in flight keep their own reference: only the cache forgets it.
                del self._pinned[next(iter(self._pinned))]
            self._pinned[socket_path] = pinned
        return pinned

    def names(self) -> tuple[str, ...]:
        """Every target name, sorted: explicit ones always, and each socket in the directory
        now (:attr:`Catalog.names`).

        Raises :class:`DirectoryUnavailable` when the directory cannot be listed: an empty list
        would tell service discovery that every target is gone."""
        return self.catalog().names

    def catalog(self) -> Catalog:
        """Every target and its socket's facts. The very same object is returned for as long
        as they stay the same. Raises :class:`DirectoryUnavailable` as :meth:`names` does."""
        listing = self._current_listing()
        # Looked at each time: what a link points at, or an explicit socket, may change with no
        # trace in the directory. A few system calls each; the directory's sockets cost none.
        files = self._followed_files(listing.links)
        files.update(self._explicit_files())
        self._files = {path: self._files[path] for path in self._used(listing.links)}
        last = self._catalog
        from_listing, from_files = self._catalog_from
        if last is not None and from_listing is listing and from_files == files:
            return last
        merged = {**listing.sockets, **files} if files else listing.sockets
        if last is None or last.sockets != merged:
            last = self._catalog = Catalog(tuple(sorted(merged)), merged)
        self._catalog_from = (listing, files)
        return last

    def explicit_catalog(self) -> Catalog:
        """The explicit targets alone, with their sockets' facts: what is left to list when the
        socket directory cannot be (a new object each time)."""
        files = self._explicit_files()
        return Catalog(tuple(sorted(files)), files)

    def count(self) -> int | None:
        """How many targets exist now; None when the directory cannot be listed."""
        try:
            return len(self.catalog().names)
        except DirectoryUnavailable:
            return None

    def directory_problem(self) -> str | None:
        return directory_problem(self._sockdir)

    def _current_listing(self) -> _Listing:
        try:
            st = os.stat(self._sockdir)
        except OSError as exc:
            raise DirectoryUnavailable(f"{self._sockdir}: {_describe(exc)}") from None
        # Any entry added, removed or renamed changes the directory's mtime, a chmod its ctime:
        # while both stay, so does the listing. Except for a change in the same clock tick as
        # the listing, so a listing is kept only once its time stamps are well in the past.
        key = (st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)
        listing = self._listing
        if listing is None or listing.key != key:
            listing = self._list(key)
            settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS
            # Kept once its sockets' facts are settled too, so that they are read again then.
            self._listing = listing if settled and listing.settled else None
        return listing

    def _followed_files(self, links: tuple[str, ...]) -> dict[str, SocketFile]:
        """The links of the directory that lead to a socket, by target name, with its facts."""
        found: dict[str, SocketFile] = {}
        for link in links:
            entry = os.path.join(self._sockdir, link)
            try:
                path, st, _ = self._follow(entry)
            except (OSError, NoSuchTarget):
                # Dangling, a loop, into a directory this process may not search, or not owned
                # by a trusted user.
                continue
            if stat.S_ISSOCK(st.st_mode):
                found[link[: -len(SOCKET_SUFFIX)]] = self._file(entry, path, st)
        return found

    def _explicit_files(self) -> dict[str, SocketFile]:
        files: dict[str, SocketFile] = {}
        for name, target in self._explicit.items():
            path = str(target.socket)
            try:
                st = os.stat(path)
            except OSError:
                files[name] = SocketFile(path, "", "", "")
                continue
            files[name] = self._file(path, path, st)
        return files

    def _file(self, named: str, path: str, st: os.stat_result) -> SocketFile:
        """The facts of ``path``'s file (``named`` leads there), kept while its status says
        the same."""
        key = (st.st_dev, st.st_ino, st.st_uid, st.st_gid, st.st_mode)
        kept = self._files.get(named)
        if kept is not None and kept[0] == key:
            return kept[1]
        found = OwnerNames().file(os.path.realpath(path), st)
        self._files[named] = (key, found)
        return found

    def _used(self, links: tuple[str, ...]) -> list[str]:
        """The paths whose facts are kept: those of the links and explicit targets now."""
        used = [os.path.join(self._sockdir, link) for link in links]
        used += [str(target.socket) for target in self._explicit.values()]
        return [path for path in used if path in self._files]

    def _list(self, key: tuple[int, ...]) -> _Listing:
        # What each plain entry was at the last listing, by inode: a file's type never changes,
        # so only new entries cost a stat call, and sockets whose facts were read too soon after
        # they changed, once, when they have settled (see the module's description). Rebuilt
        # from the entries present, so names that are gone are forgotten.
        known, self._kinds = self._kinds, {}
        sockets: dict[str, SocketFile] = {}
        links: list[str] = []
        directory = os.path.join(os.path.realpath(self._sockdir), "")
        owners = OwnerNames()
        now = time.time_ns()
        settled = True
        try:
            with os.scandir(self._sockdir) as entries:
                for entry in entries:
                    name = entry.name
                    if (
                        not name.endswith(SOCKET_SUFFIX)
                        or len(name) > MAX_NAME_LENGTH + len(SOCKET_SUFFIX)
                        or not _NAME.fullmatch(name, 0, len(name) - len(SOCKET_SUFFIX))
                    ):
                        continue
                    if entry.is_symlink():
                        links.append(name)
                        continue
                    inode = entry.inode()
                    kind = known.get(name)
                    if (
                        kind is None
                        or kind.inode != inode
                        or kind.read - kind.changed <= _SETTLED_NS < now - kind.changed
                    ):
                        if (st := _socket_status(entry)) is None:
                            kind = _Kind(inode, None, 0, now)
                        else:
                            found = owners.file(directory + name, st)
                            kind = _Kind(inode, found, st.st_ctime_ns, now)
                    settled = settled and kind.read - kind.changed > _SETTLED_NS
                    self._kinds[name] = kind
                    if kind.socket is not None:
                        sockets[name[: -len(SOCKET_SUFFIX)]] = kind.socket
        except OSError as exc:
            raise DirectoryUnavailable(f"{self._sockdir}: {_describe(exc)}") from None
        # A directory that may be listed but not searched: its plain entries fail their stat
        # above, but links are told by the listing alone, and each one's stat failing was
        # taken for a dangling link: a list of links would come out empty instead of failing.
        if (problem := directory_problem(self._sockdir)) is not None:
            raise DirectoryUnavailable(problem)
        return _Listing(key, sockets, tuple(links), settled)


@dataclass(frozen=True, slots=True, eq=False)
class _Listing:
    """The socket directory's entries, as of the directory's ``key`` (its identity and time
    stamps): plain sockets by target name, and the symlinks (file names) to follow anew."""

    key: tuple[int, ...]
    sockets: Mapping[str, SocketFile]
    links: tuple[str, ...]
    #: Whether every socket's facts were read well after its file last changed.
    settled: bool


class _Kind(NamedTuple):
    """What a plain entry of the directory was when last looked at."""

    inode: int
    #: Its facts if it is a socket, else None.
    socket: SocketFile | None
    #: The socket file's ctime (0 for other files, whose type is all that matters), and when
    #: its facts were read: read too soon after a change, they are read again once, when the
    #: file has settled.
    changed: int
    read: int


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return f"uid {uid}"


def _socket_status(entry: os.DirEntry[str]) -> os.stat_result | None:
    """The entry's status if it is a socket, else None. Raises :class:`PermissionError` when
    the directory may be listed but not searched."""
    # The directory says files and directories apart without a stat call; sockets and FIFOs
    # share "neither", so those need one.
    if entry.is_file() or entry.is_dir():
        return None
    try:
        st = entry.stat()
    except FileNotFoundError:
        return None  # removed since the listing
    return st if stat.S_ISSOCK(st.st_mode) else None
