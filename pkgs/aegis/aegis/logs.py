"""Log lines that any client could make numerous, held to one per interval.

:class:`RateLimited` keeps a flood (refused credentials, failed TLS handshakes) to one line per
interval that counts what it left out; :class:`Throttled` does so per key (a failing scrape's
kind and target). Formatting and handlers are the program's (:mod:`aegis.cli.logformat`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping

__all__ = ["RateLimited", "Throttled"]


class RateLimited:
    """At most one line per ``interval`` seconds at ``level``; the lines in between go out at
    debug level (so ``--log.level debug`` shows every one), and the next full line says how many
    were held back (``suppressed=N``).

    Each instance is one kind of event.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._level = level
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0
        self._lock = threading.Lock()  # the TLS hook may run outside the event loop's thread

    def log(
        self,
        msg: str,
        fields: Mapping[str, object],
        *,
        exc_info: BaseException | None = None,
        stacklevel: int = 2,
    ) -> None:
        """``exc_info`` goes with the full line only; ``stacklevel`` names the line's source as
        :meth:`logging.Logger.log` does, counted from the caller of this method."""
        now = self._clock()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                level, extra = logging.DEBUG, dict(fields)
            else:
                self._next = now + self._interval
                level, extra = self._level, dict(fields)
                if self._suppressed:
                    extra["suppressed"] = self._suppressed
                self._suppressed = 0
        # The line's source is the caller, not this method.
        shown = exc_info if level == self._level else None
        self._logger.log(level, msg, extra=extra, exc_info=shown, stacklevel=stacklevel)


class Throttled:
    """A :class:`RateLimited` line per key, such as a kind of failure and its target: a flood
    of one holds back no other. A key's level is the one it was first logged at. At most
    ``max_keys`` are remembered; past that they start over (each then says one line again)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._max_keys = max_keys
        self._clock = clock
        self._lines: dict[Hashable, RateLimited] = {}

    def log(
        self,
        key: Hashable,
        level: int,
        msg: str,
        fields: Mapping[str, object] | None = None,
        *,
        exc_info: BaseException | None = None,
    ) -> None:
        line = self._lines.get(key)
        if line is None:
            if len(self._lines) >= self._max_keys:
                self._lines.clear()
            line = self._lines[key] = RateLimited(
                self._logger, interval=self._interval, level=level, clock=self._clock
            )
        line.log(msg, fields or {}, exc_info=exc_info, stacklevel=3)
