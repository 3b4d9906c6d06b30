"""The proxy: ``GET /<name>`` answered by ``<sockdir>/<name>.sock`` (path ``/metrics``).

Build the application with :func:`make_app` and run it, or mount it in another aiohttp program::

    from aegis.proxy import Config, make_app

    outer.add_subapp("/aegis/", make_app(Config(sockdir=Path("/run/metrics"))))

Failures map to statuses in one place (:data:`FAILURE_STATUS`); a scrape either returns what the
service returned, untouched (:mod:`aegis.relay`), or fails visibly — a page cut short aborts the
connection, so it is never taken for a complete 200. Each request for a target runs inside one
scope (:class:`_Scrape`) that gives back everything the scrape took and counts it once, whatever
way it ends; an error nobody foresaw is still a counted, logged 502.

A scraper that hangs up cancels its upstream exchange at once when the server cancels handlers of
lost connections (aiohttp's ``handler_cancellation=True``, as the ``aegis`` command runs);
otherwise the exchange runs to its deadline, capped at :data:`MAX_SCRAPE_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import HttpVersion11, hdrs, web
from prometheus_client import CollectorRegistry

from . import discovery, landing, protocol
from .config import Config, ConfigError, parse_duration
from .dirwatch import DirectoryWatch
from .lastscrape import LastScrapes, Outcome
from .limits import Limits
from .logs import Throttled
from .metrics import ProxyMetrics, serve_metrics
from .relay import Relayed, relayed_fields
from .socketinfo import permission_detail
from .stopping import STOPPING_KEY, GracePeriod
from .targets import (
    BadName,
    DirectoryUnavailable,
    NoSuchTarget,
    Target,
    Targets,
    socket_file_identity,
)
from .upstream import Exchange, UpstreamError, UpstreamPool

__all__ = [
    "FAILURE_STATUS",
    "MAX_SCRAPE_TIMEOUT",
    "Config",
    "ConfigError",
    "Target",
    "make_app",
    "parse_duration",
]

log = logging.getLogger("aegis.proxy")

CONFIG_KEY = web.AppKey("aegis_config", Config)
TARGETS_KEY = web.AppKey("aegis_targets", Targets)
POOL_KEY = web.AppKey("aegis_pool", UpstreamPool)
METRICS_KEY = web.AppKey("aegis_metrics", ProxyMetrics)
LIMITS_KEY = web.AppKey("aegis_limits", Limits)
WATCH_KEY = web.AppKey("aegis_directory_watch", DirectoryWatch)
ANSWERS_KEY = web.AppKey("aegis_answers", discovery.Answers)
#: Each target's last scrape, for the landing page.
LAST_SCRAPES_KEY = web.AppKey("aegis_last_scrapes", LastScrapes)
#: Aegis's own Unix listeners, as loops through them showed them (see _learn_listener).
LISTENERS_SEEN_KEY = web.AppKey("aegis_listeners_seen", set[tuple[int, int]])
_MAX_LISTENERS_SEEN = 64
#: Failed scrapes' log lines: one a minute per kind of failure and target, whatever a client
#: (or a broken service) makes happen; the rest at debug level, counted in the next line.
FAILURES_KEY = web.AppKey("aegis_failure_log", Throttled)
#: Set on a request by whatever checked its ``Authorization`` (basic auth in front of the proxy):
#: those are Aegis' credentials, never forwarded. A flag rather than a copy of the request, whose
#: headers aiohttp would re-encode from text (and fail on bytes that are not UTF-8).
CREDENTIALS_CHECKED = (
    web.RequestKey("aegis_credentials_checked", bool)  # type: ignore[attr-defined,unused-ignore]
    if hasattr(web, "RequestKey")
    else "aegis_credentials_checked"
)

#: Every way a scrape can fail before the upstream's answer starts, and what the scraper sees.
FAILURE_STATUS = {
    "bad_name": 400,
    "unknown": 404,
    "refused": 502,
    "gone": 502,
    "connect": 502,
    "permission": 502,
    "directory": 503,
    "loop": 508,
    "reset": 502,
    "stale": 502,
    "truncated": 502,
    "protocol": 502,
    "redirect": 502,
    "too_large": 502,
    "internal": 502,
    "timeout": 504,
    "client_slow": 504,
    "overloaded": 503,
    "stopping": 503,
}
# Failures any client can cause for any name, at any rate: logged at debug level only.
_QUIET = frozenset({"bad_name", "unknown", "overloaded", "directory"})

# RFC 9110 §7.6.1 hop-by-hop headers, plus what a GET without a body never forwards, and what
# Aegis writes itself (Host, X-Forwarded-Host; X-Forwarded-For is extended, not dropped).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"host",
        b"x-forwarded-host",
    }
)
_HOP_BY_HOP_AUTHORIZATION = _HOP_BY_HOP | {b"authorization"}
#: What a Unix socket is called in the upstream request's Host (it has no host name), as
#: ``curl --unix-socket`` and nginx send it; the scraper's Host goes in X-Forwarded-Host.
UPSTREAM_HOST = b"localhost"
#: The name Aegis gives itself in ``Via`` (RFC 9110 §7.6.3) on every request it forwards; a
#: request that already names it came through an Aegis and is refused (kind ``loop``).
VIA_NAME = b"aegis"
_SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
#: The longest upstream deadline a scraper's timeout header can ask for, in seconds; a longer
#: ``--scrape.timeout`` raises it. Past it a scraper that hung up no longer holds a slot.
MAX_SCRAPE_TIMEOUT = 120.0
#: Counted for a scrape whose client hung up before its answer was written (nginx's code).
CLIENT_CLOSED = 499


def make_app(config: Config, *, registry: CollectorRegistry | None = None) -> web.Application:
    """The proxy as an aiohttp application; mountable with ``add_subapp``.

    Its ``aegis_*`` metrics go to ``registry``: a fresh one by default, or the host program's
    own (prometheus_client's global ``REGISTRY`` included), where they sit beside its metrics.
    It registers nothing else there; ``/-/metrics`` serves the whole of that registry.
    """
    app = web.Application()
    targets = Targets(config.sockdir, config.targets)
    registry = CollectorRegistry(auto_describe=True) if registry is None else registry
    app[CONFIG_KEY] = config
    app[TARGETS_KEY] = targets
    app[LISTENERS_SEEN_KEY] = set()
    watch = app[WATCH_KEY] = DirectoryWatch(targets)
    app[METRICS_KEY] = ProxyMetrics(registry, watch.count_targets)
    app[LIMITS_KEY] = Limits(config.max_concurrent, config.max_concurrent_per_target)
    app[FAILURES_KEY] = Throttled(log)
    app[STOPPING_KEY] = GracePeriod()
    last_scrapes = app[LAST_SCRAPES_KEY] = LastScrapes()
    app.cleanup_ctx.append(_upstream_pool)
    metrics = app[METRICS_KEY]

    def refused(request: web.Request, status: int) -> None:
        # A request for a name is counted however it ends; under target="", like a 405.
        if "name" in request.match_info:
            metrics.request("", status)

    app.middlewares.append(protocol.RequestCheck(refused))
    app.on_response_prepare.append(protocol.drop_server_header)
    external = discovery.ExternalURL.parse(config.external_url) if config.external_url else None

    answers = app[ANSWERS_KEY] = discovery.Answers()

    async def landing_page(request: web.Request) -> web.StreamResponse:
        return await landing.landing(request, targets, answers, last_scrapes)

    async def service_discovery(request: web.Request) -> web.StreamResponse:
        return await discovery.service_discovery(request, targets, external, answers)

    async def own_metrics(request: web.Request) -> web.Response:
        return await serve_metrics(request, registry)

    # As Prometheus does with --web.route-prefix: everything under the prefix, and only a
    # redirect at the root, so that a reverse proxy can pass paths on unchanged.
    prefix = "" if config.route_prefix == "/" else config.route_prefix
    if prefix:
        app.router.add_get("/", _redirect_to(prefix + "/"))
        app.router.add_get(prefix, _redirect_to(prefix + "/"))
    # Names never start with "-", so the reserved /-/ paths can never shadow a target.
    app.router.add_get(prefix + "/", landing_page)
    app.router.add_get(prefix + "/-/healthy", discovery.healthy)
    app.router.add_get(prefix + "/-/ready", discovery.ready)
    app.router.add_get(prefix + "/-/sd", service_discovery)
    app.router.add_get(prefix + "/-/metrics", own_metrics)
    app.router.add_get(prefix + "/{name}", _handle, expect_handler=_expectation)
    # Any other method on a name is answered here rather than by the router, so it is counted.
    app.router.add_route(hdrs.METH_ANY, prefix + "/{name}", _method_not_allowed)
    return app


async def _expectation(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` is granted, as aiohttp does (a scrape has no body to wait for
    anyway), and HTTP/1.0 expects nothing; any other expectation is 417, counted under
    ``target=""`` like a 405 (aiohttp's own 417 was counted nowhere)."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own size starts after this line
        return None
    request.app[METRICS_KEY].request("", 417)
    return web.Response(status=417, text="only Expect: 100-continue is understood\n")


async def _method_not_allowed(request: web.Request) -> web.Response:
    """A scrape is GET or HEAD; anything else is 405, counted under ``target=""`` (the name is
    not looked at, so it never becomes a label)."""
    request.app[METRICS_KEY].request("", 405)
    return web.Response(status=405, text="only GET and HEAD\n", headers={hdrs.ALLOW: "GET,HEAD"})


def _redirect_to(location: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def redirect(request: web.Request) -> web.StreamResponse:
        # The landing page's links are relative: they need the trailing slash.
        query = request.rel_url.raw_query_string
        raise web.HTTPFound(f"{location}?{query}" if query else location)

    return redirect


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    pool = UpstreamPool(
        max_idle_per_socket=config.max_idle_per_socket,
        idle_timeout=config.upstream_idle_timeout,
    )
    app[POOL_KEY] = pool
    # Logs the directory's state and missing explicit sockets at start, then each change.
    async with app[WATCH_KEY].running():
        yield
    pool.close()


def deadline(request: web.Request, config: Config) -> float:
    """Seconds the whole upstream exchange may take.

    The scraper's header counts up to :data:`MAX_SCRAPE_TIMEOUT` (or ``scrape_timeout``, if
    longer); a value that is not a positive, finite number of seconds counts as absent.
    """
    value = request.headers.get(_SCRAPE_TIMEOUT_HEADER)
    if value is None:
        return config.scrape_timeout
    try:
        scraper = float(value)
    except ValueError:
        return config.scrape_timeout
    if not 0 < scraper < math.inf:  # nan compares false too
        return config.scrape_timeout
    # Answer before the scraper gives up, but never with less than half its budget.
    wanted = max(scraper - config.timeout_offset, scraper / 2)
    return min(wanted, max(MAX_SCRAPE_TIMEOUT, config.scrape_timeout))


class _Scrape:
    """One request for a target, from its arrival to its end: everything it takes (the in-flight
    gauge, a concurrency slot, an upstream connection) is given back in :meth:`__exit__`, on
    every path, and it is counted exactly once (a scraper that hung up: code 499), its outcome
    recorded for the landing page when it was for a target."""

    __slots__ = (
        "admitted",
        "began",
        "budget",
        "conn",
        "counted",
        "failures",
        "grace",
        "last",
        "limits",
        "metrics",
        "pool",
        "response",
        "shown",
        "started",
        "target",
        "writing",
    )

    def __init__(
        self,
        metrics: ProxyMetrics,
        limits: Limits,
        pool: UpstreamPool,
        grace: GracePeriod,
        failures: Throttled,
        last: LastScrapes,
    ) -> None:
        self.metrics = metrics
        self.limits = limits
        self.pool = pool
        self.grace = grace
        self.failures = failures
        self.last = last
        self.shown = ""  # an explicit target's name that did not resolve: still on the page
        self.started = time.time()
        self.began = time.perf_counter()
        self.budget: asyncio.Timeout | None = None  # the upstream deadline, once it runs
        self.target = ""  # the metrics label: "" until a name resolved
        self.admitted = False
        self.conn: Exchange | None = None
        self.response: web.StreamResponse | None = None
        self.counted = False
        self.writing = False  # waiting for the scraper to take a piece of a streamed page

    def __enter__(self) -> _Scrape:
        self.metrics.in_flight.inc()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        conn = self.conn
        if conn is not None:
            if kind is None and conn.finished:
                self.pool.release(conn)
            else:
                conn.abort()
        if self.admitted:
            self.limits.leave(self.target)
        if self.budget is not None:
            self.grace.forget(self.budget)
        self.metrics.in_flight.dec()
        if not self.counted:  # cancelled: the scraper went away, or Aegis is stopping
            self.count(CLIENT_CLOSED, "client_closed")

    def admit(self) -> str | None:
        """Take a concurrency slot for the target; or, past a bound, the reason it is refused."""
        refusal = self.limits.enter(self.target)
        self.admitted = refusal is None
        return refusal

    def count(self, status: int, kind: str = "") -> None:
        self.counted = True
        if kind:
            self.metrics.error(self.target, kind)
        self.metrics.request(self.target, status)
        if name := self.target or self.shown:
            took = time.perf_counter() - self.began
            self.last.record(name, Outcome(status, kind, self.started, took))

    def fail(self, kind: str, name: str, reason: str, detail: str = "") -> web.Response:
        """A scrape that failed before the upstream's answer began: counted, logged with the
        details (paths, owners), and answered with a one-line reason."""
        status = FAILURE_STATUS[kind]
        self.count(status, kind)
        aside = f" ({detail})" if detail else ""
        if kind in _QUIET:
            # Formatted only if debug lines are wanted: a flood of these is what it is for.
            log.debug("%s %s: %s%s", status, name, reason, aside)
        else:
            # Keyed by the label, never the name: "" for every name that resolved to nothing.
            level = logging.INFO if status < 500 else logging.WARNING
            self.failures.log((kind, self.target), level, f"{status} {name}: {reason}{aside}")
        return web.Response(status=status, text=reason + "\n")


async def _handle(request: web.Request) -> web.StreamResponse:
    app = request.app
    with _Scrape(
        app[METRICS_KEY],
        app[LIMITS_KEY],
        app[POOL_KEY],
        app[STOPPING_KEY],
        app[FAILURES_KEY],
        app[LAST_SCRAPES_KEY],
    ) as scrape:
        try:
            return await _proxy(request, scrape)
        except Exception as exc:  # every request ends in a deliberate answer
            return _unexpected(request, scrape, exc)


async def _proxy(request: web.Request, scrape: _Scrape) -> web.StreamResponse:
    app = request.app
    metrics = scrape.metrics
    name = request.match_info["name"]
    if _came_through_aegis(request.raw_headers):
        # Proxied again it would come back again: through a link to one of Aegis's own
        # listeners, or between two Aegis that reach each other.
        _learn_listener(request)
        return scrape.fail("loop", repr(name)[:120], "request already came through an aegis")
    try:
        endpoint = app[TARGETS_KEY].resolve(name)
    except BadName as exc:
        # Names that match no target are counted as target="": random names add no series.
        return scrape.fail("bad_name", repr(name)[:120], f"bad target name: {exc}")
    except NoSuchTarget as exc:
        if name in app[TARGETS_KEY].explicit:  # listed whatever its socket: its 404 is shown
            scrape.shown = name
        return scrape.fail("unknown", name, "no such target", str(exc))
    except DirectoryUnavailable as exc:
        # Never the name as a label: with the directory gone, any name fails this way.
        return scrape.fail("directory", name, "socket directory unavailable", exc.reason)
    except PermissionError as exc:
        scrape.target = name
        detail = permission_detail(str(exc.filename))
        return scrape.fail("permission", name, "permission denied", detail)
    except OSError as exc:
        # Out of descriptors for the one that reaches the socket: what the connect would say,
        # not a 404 for a socket that is there.
        scrape.target = name
        reason = f"upstream: cannot connect: {exc.strerror or exc}"
        return scrape.fail("connect", name, reason, str(exc.filename or ""))

    scrape.target = name
    if (
        endpoint.identity in app[CONFIG_KEY].listener_sockets
        or endpoint.identity in app[LISTENERS_SEEN_KEY]
    ):
        return scrape.fail(
            "loop", name, "the target is one of aegis's own listeners", endpoint.socket
        )
    if (refusal := scrape.admit()) is not None:
        return scrape.fail("overloaded", name, refusal)
    head_only = request.method == "HEAD"
    request_head = _request_head(request, endpoint.path)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(deadline(request, app[CONFIG_KEY])) as budget:
            scrape.budget = budget
            scrape.grace.watch(budget)  # a stop brings it forward to the end of the grace period
            conn = scrape.conn = await scrape.pool.send(
                endpoint.address, endpoint.identity, request_head, head_only=head_only
            )
            first = b"" if head_only else await conn.read()
            if conn.finished:
                # The whole page came with the head (the common case for a scrape): head and
                # page go out in one write, no streaming machinery.
                metrics.upstream(name, time.perf_counter() - started)
                empty = head_only or conn.status in (204, 304)
                # A HEAD's and a 304's Content-Length tell the page's length; a 204 has none.
                keep = head_only or conn.status == 304
                fields, has_date, _ = relayed_fields(conn.headers, keep_length=keep)
                response = Relayed(
                    conn.status,
                    conn.reason,
                    fields,
                    has_date=has_date,
                    length=None if empty else len(first),
                    body=first,
                )
                scrape.count(conn.status)
                await response.prepare(request)
                return response
            fields, has_date, length = relayed_fields(conn.headers, keep_length=False)
            response = scrape.response = Relayed(
                conn.status, conn.reason, fields, has_date=has_date, length=length
            )
            if length is None and request.version < (1, 1):
                response.force_close()  # the body ends with the connection
            await response.prepare(request)
            if first:
                await _write(scrape, response, first)
            while chunk := await conn.read():
                await _write(scrape, response, chunk)
    except PermissionError:
        detail = permission_detail(endpoint.socket)
        return scrape.fail("permission", name, "permission denied", detail)
    except (UpstreamError, TimeoutError) as exc:
        if isinstance(exc, UpstreamError):
            kind, reason = exc.kind, exc.reason
        elif scrape.grace.ended():
            kind, reason = "stopping", "the grace period ended"
        elif scrape.writing:
            # The service kept up; the scraper did not read the page within its own deadline.
            kind, reason = "client_slow", "deadline exceeded while the scraper read the page"
        else:
            kind, reason = "timeout", "upstream deadline exceeded"
        metrics.upstream(name, time.perf_counter() - started)
        if scrape.response is None:
            whose = "aegis is stopping" if kind == "stopping" else "upstream"
            return scrape.fail(kind, name, f"{whose}: {reason}", endpoint.socket)
        # The status line is out: the only honest signal left is to break the connection.
        scrape.count(scrape.response.status, kind)
        scrape.failures.log(
            ("aborted", name),
            logging.WARNING,
            f"{name}: aborted mid-response: {reason} ({endpoint.socket})",
        )
        _abort_client(request)
        return scrape.response
    metrics.upstream(name, time.perf_counter() - started)
    scrape.count(response.status)
    return response


async def _write(scrape: _Scrape, response: web.StreamResponse, data: bytes) -> None:
    scrape.writing = True
    await response.write(data)
    scrape.writing = False


def _unexpected(request: web.Request, scrape: _Scrape, exc: Exception) -> web.StreamResponse:
    """The end of a scrape that raised what the proxy does not expect: answered 502 (or, with
    the answer already begun, a broken connection), counted, logged with its traceback."""
    transport = request.transport
    response = scrape.response
    if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
        # Writing to a scraper that hung up (a server without handler cancellation notices it
        # here): nothing to answer, and nothing wrong with Aegis or the service.
        if not scrape.counted:
            scrape.count(CLIENT_CLOSED, "client_closed")
        return response if response is not None else web.Response(status=CLIENT_CLOSED)
    scrape.failures.log(
        ("internal", scrape.target),
        logging.ERROR,
        f"{scrape.target or '?'}: internal error in the proxy",
        exc_info=exc,
    )
    if response is not None and response.prepared:
        if not scrape.counted:
            scrape.count(response.status, "internal")
        _abort_client(request)
        return response
    if scrape.counted:  # the answer was decided, then writing it failed: it is counted
        _abort_client(request)
        return web.Response(status=FAILURE_STATUS["internal"])
    scrape.count(FAILURE_STATUS["internal"], "internal")
    return web.Response(status=FAILURE_STATUS["internal"], text="internal error\n")


def _request_head(request: web.Request, path: str) -> bytes:
    """The upstream request, from the bytes the scraper sent: header values are never decoded,
    so any byte the HTTP parser let through goes on as it came.

    A service sees the scraper's end-to-end headers, in their order, and these, after them:
    ``Host: localhost`` (a Unix socket has no host name), ``X-Forwarded-Host`` with the
    scraper's Host, ``X-Forwarded-For`` with the scraper's own list (unless its ``Connection``
    names it) and its address, and ``Via`` naming Aegis. Hop-by-hop headers, those the
    scraper's ``Connection`` names, its own ``X-Forwarded-Host``, and Aegis's credentials
    (once checked) are never forwarded."""
    query = request.rel_url.raw_query_string
    target = f"{path}?{query}" if query else path
    raw_headers = request.raw_headers
    dropped = _HOP_BY_HOP_AUTHORIZATION if request.get(CREDENTIALS_CHECKED) else _HOP_BY_HOP
    named: set[bytes] = set()
    for header, value in raw_headers:
        if header.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    host = b""
    forwarded_for: list[bytes] = []
    parts = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), _utf8(target))]
    for header, value in raw_headers:
        lower = header.lower()
        if lower == b"host":
            host = value  # the request's own: validated (aegis.protocol), only one
        elif lower in dropped or lower in named:
            continue
        elif lower == b"x-forwarded-for":
            forwarded_for.append(value)
        else:
            parts.append(b"%s: %s\r\n" % (header, value))
    parts.append(b"Host: %s\r\n" % UPSTREAM_HOST)
    if host:
        parts.append(b"X-Forwarded-Host: %s\r\n" % host)
    if client := client_address(request):
        forwarded_for.append(client.encode())
    if forwarded_for:
        parts.append(b"X-Forwarded-For: %s\r\n" % b", ".join(forwarded_for))
    parts.append(b"Via: %d.%d %s\r\n\r\n" % (*request.version, VIA_NAME))
    return b"".join(parts)


def client_address(request: web.BaseRequest) -> str:
    """The client's address as logs and X-Forwarded-For give it: an IPv4 client of an IPv6
    listener (``[::]``) in its IPv4 form, as Go writes it, not ``::ffff:10.0.0.1``; "" for a
    Unix-socket client."""
    return protocol.ipv4_form(request.remote or "")


def _learn_listener(request: web.Request) -> None:
    """A request that came back through a Unix listener names that listener (its socket's own
    name is the listener's file): a target that is it is refused from now on, before a
    connection, whether the program said so (``Config.listener_sockets``) or not."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return
    seen = request.app[LISTENERS_SEEN_KEY]
    if len(seen) < _MAX_LISTENERS_SEEN and (identity := socket_file_identity(sock)) is not None:
        seen.add(identity)


def _came_through_aegis(raw_headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    """Whether a ``Via`` field names an Aegis as one of the proxies the request passed."""
    for header, value in raw_headers:
        if header.lower() != b"via":
            continue
        for hop in value.split(b","):
            # received-protocol received-by [comment]
            words = hop.split()
            if len(words) >= 2 and words[1].lower() == VIA_NAME:
                return True
    return False


def _utf8(text: str) -> bytes:
    # aiohttp decodes the request line as UTF-8 with surrogate escapes: this gives the bytes back.
    return text.encode("utf-8", "surrogateescape")


def _abort_client(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
