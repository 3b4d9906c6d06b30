"""How many upstream exchanges run at once: overall and per target.

Past either bound a scrape is refused at once with 503 rather than queued: a scraper retries at
its next interval anyway, and a queue would only turn one slow service into many slow scrapes
and a pile of open client connections. The counters live in the event loop, which is
single-threaded, so plain integers need no lock.
"""

from __future__ import annotations

__all__ = ["Limits"]


class Limits:
    """Counters of in-flight upstream exchanges; :meth:`enter` and :meth:`leave` bracket one."""

    __slots__ = ("_by_target", "_in_flight", "per_target", "total")

    def __init__(self, total: int, per_target: int) -> None:
        if total < 1 or per_target < 1:
            raise ValueError(f"limits must be at least 1, got {total} overall, {per_target} each")
        self.total = total
        self.per_target = per_target
        self._in_flight = 0
        self._by_target: dict[str, int] = {}

    def enter(self, target: str) -> str | None:
        """Count one more exchange for ``target``; or, past a bound, the reason it is refused."""
        if self._in_flight >= self.total:
            return f"overloaded: {self.total} scrapes in flight"
        count = self._by_target.get(target, 0)
        if count >= self.per_target:
            return f"overloaded: {self.per_target} scrapes of this target in flight"
        self._by_target[target] = count + 1
        self._in_flight += 1
        return None

    def leave(self, target: str) -> None:
        """The exchange :meth:`enter` admitted is over (answered, failed or cancelled)."""
        self._in_flight -= 1
        count = self._by_target[target] - 1
        if count:
            self._by_target[target] = count
        else:
            del self._by_target[target]  # names come from requests: never keep a dead one

    def in_flight(self, target: str | None = None) -> int:
        return self._in_flight if target is None else self._by_target.get(target, 0)
