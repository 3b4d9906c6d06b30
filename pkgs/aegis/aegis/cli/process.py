"""Process-wide settings of the command: the descriptor limit and the parent-death signal.

Linux only, through ``resource`` and ``prctl(2)``; both are allowed to an unprivileged process
(and under systemd's ``@system-service`` filter with ``NoNewPrivileges``).
"""

from __future__ import annotations

import logging
import os
import resource
import signal

__all__ = ["die_with_parent", "open_standard_streams", "raise_fd_limit", "release_free_memory"]

log = logging.getLogger("aegis.server")

_PR_SET_PDEATHSIG = 1


def open_standard_streams() -> None:
    """Open ``/dev/null`` on each of descriptors 0, 1 and 2 that was closed when Aegis started.

    Otherwise the next descriptors opened take those numbers: a listening socket became
    descriptor 0, and libuv aborts the process when it closes it (exit 134 at every stop).
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one, as Go programs do at start; returns
    the soft limit in force. Every connection is a descriptor, and the soft limit (often 1024)
    is a compatibility default for ``select()``, which nothing here uses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return soft
    return hard


def die_with_parent(parent: int, signum: signal.Signals = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies, whatever the cause.

    False if ``parent`` is already gone (it died before the request took effect): the caller
    should not run then. A refused request (a seccomp filter) is logged, and the caller runs
    without that guarantee rather than not at all.
    """
    import ctypes  # here, not at the top: only workers forked by a supervisor need it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        log.error("prctl(PR_SET_PDEATHSIG): %s", os.strerror(errno))
    # The parent may have died between fork() and prctl(): then nobody will send the signal.
    return os.getppid() == parent


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``).

    Freed memory stays with the process when it lies below memory still in use, as it does after
    many connections each held a large request head for a while: hundreds of megabytes that no
    longer hold anything. Elsewhere than glibc there is no such call, and nothing is done.
    """
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
