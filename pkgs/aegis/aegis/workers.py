"""The worker processes of a server with several: forked, watched, replaced, stopped.

The process that binds the listening sockets is worker 0 itself: it forks the others before it
starts its own event loop, and then serves like them. (A parent that only supervised kept a
copy of the whole start-up heap that no worker used any more, once each worker had written to
its own: about 7 MB of 45.) A forked worker gets SIGTERM from the kernel when worker 0 dies,
however it dies (``PR_SET_PDEATHSIG``), and then removes what worker 0 would have removed.

Worker 0 replaces a worker that died, a second later, by forking again, now from inside its
running event loop. The new worker must then leave that loop alone: it never runs it, keeps the
collector off the inherited objects, and closes every inherited socket but the listening ones.
A client connection or an upstream connection of worker 0 left open in it would never end,
since a socket ends only when its last descriptor closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .accept import Shares
from .process import die_with_parent

__all__ = ["Hooks", "Workers"]

log = logging.getLogger("aegis.server")

# A worker that dies at once must not become a fork loop.
_RESPAWN_DELAY = 1.0
_REAP_POLL = 0.1
# How much likelier than worker 0 a forked worker is to be picked by the kernel's OOM killer.
_OOM_SCORE_ADJ_RAISE = 100
# A killed process is gone at once, unless stuck in the kernel: then it is not waited for.
_KILLED_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class Hooks:
    """Called in a forked worker right after ``fork()`` (``start``), in worker 0 for each
    worker that ended (``exit(pid)``), and in a worker that outlived worker 0 (``orphaned``)."""

    start: Callable[[], None] | None = None
    exit: Callable[[int], None] | None = None
    orphaned: Callable[[], None] | None = None


#: Runs a forked worker until it stops: ``(shares, index) -> exit status``.
RunWorker = Callable[[Shares, int], int]


class Workers:
    """Worker 0's view of the workers it forked (indexes 1 to ``count - 1``)."""

    def __init__(
        self, run: RunWorker, socks: list[socket.socket], count: int, hooks: Hooks
    ) -> None:
        self.shares = Shares(count)
        self._run = run
        self._socks = socks
        self._count = count
        self._hooks = hooks
        self._parent = os.getpid()
        self._children: dict[int, int] = {}  # pid -> index
        self._respawns: dict[int, asyncio.TimerHandle] = {}  # index -> pending replacement
        self._due: set[int] = set()  # indexes with no process, and no replacement pending yet
        self._stopping_since: float | None = None
        #: A worker failed to stop cleanly: the server's exit status is then 1.
        self.failed = False

    @property
    def pids(self) -> list[int]:
        """Worker 0 (this process) first, then the forked workers by index."""
        forked = sorted(self._children, key=self._children.__getitem__)
        return [self._parent, *forked]

    def start(self) -> None:
        """Fork workers 1 to ``count - 1``; before worker 0 starts its event loop."""
        for index in range(1, self._count):
            if self._spawn(index, in_loop=False) is None:
                self._due.add(index)  # tried again once the event loop runs

    def reap(self) -> None:
        """Collect the workers that ended; replace them, and those that could not be forked,
        a second later unless the server is stopping."""
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: its status is unknown
                done, status = pid, None
            if done == 0:
                continue
            index = self._children.pop(pid)
            self.shares.leave(index)
            if self._hooks.exit is not None:
                try:
                    self._hooks.exit(pid)
                except Exception:  # the replacement must come all the same
                    log.exception("worker %d (pid %d): cleaning up after it failed", index, pid)
            if self._stopping_since is None:
                log.error("worker %d (pid %d) %s; starting a new one", index, pid, _ended(status))
                self._due.add(index)
            elif status is None or os.waitstatus_to_exitcode(status) != 0:
                log.error("worker %d (pid %d) %s", index, pid, _ended(status))
                self.failed = True
        if self._due and self._stopping_since is None:
            loop = asyncio.get_running_loop()
            for index in self._due:
                self._respawns[index] = loop.call_later(_RESPAWN_DELAY, self._respawn, index)
            self._due.clear()

    def stop(self) -> None:
        """Pass the stop on to every forked worker; no replacement is started from now on.
        Once: a second call does nothing."""
        if self._stopping_since is not None:
            return
        self._stopping_since = time.monotonic()
        for handle in self._respawns.values():
            handle.cancel()
        self._respawns.clear()
        self._signal(signal.SIGTERM)

    async def stopped(self, within: float) -> None:
        """Wait for the forked workers, at most ``within`` seconds after :meth:`stop`; kill
        those still running then."""
        assert self._stopping_since is not None
        await self._reaped_by(self._stopping_since + within)
        if self._children:
            log.error(
                "workers did not stop within %.0f s; killing them: %s",
                within,
                " ".join(map(str, self._children)),
            )
            self.failed = True
            self._signal(signal.SIGKILL)
            await self._reaped_by(time.monotonic() + _KILLED_WAIT)

    async def _reaped_by(self, deadline: float) -> None:
        """Until every forked worker is reaped, or ``deadline`` (``time.monotonic()``)."""
        while True:
            self.reap()
            if not self._children or time.monotonic() >= deadline:
                return
            await asyncio.sleep(_REAP_POLL)

    def _signal(self, signum: signal.Signals) -> None:
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _respawn(self, index: int) -> None:
        del self._respawns[index]
        if self._stopping_since is None:
            pid = self._spawn(index, in_loop=True)
            if pid is None:
                self._due.add(index)
            else:
                log.info("worker %d: pid %d", index, pid)

    def _spawn(self, index: int, *, in_loop: bool) -> int | None:
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN: the process or memory limit
            log.error(
                "cannot fork worker %d: %s; trying again in %.0f s",
                index,
                exc.strerror or exc,
                _RESPAWN_DELAY,
            )
            return None
        if pid:
            self._children[pid] = index
            return pid
        code = 1
        try:
            if in_loop:
                _leave_the_loop(self._socks)
            _prefer_for_the_oom_killer()
            if self._hooks.start is not None:
                self._hooks.start()
            # SIGTERM when worker 0 dies, however it dies: a worker never serves unsupervised.
            if die_with_parent(self._parent):
                code = self._run(self.shares, index)
            if os.getppid() != self._parent:
                log.warning("worker %d: the supervisor %d is gone", os.getpid(), self._parent)
                if self._hooks.orphaned is not None:
                    self._hooks.orphaned()
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            os._exit(code)


