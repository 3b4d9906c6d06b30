"""Each target's last scrape, as the landing page shows it: what Aegis answered, when, how long
it took. Recorded as every request for a target is counted; nothing is ever scraped to fill it.

Bounded like the metrics' ``target`` label (:data:`aegis.metrics.MAX_TARGET_LABELS`): the first
that many targets asked for get a record, kept for as long as the application runs; past them a
target's scrapes are not recorded, and the page says so rather than "never scraped".
"""

from __future__ import annotations

from dataclasses import dataclass

from .metrics import MAX_TARGET_LABELS

__all__ = ["LastScrapes", "Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request for a target ended."""

    #: The status answered (499 when the scraper hung up first).
    status: int
    #: The failure kind, as ``aegis_upstream_errors_total`` counts it; "" when nothing failed.
    kind: str
    #: When it began, in seconds since the epoch.
    started: float
    #: From its arrival to its answer's end.
    seconds: float

    @property
    def up(self) -> bool:
        """Whether Prometheus would take it: a 2xx answer that nothing cut short."""
        return not self.kind and 200 <= self.status < 300


class LastScrapes:
    """The last :class:`Outcome` of each target, for at most ``bound`` targets."""

    __slots__ = ("_bound", "_last", "full")

    def __init__(self, bound: int = MAX_TARGET_LABELS) -> None:
        self._bound = bound
        self._last: dict[str, Outcome] = {}
        #: Whether a target was left unrecorded: then a target without a record may have been
        #: scraped.
        self.full = False

    def record(self, name: str, outcome: Outcome) -> None:
        if name in self._last or len(self._last) < self._bound:
            self._last[name] = outcome
        else:
            self.full = True

    def get(self, name: str) -> Outcome | None:
        return self._last.get(name)

    def snapshot(self) -> dict[str, Outcome]:
        """A copy, at most ``bound`` entries: one page shows one moment."""
        return dict(self._last)
