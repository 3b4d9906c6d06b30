"""What Aegis tells about itself: the landing page ``/``, ``/-/sd``, ``/-/healthy``, ``/-/ready``.

Everything here is computed per request from :meth:`aegis.targets.Targets.names` (a directory
scan, reused only while the directory's time stamps say nothing changed): a socket that appears
is listed by the next request. A socket
directory that cannot be listed makes ``/-/sd`` a 503 with the reason: Prometheus keeps the
targets it had (an empty list would make it drop them all); the landing page shows the reason.

``/-/sd`` is Prometheus HTTP service discovery (``http_sd_configs``): one group per target,
addressed the way the client reached Aegis (its ``Host`` header), unless an external URL says
how Prometheus should reach it (behind a reverse proxy, another host name, TLS in front).
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json
from urllib.parse import quote, urlsplit

from aiohttp import web

from . import __version__
from .targets import DirectoryUnavailable, Targets

__all__ = ["ENDPOINTS", "ExternalURL", "landing", "service_discovery"]

# Names that read the same in HTML, in a URL path and as text: nothing to escape.
_PLAIN = re.compile(r"[A-Za-z0-9_.-]+")

#: The reserved paths, in the order the landing page lists them.
ENDPOINTS = ("/-/metrics", "/-/sd", "/-/healthy", "/-/ready")


@dataclass(frozen=True, slots=True)
class ExternalURL:
    """``--web.external-url``: how scrapers reach Aegis, when that is not how this client did."""

    scheme: str
    address: str
    prefix: str

    @classmethod
    def parse(cls, text: str) -> ExternalURL:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{text!r}: the scheme must be http or https")
        if not parts.hostname:
            raise ValueError(f"{text!r}: no host name")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"{text!r}: only scheme, host, port and path are allowed")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{text!r}: bad port") from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        address = host if port is None else f"{host}:{port}"
        return cls(parts.scheme, address, parts.path.rstrip("/"))


def _prefix(request: web.Request, own_path: str) -> str:
    """Where this application is mounted: "" at the root, "/aegis" under ``add_subapp``."""
    path = request.path
    return path[: -len(own_path)] if path.endswith(own_path) else ""


async def service_discovery(
    request: web.Request, targets: Targets, external: ExternalURL | None
) -> web.Response:
    try:
        names = targets.names()
    except DirectoryUnavailable as exc:
        return web.Response(status=503, text=f"socket directory unavailable: {exc.reason}\n")
    labels: dict[str, str] = {}
    if external is not None:
        address, prefix = external.address, external.prefix
        labels["__scheme__"] = external.scheme
    else:
        address, prefix = request.host, _prefix(request, "/-/sd")
        if request.secure:
            labels["__scheme__"] = "https"
    return web.Response(
        text=_sd_groups(names, address, labels, prefix), content_type="application/json"
    )


def _sd_groups(names: list[str], address: str, labels: dict[str, str], prefix: str) -> str:
    """``json.dumps`` of one group per name, to the byte, written out by hand: with ten thousand
    sockets the generic encoder alone took longer than the whole answer may."""
    common = "".join(f"{_json(key)}: {_json(value)}, " for key, value in labels.items())
    head = f'{{"targets": {json.dumps([address])}, "labels": {{{common}"__metrics_path__": '
    groups = ", ".join(
        f'{head}{_json(f"{prefix}/{name}")}, "target": {_json(name)}}}}}' for name in names
    )
    return f"[{groups}]"


def _wants_json(accept: str) -> bool:
    """JSON when the client prefers ``application/json`` to HTML; browsers, curl and ties get
    HTML."""
    best = {"text/html": 0.0, "application/json": 0.0}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        for kind in best:
            if media == kind or media == "*/*" or media == kind.split("/")[0] + "/*":
                exact = media == kind
                # An exact range wins over a wildcard, whatever their order.
                if exact or best[kind] == 0.0:
                    best[kind] = quality if exact else max(best[kind], quality)
    return best["application/json"] > best["text/html"]


async def landing(request: web.Request, targets: Targets) -> web.Response:
    try:
        names, problem = targets.names(), None
    except DirectoryUnavailable as exc:
        # The explicit targets are still served; the directory's are unknown.
        names, problem = sorted(targets.explicit), exc.reason
    if _wants_json(request.headers.get("Accept", "")):
        # Written out like /-/sd, for the same reason.
        listed = ", ".join(
            f'{{"name": {_json(name)}, "path": {_json(f"/{name}")}}}' for name in names
        )
        directory = {"path": str(targets.sockdir), "error": problem}
        body = (
            f'{{"version": {_json(__version__)}, "targets": [{listed}], '
            f'"endpoints": {json.dumps(ENDPOINTS)}, "socket_directory": {json.dumps(directory)}}}'
        )
        return web.Response(text=body, content_type="application/json")
    # Relative links, so the page works the same under a path prefix (add_subapp, a proxy).
    items = "".join(map(_link, names))
    if problem is not None:
        items += f"<li><strong>socket directory unavailable: {html.escape(problem)}</strong></li>\n"
    elif not items:
        items = "<li>none yet: no socket in the directory</li>\n"
    endpoints = "".join(f'<li><a href="{path[1:]}">{path}</a></li>\n' for path in ENDPOINTS)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8">'
        "<title>Aegis</title></head>\n<body>\n"
        f"<h1>Aegis</h1>\n<p>Version {html.escape(__version__)}: the Prometheus metrics of "
        "Unix-socket services, on one TCP port.</p>\n"
        f"<h2>Targets</h2>\n<ul>\n{items}</ul>\n<h2>Aegis</h2>\n<ul>\n{endpoints}</ul>\n"
        "</body>\n</html>\n"
    )
    return web.Response(text=page, content_type="text/html")


def _link(name: str) -> str:
    if not _PLAIN.fullmatch(name):  # every name from the directory is plain
        name, href = html.escape(name), html.escape(quote(name))
    else:
        href = name
    return f'<li><a href="{href}">{name}</a></li>\n'


async def healthy(_: web.Request) -> web.Response:
    return web.Response(text="Aegis is Healthy.\n")


async def ready(_: web.Request) -> web.Response:
    return web.Response(text="Aegis is Ready.\n")
