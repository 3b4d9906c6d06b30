"""The command line's directory for multiprocess metrics (several workers, one set of counters).

prometheus_client keeps each worker's values in memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and adds them up at every scrape, whichever worker answers it. The
variable is set in the parent before it forks (the workers create the values); the directory
must start empty (files of an earlier run would be added in) and is removed at exit.

Where: ``$RUNTIME_DIRECTORY/metrics`` under systemd (``RuntimeDirectory=``, private to the
service and on tmpfs), else a fresh private temporary directory named after the supervisor's
pid. Workers remove it if the supervisor is killed (they outlive it by their grace period); if
every process is killed at once nothing runs to remove it, so a start also removes the
directories of earlier supervisors that are no longer running (systemd removes a
``RuntimeDirectory=`` itself).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import multiprocess, values

__all__ = ["metrics_dir", "remove", "worker_exited"]

log = logging.getLogger("aegis.multiproc")

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "aegis-metrics-"


@contextlib.contextmanager
def metrics_dir() -> Iterator[Path]:
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
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = previous
        values.ValueClass = previous_class
        remove(path)


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
            log.info("removing %s, left by an Aegis that was killed", entry)
            remove(entry)
        except OSError:
            continue  # alive (EPERM: someone else's pid now), or gone while looking


def worker_exited(path: Path, pid: int) -> None:
    """Drop a dead worker's live gauges (in-flight requests); its counters keep counting."""
    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
