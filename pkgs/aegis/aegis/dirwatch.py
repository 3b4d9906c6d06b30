"""The socket directory's health, logged once per change for the whole server.

A directory that goes missing or unreadable makes every name in it fail, so it is said once, in
the log, when it happens (and at start), not once per request. With several worker processes
each one watches, and the first to see a change records it in a file they share (under a lock)
and logs it; the others find it already recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from .targets import MAX_SOCKET_ADDRESS, Targets, fits_an_address

__all__ = ["DirectoryWatch"]

log = logging.getLogger("aegis.sockdir")

#: How often each worker looks at the directory (three system calls) without being asked.
INTERVAL = 1.0
_STATE_FILE = "sockdir-state"
_UNSEEN = "\0unseen"


class DirectoryWatch:
    """Looks at the directory on :meth:`check` (and every :data:`INTERVAL` while :meth:`running`),
    and logs each change of its state.

    ``shared``: a directory every worker of one server can write (the multiprocess metrics
    directory), so only the first worker to notice a change logs it; None for a single process.
    """

    def __init__(self, targets: Targets, shared: str | os.PathLike[str] | None = None) -> None:
        self._targets = targets
        self._state_file = None if shared is None else Path(shared) / _STATE_FILE
        self._seen: str | None = _UNSEEN
        self._single = _UNSEEN

    def check(self) -> str | None:
        """The directory's problem now (None: it is fine), logged if that is news."""
        problem = self._targets.directory_problem()
        if problem != self._seen:
            self._seen = problem
            previous = self._record(problem)
            if previous is _UNSEEN:
                _log_start(self._targets, problem)
            elif previous is not None:
                _log_change(self._targets, problem)
        return problem

    def count_targets(self) -> int | None:
        """Targets now, or None when the directory cannot be listed (for ``aegis_targets``)."""
        self.check()
        return self._targets.count()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self.check()
        task = asyncio.create_task(self._watch())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            self.check()

    def _record(self, problem: str | None) -> str | None:
        """The state the server was in before, when this process is the first to see
        ``problem`` (:data:`_UNSEEN` at the server's start); else None."""
        text = "ok" if problem is None else f"unavailable: {problem}"
        if self._state_file is None:
            previous, self._single = self._single, text
            return previous
        try:
            return _exchange(self._state_file, text)
        except OSError as exc:  # then each worker says it: twice is better than never
            log.warning("cannot share the socket directory's state: %s", exc)
            self._state_file = None
            return self._record(problem)


def _exchange(path: Path, text: str) -> str | None:
    """Write ``text`` to the file at ``path`` and return what it held (:data:`_UNSEEN` when
    nothing), under a lock; None, writing nothing, when it already held ``text``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        known = os.read(fd, 65536).decode(errors="replace") or _UNSEEN
        if known == text:
            return None
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, text.encode(errors="replace"))
        return known
    finally:
        os.close(fd)  # releases the lock


def _log_start(targets: Targets, problem: str | None) -> None:
    if problem is not None:
        _log_change(targets, problem)
    for target in targets.explicit.values():
        if not target.socket.exists():
            log.warning("target %s: socket %s does not exist (yet)", target.name, target.socket)
    long_paths = [str(t.socket) for t in targets.explicit.values() if not fits_an_address(t.socket)]
    if not fits_an_address(targets.sockdir / "x.sock"):
        long_paths.append(f"every socket in {targets.sockdir}")
    if long_paths and not os.path.isdir("/proc/self/fd"):
        log.warning(
            "socket paths longer than %d bytes are reached through /proc/self/fd, and /proc is "
            "not mounted: %s will fail",
            MAX_SOCKET_ADDRESS,
            ", ".join(long_paths),
        )


def _log_change(targets: Targets, problem: str | None) -> None:
    if problem is None:
        log.info("socket directory %s is available again", targets.sockdir)
        return
    # Explicit targets do not depend on the directory: say they are still served.
    still = "; explicit targets are still served" if targets.explicit else ""
    log.warning(
        "socket directory unavailable: %s: its names get 503 and /-/sd answers 503%s",
        problem,
        still,
    )
