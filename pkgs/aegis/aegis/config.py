"""The proxy's configuration: one frozen object, validated once, before anything starts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .discovery import ExternalURL
from .targets import Target, check_name
from .upstream import MAX_IDLE_PER_SOCKET

# Prometheus' units (model.ParseDuration), biggest first: a year is 365 days, a week 7.
_UNITS = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_DURATION_PART = re.compile(r"([0-9]+)([a-z]+)")
# The largest duration Go's time.Duration holds: about 292 years.
_MAX_SECONDS = (2**63 - 1) / 1e9


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the setting."""


def parse_duration(text: str) -> float:
    """Seconds from a duration in Prometheus' syntax: whole numbers with units from the biggest
    to the smallest (``1m30s``, ``250ms``, ``2h``; ``y``, ``w``, ``d``, ``h``, ``m``, ``s``,
    ``ms``), or ``0``. A number without a unit is an error, as in Prometheus: ``10`` could mean
    seconds or milliseconds."""
    if text == "0":
        return 0.0
    order = list(_UNITS)
    seconds, pos, last = 0.0, 0, -1
    for match in _DURATION_PART.finditer(text):
        number, unit = match.groups()
        if match.start() != pos or unit not in _UNITS:
            break
        if order.index(unit) <= last:
            raise ValueError(f"{text!r}: units go from the biggest to the smallest, once each")
        last = order.index(unit)
        seconds += int(number) * _UNITS[unit]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f"{text!r} is not a duration: {_what_is_wrong(text)}")
    if seconds > _MAX_SECONDS:
        raise ValueError(f"{text!r}: duration out of range")
    return seconds


def _what_is_wrong(text: str) -> str:
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text.strip()):
        return "a number needs a unit, as in 10s or 500ms (0 alone is allowed)"
    if "." in text:
        return "whole numbers only, as in 1500ms for 1.5s"
    unknown = [u for u in re.findall(r"[0-9]([a-zA-Zµ]+)", text) if u not in _UNITS]
    if unknown:
        return f"unknown unit {unknown[0]!r} (units: {', '.join(_UNITS)})"
    return "expected whole numbers with units, as in 10s, 1m30s, 250ms"


# Path characters that need no escaping and mean nothing to aiohttp's route patterns ({}).
_ROUTE_PREFIX = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/-]*")


def normalize_route_prefix(text: str) -> str:
    """``/`` and one leading slash, no trailing one, as Prometheus treats ``--web.route-prefix``
    (``aegis/`` is ``/aegis``); refuses what would not be one plain path."""
    prefix = "/" + text.strip("/")
    segments = prefix.split("/")[1:]
    if not _ROUTE_PREFIX.fullmatch(prefix) or (
        prefix != "/" and any(part in ("", ".", "..") for part in segments)
    ):
        raise ConfigError(
            f"route prefix {text!r}: must be a plain path like /aegis "
            "(letters, digits and -._~!$&'()*+,;=:@ between single slashes)"
        )
    return prefix


@dataclass(frozen=True, slots=True)
class Config:
    """Everything :func:`aegis.proxy.make_app` needs.

    ``sockdir`` is scanned on every request, so sockets that appear later are served and a
    directory that does not exist yet is simply empty. ``targets`` are explicit name → socket
    entries that take precedence over the directory.
    """

    sockdir: Path = Path("run")
    targets: Mapping[str, Target] = field(default_factory=dict)
    #: Upstream deadline when the scraper sends no X-Prometheus-Scrape-Timeout-Seconds.
    scrape_timeout: float = 10.0
    #: Subtracted from the scraper's own timeout so that Aegis answers 504 before it gives up.
    timeout_offset: float = 0.5
    #: Idle keep-alive connections kept per upstream socket (a few: see aegis.upstream).
    max_idle_per_socket: int = MAX_IDLE_PER_SOCKET
    #: Seconds an idle upstream connection is kept for reuse; then it is closed, on its own.
    upstream_idle_timeout: float = 60.0
    #: How scrapers reach Aegis (``https://host:port/prefix``), for ``/-/sd``; "" means the way
    #: each client did (its Host header).
    external_url: str = ""
    #: Where every path is served: ``/aegis`` serves ``/aegis/``, ``/aegis/NAME``,
    #: ``/aegis/-/metrics``..., and redirects ``/`` there; ``/`` is the root.
    route_prefix: str = "/"
    #: Upstream exchanges in flight at once; past it, 503 at once.
    max_concurrent: int = 256
    #: The same for each target, so one slow service cannot take every slot.
    max_concurrent_per_target: int = 64
    #: (st_dev, st_ino) of the socket files this Aegis listens on (its ``unix:`` listeners,
    #: those systemd passes): a target that is one of them is refused (508, kind ``loop``)
    #: rather than proxied to itself. The program fills it in, with
    #: :func:`aegis.targets.socket_file_identity` of each listening socket; a loop it does not
    #: know of ends one hop later, at Aegis's own ``Via``.
    listener_sockets: frozenset[tuple[int, int]] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sockdir", Path(self.sockdir))
        targets: dict[str, Target] = {}
        for key, target in self.targets.items():
            if key != target.name:
                raise ConfigError(f"target {key!r}: entry is named {target.name!r}")
            try:
                check_name(key)
            except ValueError as exc:
                raise ConfigError(f"target {key!r}: {exc}") from None
            targets[key] = target
        object.__setattr__(self, "targets", MappingProxyType(targets))
        for name in ("scrape_timeout", "upstream_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.timeout_offset >= 0:
            raise ConfigError(f"timeout_offset must not be negative, got {self.timeout_offset!r}")
        for name in ("max_concurrent", "max_concurrent_per_target"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.max_idle_per_socket < 0:
            raise ConfigError("max_idle_per_socket must not be negative")
        object.__setattr__(self, "listener_sockets", frozenset(self.listener_sockets))
        object.__setattr__(self, "route_prefix", normalize_route_prefix(self.route_prefix))
        if self.external_url:
            try:
                ExternalURL.parse(self.external_url)
            except ValueError as exc:
                raise ConfigError(f"external_url: {exc}") from None