def _prefer_for_the_oom_killer() -> None:
    """Raise this forked worker's ``oom_score_adj`` above worker 0's: out of memory, the kernel
    then kills a forked worker, which worker 0 replaces in a second, rather than worker 0,
    whose death ends every worker (and leaves the restart to systemd)."""
    path = "/proc/self/oom_score_adj"
    try:
        with open(path, "r+") as adj:
            raised = min(1000, int(adj.read()) + _OOM_SCORE_ADJ_RAISE)
            adj.seek(0)
            adj.write(f"{raised}\n")
    except (OSError, ValueError) as exc:
        log.warning("cannot raise %s: %s", path, exc)


def _ended(status: int | None) -> str:
    if status is None:
        return "ended (its exit status is unknown)"
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with {os.waitstatus_to_exitcode(status)}"


def _leave_the_loop(keep: list[socket.socket]) -> None:
    """In a worker forked from inside worker 0's running event loop: forget that loop.

    Its objects stay as they are, unreachable from what this worker runs: the collector must not
    finalize any of them (a finalizer would close a descriptor number that this worker may
    have reused by then), and the loop is not closed (closing it would change registrations
    in the epoll instance it shares with worker 0). Every inherited socket is closed but the
    listening ones and the standard streams (under systemd, the journal's socket).
    """
    gc.freeze()
    asyncio.events._set_running_loop(None)
    signal.set_wakeup_fd(-1)
    kept = {sock.fileno() for sock in keep} | {0, 1, 2}
    for fd in _open_descriptors():
        if fd in kept:
            continue
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)


def _open_descriptors() -> Iterable[int]:
    """This process's open descriptors: from /proc, or where /proc is not mounted, every number
    below the descriptor limit (slower, but a replacement must not keep the parent's sockets)."""
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return range(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
