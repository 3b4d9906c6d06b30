"""The end of the grace period, as the scrapes in flight see it.

At a stop signal Aegis lets its scrapes run until the grace period ends, and no longer. A
scrape still waiting for its upstream then must not simply be cancelled: the scraper would get
no answer at all, and the scrape would be counted as if the scraper had hung up. So each
scrape's upstream deadline (an ``asyncio.Timeout``) is registered here while it runs, and the
stop brings every one of them (and any that starts later) forward to the end of the grace
period: the scrape then ends as a late one does, answered (503 while nothing was sent, a broken
connection mid-page), counted and logged.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

__all__ = ["STOPPING_KEY", "GracePeriod"]


class GracePeriod:
    """The upstream deadlines of the scrapes in flight, and when the stop cuts them."""

    __slots__ = ("_deadlines", "cut", "end")

    def __init__(self) -> None:
        self._deadlines: set[asyncio.Timeout] = set()
        #: The event loop's time at which the grace period ends; None while Aegis runs.
        self.end: float | None = None
        #: Scrapes that the end of the grace period cut.
        self.cut = 0

    def watch(self, deadline: asyncio.Timeout) -> None:
        """A scrape's upstream deadline, until :meth:`forget`; a stop brings it forward."""
        self._deadlines.add(deadline)
        if self.end is not None:
            self._bring_forward(deadline, self.end)

    def forget(self, deadline: asyncio.Timeout) -> None:
        self._deadlines.discard(deadline)

    def begin(self, end: float) -> int:
        """Aegis stops: no scrape waits past ``end`` (the event loop's time). Returns how many
        scrapes are waiting for their service now."""
        self.end = end
        for deadline in self._deadlines:
            self._bring_forward(deadline, end)
        return len(self._deadlines)

    def ended(self) -> bool:
        """Whether the grace period is over: a deadline that fired now was the stop's. Counts
        the scrape as cut."""
        if self.end is None or asyncio.get_running_loop().time() < self.end:
            return False
        self.cut += 1
        return True

    @staticmethod
    def _bring_forward(deadline: asyncio.Timeout, end: float) -> None:
        when = deadline.when()
        # One that fired already is ending its scrape; it can no longer be rescheduled.
        if not deadline.expired() and (when is None or when > end):
            deadline.reschedule(end)


#: Set on the application by :func:`aegis.proxy.make_app`; the program begins it at a stop.
STOPPING_KEY = web.AppKey("aegis_grace_period", GracePeriod)
