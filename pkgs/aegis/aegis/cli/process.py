"""What belongs to the process, not the library: standard streams, the descriptor limit, giving
memory back, and the process's own metrics (``process_*`` and ``aegis_build_info``).

Linux only; everything here is allowed to an unprivileged process (and under systemd's
``@system-service`` filter with ``NoNewPrivileges``).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__

__all__ = [
    "open_standard_streams",
    "raise_fd_limit",
    "register_process_metrics",
    "release_free_memory",
]

log = logging.getLogger("aegis.server")


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


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``).

    Freed memory stays with the process when it lies below memory still in use, as it does after
    many connections each held a large request head for a while: hundreds of megabytes that no
    longer hold anything. Elsewhere than glibc there is no such call, and nothing is done.
    """
    import ctypes  # here, not at the top: rarely needed, and importing it costs idle memory

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def register_process_metrics(registry: CollectorRegistry) -> None:
    """``process_*`` (CPU, memory, descriptors, start time) and ``aegis_build_info``: what an
    exporter program shows of itself, and what a library must leave to its host program.

    And no ``*_created`` series: Go's exporters have none in the text format, and each would
    double a counter's series in Prometheus. A process-wide switch, so the program's to set."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    registry.register(_BuildInfo())


class _BuildInfo(Collector):
    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "aegis_build_info",
            "Always 1; the labels say which Aegis and which Python run.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
