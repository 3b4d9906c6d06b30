"""What Aegis tells about itself: the landing page ``/``, ``/-/sd``, ``/-/healthy``, ``/-/ready``.

Everything here is computed per request from :meth:`aegis.targets.Targets.names` (a directory
scan): a socket that appears is listed by the next request, with no cache to go stale.

``/-/sd`` is Prometheus HTTP service discovery (``http_sd_configs``): one group per target,
addressed the way the client reached Aegis (its ``Host`` header), unless an external URL says
how Prometheus should reach it (behind a reverse proxy, another host name, TLS in front).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from aiohttp import web

from . import __version__
from .targets import Targets

__all__ = ["ENDPOINTS", "ExternalURL", "landing", "service_discovery"]

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
    labels: dict[str, str] = {}
    if external is not None:
        address, prefix = external.address, external.prefix
        labels["__scheme__"] = external.scheme
    else:
        address, prefix = request.host, _prefix(request, "/-/sd")
        if request.secure:
            labels["__scheme__"] = "https"
    groups = [
        {
            "targets": [address],
            "labels": {**labels, "__metrics_path__": f"{prefix}/{name}", "target": name},
        }
        for name in targets.names()
    ]
    return web.Response(text=json.dumps(groups), content_type="application/json")


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
    names = targets.names()
    if _wants_json(request.headers.get("Accept", "")):
        body = {
            "version": __version__,
            "targets": [{"name": name, "path": f"/{name}"} for name in names],
            "endpoints": list(ENDPOINTS),
        }
        return web.Response(text=json.dumps(body), content_type="application/json")
    # Relative links, so the page works the same under a path prefix (add_subapp, a proxy).
    items = (
        "".join(
            f'<li><a href="{html.escape(quote(name))}">{html.escape(name)}</a></li>\n'
            for name in names
        )
        or "<li>none yet: no socket in the directory</li>\n"
    )
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


async def healthy(_: web.Request) -> web.Response:
    return web.Response(text="Aegis is Healthy.\n")


async def ready(_: web.Request) -> web.Response:
    return web.Response(text="Aegis is Ready.\n")
