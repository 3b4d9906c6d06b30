"""The web config's request side: basic auth, client-certificate SANs, rate limit, headers.

Refused credentials are logged with the user name, the reason and the client's address (never
the password), at most one line a minute, each saying how many it held back.

Wrong passwords must not cost the right ones. A bcrypt check takes tens of milliseconds of CPU,
and any client can ask for one, so:

* checks run in at most :data:`BCRYPT_THREADS` threads, off the event loop (the bcrypt package
  releases the GIL while it hashes), never more at once;
* a client (an IPv4 address, or an IPv6 /64) has at most :data:`CHECKS_PER_CLIENT` checks
  waiting or running, and after :data:`FAILURES_BURST` failed attempts only one more per
  :data:`FAILURE_INTERVAL` seconds (for :data:`MAX_CLIENTS` clients at most, the least recent
  forgotten first); past either, 429 at once, without a check;
* at most :data:`MAX_WAITING` checks wait for a thread, in order; past that, 429 at once; but a
  client that logged in before (one of the last :data:`MAX_GOOD_CLIENTS`) goes ahead of them
  and is never refused for a full queue;
* the same credentials asked for at once are checked once, and good ones are remembered
  (:data:`_CACHE_SIZE`), so a scraper's scrapes cost no check at all after its first.

``rate_limit`` counts requests that passed authentication (every request, without
``basic_auth_users``): anonymous clients and wrong passwords use no tokens, so they can no
longer make an authenticated scraper's scrapes answer 429 (exporter-toolkit checks its bucket
before authentication).

:func:`setup_web_config` puts these in front of an application; the file itself is read and
checked by :mod:`aegis.webconfig`, which also builds the TLS context the listeners serve with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping

from aiohttp import BasicAuth, web
from aiohttp.typedefs import Handler, Middleware

from .logs import RateLimited
from .protocol import RequestCheck
from .proxy import CREDENTIALS_CHECKED, client_address
from .webconfig import RateLimit, WebConfig

__all__ = ["setup_web_config"]

_CACHE_SIZE = 100  # as the toolkit: enough for every scraper of one host
#: bcrypt checks running at once (each on a core while it runs).
BCRYPT_THREADS = 2
#: Checks waiting for a thread, from clients that never logged in; past it, 429.
MAX_WAITING = 32
#: Checks of different credentials one client may have waiting or running; past it, 429.
CHECKS_PER_CLIENT = 2
#: Failed attempts a client may make in a row, then one more per FAILURE_INTERVAL.
FAILURES_BURST = 10
FAILURE_INTERVAL = 1.0
#: Clients whose failed attempts are remembered.
MAX_CLIENTS = 4096
#: Clients remembered as having logged in (their checks go first).
MAX_GOOD_CLIENTS = 256

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
    if config.users:
        mws.append(_BasicAuth(config.users).middleware)
    if config.rate_limit is not None:
        # After authentication: an anonymous flood must not take the scrapers' tokens.
        mws.append(_rate_limiter(config.rate_limit))
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


class _Refused(Exception):
    """No check for these credentials now: answered 429."""


def _client(request: web.BaseRequest) -> str:
    """Who pays for failed attempts: an IPv4 address, an IPv6 /64 (one host's usual share),
    or "" for every client of a Unix listener."""
    address = client_address(request)
    if ":" in address:
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv6Network(f"{address.partition('%')[0]}/64", strict=False))
    return address


class _Failures:
    """Failed attempts per client: a token bucket each, :data:`FAILURES_BURST` deep, one
    token back per :data:`FAILURE_INTERVAL`; at most :data:`MAX_CLIENTS` remembered."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, client: str) -> float:
        tokens, since = self._buckets.get(client, (FAILURES_BURST, 0.0))
        return min(FAILURES_BURST, tokens + (self._clock() - since) / FAILURE_INTERVAL)

    def allowed(self, client: str) -> bool:
        return client not in self._buckets or self._tokens(client) >= 1

    def failed(self, client: str) -> None:
        tokens = self._tokens(client)
        self._buckets[client] = (max(tokens - 1, 0.0), self._clock())
        self._buckets.move_to_end(client)
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)


class _Check:
    """One bcrypt check, waited for by every request with the same credentials."""

    __slots__ = ("client", "done", "hashed", "key", "password", "started", "waiters")

    def __init__(self, key: bytes, password: bytes, hashed: bytes, client: str) -> None:
        self.key = key
        self.password = password
        self.hashed = hashed
        self.client = client
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.started = False
        self.waiters = 0


