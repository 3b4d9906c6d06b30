"""Aegis's own metrics, served at ``/-/metrics``.

Everything is registered in the registry the caller passes, never in prometheus_client's global
one, so several applications in one process (tests, or a program mounting Aegis) never collide.

Label cardinality is bounded by what exists: ``target`` is the name of a target that resolved
(a socket that was there, or an explicit target), and ``""`` for every request that named none —
a flood of random names (404) or malformed ones (400) adds no series. And by a number: Aegis
gives out at most :data:`MAX_TARGET_LABELS` values (all the workers together), since a series
lives as long as the server; targets past it share ``target="*"``.

Several worker processes (``aegis --workers N``) each count their own requests, and a scrape
lands on one of them. With ``multiprocess_dir`` the values live in prometheus_client's per-process
files in that directory and every scrape reads all of them (``MultiProcessCollector``), so the
counters are those of the whole server. Setting that up (the ``PROMETHEUS_MULTIPROC_DIR``
environment variable before the first value is created, wiping the directory, marking dead
workers) is process-wide state, and belongs to the command line (:mod:`aegis.multiproc`).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import logging
import os
import platform
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from . import __version__
from .multiproc import server_pid

__all__ = ["ProxyMetrics", "serve_metrics"]

_K = TypeVar("_K", bound=Hashable)
_C = TypeVar("_C")

#: Upstream durations of a scrape: from a few milliseconds to the default 10 s deadline and past.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _WorkersCollector(MultiProcessCollector):
    """Described as nothing, so registering it reads no files: with ``auto_describe`` the
    registry would collect at once, while another worker may just have created its file empty,
    and the struct error kills this worker at start."""

    def describe(self) -> list[Metric]:
        return []


#: Distinct ``target`` label values Aegis gives out, all its workers together: series live as
#: long as the server (in every worker's multiprocess file), so sockets that come and go under
#: new names, or ten thousand stale socket files each asked for once, must not grow them without
#: end. Targets past it are counted together under :data:`OTHER_TARGETS`.
MAX_TARGET_LABELS = 256
#: The ``target`` label of the targets past :data:`MAX_TARGET_LABELS`: no target name can be it.
OTHER_TARGETS = "*"
# In the multiprocess directory (prometheus_client reads only its *.db files): one target a line.
_LABELS_FILE = "target-labels"

log = logging.getLogger("aegis.metrics")

#: Label children each cache keeps: the busy targets' lookups stay one dict access, while names
#: that came and went cost no memory here (prometheus_client keeps their series, as it must).
MAX_CACHED_CHILDREN = 1024


class ProxyMetrics:
    """The proxy's counters, with label children cached so a request costs a dict lookup each."""

    def __init__(
        self,
        registry: CollectorRegistry,
        count_targets: Callable[[], int | None],
        *,
        multiprocess_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.registry = registry
        # In multiprocess mode the values are read back from the files by MultiProcessCollector;
        # registering the objects as well would expose every series twice.
        own: CollectorRegistry | None = registry
        if multiprocess_dir is not None:
            if not getattr(values.ValueClass, "_multiprocess", False):
                raise RuntimeError(
                    "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before "
                    "prometheus_client is imported (see aegis.multiproc)"
                )
            registry.register(_WorkersCollector(None, path=str(multiprocess_dir)))  # type: ignore[no-untyped-call]
            own = None
        self._requests = Counter(
            "aegis_requests",
            "Proxied scrape requests, by target and HTTP status code answered "
            '(target="" when the name matched no target).',
            ["target", "code"],
            registry=own,
        )
        self._duration = Histogram(
            "aegis_upstream_duration_seconds",
            "Time from connecting to (or reusing a connection to) the upstream to the end of its "
            "answer, or to its failure.",
            ["target"],
            buckets=DURATION_BUCKETS,
            registry=own,
        )
        self._errors = Counter(
            "aegis_upstream_errors",
            'Failed scrapes, by target and kind (bad_name and unknown have target="").',
            ["target", "kind"],
            registry=own,
        )
        self.in_flight = Gauge(
            "aegis_requests_in_flight",
            "Proxied scrape requests being answered now.",
            registry=own,
            multiprocess_mode="livesum",
        )
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._error_children: dict[tuple[str, str], Counter] = {}
        self._labelled: set[str] = {""}  # "": the name matched no target
        self._overflowed = False
        # With several workers, which targets have a label is decided once for all of them, in
        # a file they share: each deciding alone, one target's counts would be split between
        # its own series (in one worker) and "*" (in another).
        self._shared_labels = (
            None if multiprocess_dir is None else Path(multiprocess_dir) / _LABELS_FILE
        )
        registry.register(_TargetsCollector(count_targets))
        registry.register(_BuildInfoCollector())
        if multiprocess_dir is None:
            ProcessCollector(registry=registry)
        else:
            registry.register(_ProcessGroupCollector(Path(multiprocess_dir)))

    def request(self, target: str, code: int) -> None:
        child = self._request_children.get((target, code))
        if child is None:
            child = _cache(
                self._request_children,
                (target, code),
                self._requests.labels(self._label(target), code),
            )
        child.inc()

    def upstream(self, target: str, seconds: float) -> None:
        child = self._duration_children.get(target)
        if child is None:
            child = _cache(
                self._duration_children, target, self._duration.labels(self._label(target))
            )
        child.observe(seconds)

    def error(self, target: str, kind: str) -> None:
        child = self._error_children.get((target, kind))
        if child is None:
            child = _cache(
                self._error_children, (target, kind), self._errors.labels(self._label(target), kind)
            )
        child.inc()

    def _label(self, target: str) -> str:
        """``target`` as a label value: itself while fewer than :data:`MAX_TARGET_LABELS` have
        been given out, else :data:`OTHER_TARGETS`. Looked up only when a child is not cached."""
        if target in self._labelled:
            return target
        if self._overflowed:
            return OTHER_TARGETS
        announce = True
        if self._shared_labels is not None:
            with contextlib.suppress(OSError):  # the file gone: this process decides alone
                names, announce = _claim(self._shared_labels, target)
                self._labelled.update(names)
        elif len(self._labelled) < MAX_TARGET_LABELS:
            self._labelled.add(target)
        if target in self._labelled:
            return target
        self._overflowed = True  # all given out: that never changes again
        if announce:
            log.warning(
                "more targets than the metrics label: the rest are counted as target=%r",
                OTHER_TARGETS,
                extra={"labelled": MAX_TARGET_LABELS, "target": target},
            )
        return OTHER_TARGETS


def _claim(path: Path, target: str) -> tuple[list[str], bool]:
    """The targets given a label so far by every worker, ``target`` among them if there was
    room for it (appended under a lock that serialises the workers); and whether this is the
    first refusal of all (then this worker says so, once for the server)."""
    with open(path, "a+", encoding="utf-8") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed
        file.seek(0)
        names = ["", *file.read().split("\n")[:-1]]
        first_refusal = False
        if target not in names:
            if len(names) < MAX_TARGET_LABELS:
                file.write(target + "\n")
                names.append(target)
            elif OTHER_TARGETS not in names:
                file.write(OTHER_TARGETS + "\n")  # a mark, past the names
                first_refusal = True
    return names, first_refusal


def _cache(children: dict[_K, _C], key: _K, child: _C) -> _C:
    """``child`` remembered for ``key``; a full cache starts over rather than grow."""
    if len(children) >= MAX_CACHED_CHILDREN:
        children.clear()
    children[key] = child
    return child


async def serve_metrics(request: web.Request, registry: CollectorRegistry) -> web.Response:
    """The registry in the format the scraper asks for in ``Accept`` (OpenMetrics or the text
    format), gzipped if it accepts that, as prometheus_client's own exporters answer."""
    encoder, content_type = _choose_encoder(request.headers.get("Accept", ""))
    body = encoder(registry)
    headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
    if gzip_accepted(request.headers.get("Accept-Encoding", "")):
        body = gzip.compress(body, compresslevel=6)
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


def _choose_encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """prometheus_client's choice, with the ranges it cannot read left out: it compares a
    version such as ``a`` or ``1.x`` with numbers and raises (a 500 for any client)."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder(",".join(filter(_readable, accept.split(","))))


def _readable(media_range: str) -> bool:
    try:
        choose_encoder(media_range)
    except (TypeError, ValueError):
        return False
    return True


class _TargetsCollector(Collector):
    """The number of targets and the socket directory's health, looked at when scraped: sockets
    come and go without any request. A directory that cannot be listed has no target count (0
    would read as "every service is gone"): ``aegis_targets`` is absent until it can be."""

    def __init__(self, count: Callable[[], int | None]) -> None:
        self._count = count

    def describe(self) -> Iterable[Metric]:
        return self._families(0)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._count())

    def _families(self, count: int | None) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "aegis_socket_directory_up",
            "1 when the socket directory can be listed and searched, 0 when not (missing, "
            "unreadable, not a directory); the log and /-/sd say why.",
            value=0 if count is None else 1,
        )
        if count is not None:
            yield GaugeMetricFamily(
                "aegis_targets",
                "Targets that exist now (sockets found and explicit targets); absent while the "
                "socket directory cannot be listed.",
                value=count,
            )


class _BuildInfoCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "aegis_build_info",
            "Always 1; the labels say which Aegis and which Python run.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


class _ProcessGroupCollector(Collector):
    """``process_*`` of the whole server: worker 0 and the workers it forked, added up.

    The scraped worker alone would make ``process_cpu_seconds_total`` jump between workers'
    figures from one scrape to the next. CPU time of a worker that died is lost with it, as it
    is for any restarted process. Worker 0 is the process that made the multiprocess directory
    (:func:`aegis.multiproc.server_pid`), or else this process's parent.
    """

    def __init__(self, shared: Path) -> None:
        # Written before any worker was forked, so read once (None: not made by metrics_dir).
        self._server = server_pid(shared)

    _SUMMED = (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    )

    def collect(self) -> Iterable[Metric]:
        server = self._server or os.getppid()
        families: dict[str, Metric] = {}
        for pid in _with_children(server):
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                kept = families.get(family.name)
                if kept is None:
                    families[family.name] = family  # worker 0's comes first
                elif family.name in self._SUMMED and family.samples and kept.samples:
                    total = kept.samples[0].value + family.samples[0].value
                    kept.samples[0] = kept.samples[0]._replace(value=total)
        yield from families.values()


def _with_children(pid: int) -> Iterator[int]:
    yield pid
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN
        children = list(_children_from_stat(pid))
    if not children and os.getpid() != pid:
        children = [os.getpid()]  # at least this worker
    yield from children


def _children_from_stat(parent: int) -> Iterator[int]:
    """The children of ``parent``, found by the parent pid in every process's ``stat``."""
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return
    for entry in entries:
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold anything, so split after its last ")".
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
            yield int(entry)
