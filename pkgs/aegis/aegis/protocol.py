"""What every request to Aegis must be, whatever its path: HTTP/1.x with at most one valid Host,
and no asterisk-form target.

* **Version.** aiohttp's parser takes ``HTTP/0.9`` and ``HTTP/2.0`` request lines and would
  answer them as if they were HTTP/1.x (with their own version in the status line). Like Go's
  server, Aegis answers ``505 HTTP Version Not Supported`` in HTTP/1.x (1.1 for 2.0, 1.0 for
  0.9) and closes.
* **Host.** A ``Host`` header must be a host as RFC 3986 writes one: a registered name (letters,
  digits, ``-._~!$&'()*+,;=`` and ``%XX``), an IPv4 address, or an IPv6 address in brackets,
  then optionally ``:`` and a port (1 to 65535), at most :data:`MAX_HOST` bytes in all. Anything
  else is 400. What a client sends as its Host is repeated in ``/-/sd`` once per target and
  forwarded to the service as ``X-Forwarded-Host``: this bounds both. (aiohttp already refuses
  an HTTP/1.1 request without Host, and two Host fields.)
* **Asterisk form.** ``*`` is a request target for ``OPTIONS`` only (RFC 9112, section 3.2.4).
  aiohttp from 3.14 refuses it for any other method in its parser (400, connection closed);
  before 3.14 (nixpkgs 26.05 has 3.13) it reached the router, whose own 404 went uncounted on a
  kept connection. It is answered as 3.14 does, whichever aiohttp runs: a client's mistake, one
  debug line, not counted, like the parser's refusals.
* **Server.** No ``Server`` header on Aegis's own answers: the version of Python and aiohttp is
  nobody's business, and exporters send none. aiohttp adds one to every answer it prepares;
  :func:`drop_server_header`, an ``on_response_prepare`` hook, takes it out again.

A request refused here that was meant for a target (a name) is counted under ``target=""``,
like a 405, so a client cannot make a name a label value by sending a bad head.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from collections.abc import Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .relay import Relayed

__all__ = [
    "MAX_HOST",
    "RequestCheck",
    "drop_server_header",
    "ipv4_form",
    "listener_address",
    "valid_host",
]

log = logging.getLogger(__name__)

#: The longest Host accepted, in bytes (a DNS name is at most 253 characters).
MAX_HOST = 255
_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+))"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def valid_host(host: str) -> bool:
    """Whether ``host`` is ``host[:port]`` as RFC 3986 allows it, within :data:`MAX_HOST`."""
    if len(host) > MAX_HOST:
        return False
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    port = match["port"]
    if port is not None and not 0 < int(port) < 65536:
        return False
    if (literal := match["ipv6"]) is not None:
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
    return True


def ipv4_form(address: str) -> str:
    """An IPv4 peer of an IPv6 socket (``[::]``) as Go writes it, ``10.0.0.1`` rather than
    ``::ffff:10.0.0.1``; any other address unchanged."""
    if address.startswith("::ffff:"):
        with contextlib.suppress(ValueError):
            mapped = ipaddress.IPv6Address(address).ipv4_mapped
            if mapped is not None:
                return str(mapped)
    return address


def listener_address(request: web.BaseRequest) -> str | None:
    """``host:port`` of the listener the request came in on (``[v6]:port``, an IPv4 client of
    an IPv6 listener in its IPv4 form), for a request without a Host; None for a Unix socket,
    whose path names no address a scraper could use."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return None
    host, port = ipv4_form(str(sockname[0])), int(sockname[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RequestCheck:
    """The middleware that refuses a request that is not HTTP/1.x with a valid Host (see the
    module's description); ``count(request, status)`` is told of each refusal. It goes first,
    before authentication: a head that is no HTTP/1.x request deserves no 401."""

    __middleware_version__ = 1  # what @web.middleware marks: called with (request, handler)

    def __init__(self, count: Callable[[web.Request, int], None]) -> None:
        self._count = count

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.version.major != 1:
            self._count(request, 505)
            # Written as a relayed head is: aiohttp would put the request's version in the
            # status line, and a client that speaks neither 1.0 nor 1.1 could not read it.
            body = b"only HTTP/1.0 and HTTP/1.1\n"
            fields = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Connection", b"close")]
            response = Relayed(
                505,
                b"HTTP Version Not Supported",
                fields,
                has_date=False,
                length=len(body),
                body=body,
            )
            response.force_close()
            return response
        if request.raw_path == "*" and request.method != hdrs.METH_OPTIONS:
            reason = f"request target * with {request.method}"
            log.debug(
                "malformed request",
                extra={"client": request.remote, "status": 400, "reason": reason},
            )
            refused = web.Response(status=400, text=f"400: {reason}\n")
            refused.force_close()
            return refused
        host = request.headers.get(hdrs.HOST)
        if host and not valid_host(host):
            self._count(request, 400)
            return web.Response(status=400, text="bad Host header\n")
        return await handler(request)


async def drop_server_header(_: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` hook: aiohttp names itself and Python in ``Server``."""
    response.headers.popall(hdrs.SERVER, None)
