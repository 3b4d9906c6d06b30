"""The socket directory's health, logged once per change.

A directory that goes missing or unreadable makes every name in it fail, so it is said once, in
the log, when it happens (and at start), not once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from .targets import MAX_SOCKET_ADDRESS, Targets, fits_an_address

__all__ = ["DirectoryWatch"]

log = logging.getLogger("aegis.sockdir")

#: How often the directory is looked at (three system calls) without being asked.
INTERVAL = 1.0
_UNSEEN = "\0unseen"


class DirectoryWatch:
    """Looks at the directory on :meth:`check` (and every :data:`INTERVAL` while :meth:`running`),
    and logs each change of its state."""

    def __init__(self, targets: Targets) -> None:
        self._targets = targets
        self._seen: str | None = _UNSEEN

    def check(self) -> str | None:
        """The directory's problem now (None: it is fine), logged if that is news."""
        problem = self._targets.directory_problem()
        if problem != self._seen:
            if self._seen is _UNSEEN:
                _log_start(self._targets, problem)
            else:
                _log_change(self._targets, problem)
            self._seen = problem
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