class _Checks:
    """bcrypt checks in :data:`BCRYPT_THREADS` threads; see the module's description."""

    def __init__(self, checkpw: Callable[[bytes, bytes], bool]) -> None:
        self._checkpw = checkpw
        self._first: deque[_Check] = deque()  # from clients that logged in before
        self._waiting: deque[_Check] = deque()
        self._checks: dict[bytes, _Check] = {}
        self._per_client: dict[str, int] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._good: OrderedDict[str, None] = OrderedDict()

    def logged_in(self, client: str) -> None:
        self._good[client] = None
        self._good.move_to_end(client)
        if len(self._good) > MAX_GOOD_CLIENTS:
            self._good.popitem(last=False)

    async def check(self, key: bytes, password: bytes, hashed: bytes, client: str) -> bool:
        """Whether ``password`` matches ``hashed``; :class:`_Refused` when no check can be
        had now."""
        check = self._checks.get(key)
        if check is None:
            if self._per_client.get(client, 0) >= CHECKS_PER_CLIENT:
                raise _Refused("too many logins at once from this client")
            first = client in self._good
            if not first and len(self._waiting) >= MAX_WAITING:
                raise _Refused("too many logins waiting")
            check = self._checks[key] = _Check(key, password, hashed, client)
            self._per_client[client] = self._per_client.get(client, 0) + 1
            (self._first if first else self._waiting).append(check)
            self._start()
        check.waiters += 1
        try:
            return await asyncio.shield(check.done)
        finally:
            check.waiters -= 1
            if not check.waiters and not check.started:
                # Every client asking for it hung up before it ran: it never will.
                (self._first if check in self._first else self._waiting).remove(check)
                self._forget(check)
                check.done.cancel()

    def _start(self) -> None:
        while len(self._running) < BCRYPT_THREADS and (self._first or self._waiting):
            check = (self._first or self._waiting).popleft()
            check.started = True
            task = asyncio.get_running_loop().create_task(self._run(check))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, check: _Check) -> None:
        try:
            ok = await asyncio.to_thread(self._checkpw, check.password, check.hashed)
        except ValueError:  # a hash bcrypt cannot read: nobody logs in with it
            ok = False
        except BaseException:  # cancelled: the loop is closing, nothing more starts
            self._forget(check)
            check.done.cancel()
            raise
        self._forget(check)
        task = asyncio.current_task()
        if task is not None:
            self._running.discard(task)  # the thread is free: the next check may start
        self._start()
        if not check.done.done():
            check.done.set_result(ok)

    def _forget(self, check: _Check) -> None:
        self._checks.pop(check.key, None)
        left = self._per_client.get(check.client, 0) - 1
        if left > 0:
            self._per_client[check.client] = left
        else:
            self._per_client.pop(check.client, None)


class _BasicAuth:
    def __init__(self, users: Mapping[str, bytes]) -> None:
        # Imported here, when basic auth is configured: the others need not carry it.
        import bcrypt

        self._users = {u.encode(): h for u, h in users.items()}
        # Unknown users are checked against a hash of the highest configured cost, so they
        # take as long as known ones (the toolkit uses a fixed cost-10 hash).
        cost = max(int(h[4:6]) for h in users.values())
        self._dummy = bcrypt.hashpw(secrets.token_hex(16).encode(), bcrypt.gensalt(cost))
        self._key = secrets.token_bytes(32)  # keys the cache, so it never holds a password
        self._ok: dict[bytes, None] = {}  # successful checks, oldest first
        self._checks = _Checks(bcrypt.checkpw)
        self._failures = _Failures()
        self._refusals = RateLimited(log)

    async def _check(self, header: str | None, client: str) -> tuple[str, str, int] | None:
        """None when the credentials are good, else (user, why not, status) for the log."""
        if header is None:
            return "", "no credentials", 401
        try:  # latin-1 round-trips the raw bytes, which is what bcrypt compares
            creds = BasicAuth.decode(header, encoding="latin-1")
        except ValueError:
            return "", "not basic auth", 401
        user, password = creds.login.encode("latin-1"), creds.password.encode("latin-1")
        known = self._users.get(user)
        hashed = known if known is not None else self._dummy
        msg = b"%d:%s%s%s" % (len(user), user, hashed, password)
        key = hmac.new(self._key, msg, hashlib.sha256).digest()
        if key in self._ok:
            return None
        if len(password) > 72:  # bcrypt ignores the rest; Go's and bcrypt 5 refuse
            return creds.login, "password longer than 72 bytes", 401
        if not self._failures.allowed(client):
            return creds.login, "too many failed logins from this client", 429
        try:
            ok = await self._checks.check(key, password, hashed, client)
        except _Refused as exc:
            return creds.login, str(exc), 429
        # Failures are not cached: a flood of guesses can't evict good entries.
        if known is None or not ok:
            self._failures.failed(client)
            return creds.login, "unknown user" if known is None else "wrong password", 401
        self._checks.logged_in(client)
        if len(self._ok) >= _CACHE_SIZE:
            del self._ok[next(iter(self._ok))]
        self._ok[key] = None
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = await self._check(request.headers.get("Authorization"), _client(request))
        if refused is not None:
            user, reason, status = refused
            fields = {"user": user, "reason": reason, "remote": client_address(request)}
            self._refusals.log("refused credentials", fields)
            if status == 429:
                return web.Response(status=429, text="Too Many Requests")
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
