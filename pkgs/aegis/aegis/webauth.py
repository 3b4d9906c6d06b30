"""The web config's request side: basic auth, client-certificate SANs, rate limit, headers.

Refused credentials are logged with the user name, the reason and the client's address (never
the password), at most one line a minute, each saying how many it held back.

:func:`setup_web_config` puts these in front of an application; the file itself is read and
checked by :mod:`aegis.webconfig`, which also builds the TLS context the listeners serve with.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Mapping

from aiohttp import BasicAuth, web
from aiohttp.typedefs import Handler, Middleware

from .logs import RateLimited
from .protocol import RequestCheck
from .proxy import CREDENTIALS_CHECKED, client_address
from .webconfig import RateLimit, WebConfig

__all__ = ["setup_web_config"]

_CACHE_SIZE = 100  # as the toolkit: enough for every scraper of one host

log = logging.getLogger(__name__)


def setup_web_config(app: web.Application, config: WebConfig) -> None:
    """Add auth, SAN checks and rate limiting in front of every route, and the headers.

    Every path is protected, as in the toolkit (it wraps the whole handler). Headers are
    added in ``on_response_prepare`` rather than a middleware so that streamed responses,
    401s and aiohttp's own error pages get them too.
    """
    mws: list[Middleware] = []
    if config.tls is not None and config.tls.client_allowed_sans:
        mws.append(_san_check(frozenset(config.tls.client_allowed_sans)))
    if config.rate_limit is not None:
        mws.append(_rate_limiter(config.rate_limit))
    if config.users:
        mws.append(_BasicAuth(config.users).middleware)
    # In front of the app's own middlewares, so none of them can answer before auth; only the
    # proxy's check that a request is HTTP/1.x with a valid Host goes before.
    first = 1 if app.middlewares and isinstance(app.middlewares[0], RequestCheck) else 0
    for i, mw in enumerate(mws, first):
        app.middlewares.insert(i, mw)
    headers = dict(config.headers)
    if headers:

        async def add_headers(_: web.Request, response: web.StreamResponse) -> None:
            response.headers.update(headers)

        app.on_response_prepare.append(add_headers)


class _BasicAuth:
    def __init__(self, users: Mapping[str, bytes]) -> None:
        # Imported here, when basic auth is configured: the others need not carry it.
        import bcrypt

        self._checkpw = bcrypt.checkpw
        self._users = {u.encode(): h for u, h in users.items()}
        # Unknown users are checked against a hash of the highest configured cost, so they
        # take as long as known ones (the toolkit uses a fixed cost-10 hash).
        cost = max(int(h[4:6]) for h in users.values())
        self._dummy = bcrypt.hashpw(secrets.token_hex(16).encode(), bcrypt.gensalt(cost))
        self._key = secrets.token_bytes(32)  # keys the cache, so it never holds a password
        self._ok: dict[bytes, None] = {}  # successful checks, oldest first
        self._lock = asyncio.Lock()  # bcrypt is CPU-bound: one at a time, as the toolkit
        self._refusals = RateLimited(log)

    async def _check(self, header: str | None) -> tuple[str, str] | None:
        """None when the credentials are good, else (user, why not) for the log."""
        if header is None:
            return "", "no credentials"
        try:  # latin-1 round-trips the raw bytes, which is what bcrypt compares
            creds = BasicAuth.decode(header, encoding="latin-1")
        except ValueError:
            return "", "not basic auth"
        user, password = creds.login.encode("latin-1"), creds.password.encode("latin-1")
        known = self._users.get(user)
        hashed = known if known is not None else self._dummy
        msg = b"%d:%s%s%s" % (len(user), user, hashed, password)
        key = hmac.new(self._key, msg, hashlib.sha256).digest()
        if key in self._ok:
            return None
        if len(password) > 72:  # bcrypt ignores the rest; Go's and bcrypt 5 refuse
            return creds.login, "password longer than 72 bytes"
        async with self._lock:
            ok = await asyncio.to_thread(self._checkpw, password, hashed)
        # Failures are not cached: a flood of guesses can't evict good entries.
        if known is None:
            return creds.login, "unknown user"
        if not ok:
            return creds.login, "wrong password"
        if len(self._ok) >= _CACHE_SIZE:
            del self._ok[next(iter(self._ok))]
        self._ok[key] = None
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = await self._check(request.headers.get("Authorization"))
        if refused is not None:
            user, reason = refused
            fields = {"user": user, "reason": reason, "remote": client_address(request)}
            self._refusals.log("refused credentials", fields)
            return web.Response(
                status=401, text="Unauthorized", headers={"WWW-Authenticate": "Basic"}
            )
        # Aegis' own credentials must never reach an upstream: the proxy leaves them out.
        request[CREDENTIALS_CHECKED] = True
        return await handler(request)


def _san_check(allowed: frozenset[str]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        sans = set()
        for kind, value in (cert or {}).get("subjectAltName", ()):
            # Go compares net.IP.String(); ssl spells IPv6 differently.
            sans.add(str(ipaddress.ip_address(value.strip())) if kind == "IP Address" else value)
        if not sans & allowed:
            return web.Response(status=403, text="Forbidden")
        return await handler(request)

    return middleware


def _rate_limiter(limit: RateLimit) -> Middleware:
    tokens, last = float(limit.burst), time.monotonic()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal tokens, last
        now = time.monotonic()
        tokens, last = min(limit.burst, tokens + (now - last) / limit.interval), now
        if tokens < 1:
            return web.Response(status=429, text="Too Many Requests")
        tokens -= 1
        return await handler(request)

    return middleware
