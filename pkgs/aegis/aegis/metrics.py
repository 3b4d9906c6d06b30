"""Aegis's own metrics, served at ``/-/metrics``: the ``aegis_*`` families and nothing else.

Everything is registered in the registry the caller passes, never in prometheus_client's global
one unless the caller passes that: a library registers only its own metrics, so a host program
can put them on its own registry beside its own, and two Aegis applications in one program use
two registries. ``process_*`` and build information are the program's (:mod:`aegis.cli.process`).

Label cardinality is bounded by what exists: ``target`` is the name of a target that resolved
(a socket that was there, or an explicit target), and ``""`` for every request that named none —
a flood of random names (404) or malformed ones (400) adds no series. And by a number: at most
:data:`MAX_TARGET_LABELS` values, since a series lives as long as the application; targets past
it share ``target="*"``.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

__all__ = ["ProxyMetrics", "serve_metrics"]

_K = TypeVar("_K", bound=Hashable)
_C = TypeVar("_C")

#: Upstream durations of a scrape: from a few milliseconds to the default 10 s deadline and past.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


#: Distinct ``target`` label values Aegis gives out: series live as long as the application, so
#: sockets that come and go under new names, or ten thousand stale socket files each asked for
#: once, must not grow them without end. Targets past it are counted together under
#: :data:`OTHER_TARGETS`.
MAX_TARGET_LABELS = 256
#: The ``target`` label of the targets past :data:`MAX_TARGET_LABELS`: no target name can be it.
OTHER_TARGETS = "*"

log = logging.getLogger("aegis.metrics")

#: Label children each cache keeps: the busy targets' lookups stay one dict access, while names
#: that came and went cost no memory here (prometheus_client keeps their series, as it must).
MAX_CACHED_CHILDREN = 1024


class ProxyMetrics:
    """The proxy's counters, with label children cached so a request costs a dict lookup each."""

    def __init__(
        self, registry: CollectorRegistry, count_targets: Callable[[], int | None]
    ) -> None:
        self.registry = registry
        self._requests = Counter(
            "aegis_requests",
            "Proxied scrape requests, by target and HTTP status code answered "
            '(target="" when the name matched no target).',
            ["target", "code"],
            registry=registry,
        )
        self._duration = Histogram(
            "aegis_upstream_duration_seconds",
            "Time from connecting to (or reusing a connection to) the upstream to the end of its "
            "answer, or to its failure.",
            ["target"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._errors = Counter(
            "aegis_upstream_errors",
            'Failed scrapes, by target and kind (bad_name and unknown have target="").',
            ["target", "kind"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "aegis_requests_in_flight",
            "Proxied scrape requests being answered now.",
            registry=registry,
        )
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._error_children: dict[tuple[str, str], Counter] = {}
        self._labelled: set[str] = {""}  # "": the name matched no target
        self._overflowed = False
        targets = _TargetsCollector(count_targets)
        registry.register(targets)
        #: Everything registered on ``registry``: a host program can unregister it all.
        self.collectors: tuple[Collector, ...] = (
            self._requests,
            self._duration,
            self._errors,
            self.in_flight,
            targets,
        )

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
        if len(self._labelled) < MAX_TARGET_LABELS:
            self._labelled.add(target)
            return target
        self._overflowed = True  # all given out: that never changes again
        log.warning(
            "more targets than the metrics label: the rest are counted as target=%r",
            OTHER_TARGETS,
            extra={"labelled": MAX_TARGET_LABELS, "target": target},
        )
        return OTHER_TARGETS


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
