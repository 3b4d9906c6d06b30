"""The command line's directory for multiprocess metrics (several workers, one set of counters).

prometheus_client keeps each worker's values in memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and adds them up at every scrape, whichever worker answers it. The
variable is set in the parent before it forks (the workers create the values); the directory
must start empty (files of an earlier run would be added in) and is removed at exit, by the
last process of the server to leave it: every process (the supervisor and each worker) holds a
shared ``flock`` on a lock file in it, on an open file of its own, and one that leaves removes
the directory only if it can then take the lock exclusively. The order in which they leave
does not matter: when the supervisor is killed, a worker that had nothing to finish must not
take the directory from one still finishing a scrape (whose count would then fail).

Where: ``$RUNTIME_DIRECTORY/metrics`` under systemd (``RuntimeDirectory=``, private to the
service and on tmpfs), else a fresh private temporary directory named after the supervisor's
pid. If every process is killed at once nothing runs to remove it, so a start also removes the
directories of earlier supervisors that are no longer running and that no process holds any
more (systemd removes a ``RuntimeDirectory=`` itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import multiprocess, values

__all__ = ["SharedDir", "metrics_dir", "remove", "server_pid", "worker_exited"]

log = logging.getLogger("aegis.multiproc")

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "aegis-metrics-"
# prometheus_client reads only *.db files of the directory.
_LOCK = "users.lock"
# The pid of the process that made the directory: worker 0, the parent of the others.
_SERVER = "server.pid"


class SharedDir:
    """The directory, and this process's hold on it (a shared flock on its lock file)."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = self._hold()

    def _hold(self) -> int:
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            raise
        return fd

    def join(self) -> None:
        """In a worker, right after ``fork()``: a hold of its own.

        A flock belongs to the open file, which ``fork()`` shares: the inherited descriptor is
        the supervisor's hold, and an exclusive lock taken through it would not see the
        others. It is let go only once the worker holds the file itself, so the directory has
        a holder at every moment, even if the supervisor is killed meanwhile.
        """
        inherited = self._fd
        self._fd = self._hold()
        os.close(inherited)

    def leave(self) -> bool:
        """Let go of the directory; the last process to leave removes it (then True)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # others still count in it
            return False
        try:
            remove(self.path)
        finally:
            os.close(fd)
        return True


@contextlib.contextmanager
def metrics_dir() -> Iterator[SharedDir]:
    """Create (or wipe) the directory, point prometheus_client at it, remove it on the way out."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        path = Path(runtime) / "metrics"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
    else:
        _remove_stale(Path(tempfile.gettempdir()))
        path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
    previous = os.environ.get(_ENV)
    previous_class = values.ValueClass
    os.environ[_ENV] = str(path)
    # prometheus_client picks its value class from the variable when it is first imported, which
    # any import may already have done: pick again, exactly as that import would have.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    log.debug("multiprocess metrics in %s", path)
    (path / _SERVER).write_text(f"{os.getpid()}\n")
    shared = SharedDir(path)
    try:
        yield shared
    finally:
        if previous is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = previous
        values.ValueClass = previous_class
        shared.leave()


def remove(path: Path) -> None:
    """Remove the directory and what is in it; gone already is fine."""
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale(tmp: Path) -> None:
    uid = os.getuid()
    for entry in tmp.glob(f"{_PREFIX}*-*"):
        pid_text = entry.name[len(_PREFIX) :].partition("-")[0]
        try:
            if not pid_text.isdigit() or entry.lstat().st_uid != uid or not entry.is_dir():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            if _held(entry):
                continue  # workers of the killed supervisor still finishing: theirs to remove
            log.info("removing %s, left by an Aegis that was killed", entry)
            remove(entry)
        except OSError:
            continue  # alive (EPERM: someone else's pid now), or gone while looking


def _held(path: Path) -> bool:
    """Whether a process still holds the directory (see :class:`SharedDir`)."""
    try:
        fd = os.open(path / _LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False  # no lock file: nobody can hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def server_pid(path: Path) -> int | None:
    """The pid of the process that made the directory with :func:`metrics_dir`, if it did."""
    try:
        return int((path / _SERVER).read_text())
    except (OSError, ValueError):
        return None


def worker_exited(path: Path, pid: int) -> None:
    """Drop a dead worker's live gauges (in-flight requests); its counters keep counting."""
    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
