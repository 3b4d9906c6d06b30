"""The proxy: ``GET /<name>`` answered by ``<sockdir>/<name>.sock`` (path ``/metrics``).

Build the application with :func:`make_app` and run it, or mount it in another aiohttp program::

    from aegis.proxy import Config, make_app

    outer.add_subapp("/aegis/", make_app(Config(sockdir=Path("/run/metrics"))))

Failures map to statuses in one place (:data:`FAILURE_STATUS`); a scrape either returns what the
service returned, untouched, or fails visibly — a page cut short aborts the connection, so it is
never taken for a complete 200.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from . import discovery
from .config import Config, ConfigError, parse_duration
from .dirwatch import DirectoryWatch
from .limits import Limits
from .metrics import ProxyMetrics, serve_metrics
from .targets import BadName, DirectoryUnavailable, NoSuchTarget, Target, Targets
from .upstream import Exchange, UpstreamError, UpstreamPool

__all__ = ["FAILURE_STATUS", "Config", "ConfigError", "Target", "make_app", "parse_duration"]

log = logging.getLogger("aegis.proxy")

CONFIG_KEY = web.AppKey("aegis_config", Config)
TARGETS_KEY = web.AppKey("aegis_targets", Targets)
POOL_KEY = web.AppKey("aegis_pool", UpstreamPool)
METRICS_KEY = web.AppKey("aegis_metrics", ProxyMetrics)
LIMITS_KEY = web.AppKey("aegis_limits", Limits)
WATCH_KEY = web.AppKey("aegis_directory_watch", DirectoryWatch)

#: Every way a scrape can fail before the upstream's answer starts, and what the scraper sees.
FAILURE_STATUS = {
    "bad_name": 400,
    "unknown": 404,
    "refused": 502,
    "gone": 502,
    "connect": 502,
    "permission": 502,
    "directory": 503,
    "reset": 502,
    "stale": 502,
    "truncated": 502,
    "protocol": 502,
    "timeout": 504,
    "overloaded": 503,
}

# RFC 9110 §7.6.1 hop-by-hop headers, plus what a GET without a body never forwards.
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
        b"x-forwarded-for",
    }
)
_HOP_BY_HOP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"


def make_app(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    multiprocess_dir: str | os.PathLike[str] | None = None,
) -> web.Application:
    """The proxy as an aiohttp application; mountable with ``add_subapp``.

    Self-metrics go to ``registry`` (a fresh one by default, never the global one); see
    :mod:`aegis.metrics` for ``multiprocess_dir``.
    """
    app = web.Application()
    targets = Targets(config.sockdir, config.targets)
    registry = CollectorRegistry(auto_describe=True) if registry is None else registry
    app[CONFIG_KEY] = config
    app[TARGETS_KEY] = targets
    # Several workers share the multiprocess directory: one of them logs each directory change.
    watch = app[WATCH_KEY] = DirectoryWatch(targets, shared=multiprocess_dir)
    app[METRICS_KEY] = ProxyMetrics(
        registry, watch.count_targets, multiprocess_dir=multiprocess_dir
    )
    app[LIMITS_KEY] = Limits(config.max_concurrent, config.max_concurrent_per_target)
    app.cleanup_ctx.append(_upstream_pool)
    external = discovery.ExternalURL.parse(config.external_url) if config.external_url else None

    async def landing(request: web.Request) -> web.Response:
        return await discovery.landing(request, targets)

    async def service_discovery(request: web.Request) -> web.Response:
        return await discovery.service_discovery(request, targets, external)

    async def own_metrics(request: web.Request) -> web.Response:
        return await serve_metrics(request, registry)

    # As Prometheus does with --web.route-prefix: everything under the prefix, and only a
    # redirect at the root, so that a reverse proxy can pass paths on unchanged.
    prefix = "" if config.route_prefix == "/" else config.route_prefix
    if prefix:
        app.router.add_get("/", _redirect_to(prefix + "/"))
        app.router.add_get(prefix, _redirect_to(prefix + "/"))
    # Names never start with "-", so the reserved /-/ paths can never shadow a target.
    app.router.add_get(prefix + "/", landing)
    app.router.add_get(prefix + "/-/healthy", discovery.healthy)
    app.router.add_get(prefix + "/-/ready", discovery.ready)
    app.router.add_get(prefix + "/-/sd", service_discovery)
    app.router.add_get(prefix + "/-/metrics", own_metrics)
    app.router.add_get(prefix + "/{name}", _handle)
    return app


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
    """Seconds the whole upstream exchange may take."""
    value = request.headers.get(_SCRAPE_TIMEOUT_HEADER)
    if value is not None:
        try:
            scraper = float(value)
        except ValueError:
            scraper = 0.0
        if scraper > 0 and scraper != float("inf"):
            # Answer before the scraper gives up, but never with less than half its budget.
            return max(scraper - config.timeout_offset, scraper / 2)
    return config.scrape_timeout


def _failure(
    metrics: ProxyMetrics, kind: str, target: str, name: str, reason: str, detail: str = ""
) -> web.Response:
    """A scrape that failed before the upstream's answer began: counted under ``target`` (the
    metrics label, "" when the name matched none), logged with the details (paths, owners), and
    answered with a one-line reason."""
    status = FAILURE_STATUS[kind]
    metrics.error(target, kind)
    metrics.request(target, status)
    if kind in ("unknown", "overloaded", "directory"):
        level = logging.DEBUG  # a flood of random names or refusals must not flood the log
    else:
        level = logging.INFO if status < 500 else logging.WARNING
    log.log(level, "%s %s: %s%s", status, name, reason, f" ({detail})" if detail else "")
    return web.Response(status=status, text=reason + "\n")


async def _handle(request: web.Request) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    metrics.in_flight.inc()
    try:
        return await _proxy(request, metrics)
    finally:
        metrics.in_flight.dec()


async def _proxy(request: web.Request, metrics: ProxyMetrics) -> web.StreamResponse:
    app = request.app
    name = request.match_info["name"]
    try:
        endpoint = app[TARGETS_KEY].resolve(name)
    except BadName as exc:
        # Names that match no target are counted as target="": random names add no series.
        return _failure(metrics, "bad_name", "", repr(name)[:120], f"bad target name: {exc}")
    except NoSuchTarget as exc:
        return _failure(metrics, "unknown", "", name, "no such target", str(exc))
    except DirectoryUnavailable as exc:
        # Never the name as a label: with the directory gone, any name fails this way.
        return _failure(metrics, "directory", "", name, "socket directory unavailable", exc.reason)
    except PermissionError as exc:
        detail = _permission_detail(str(exc.filename))
        return _failure(metrics, "permission", name, name, "permission denied", detail)

    limits = app[LIMITS_KEY]
    if (refusal := limits.enter(name)) is not None:
        return _failure(metrics, "overloaded", name, name, refusal)
    head_only = request.method == "HEAD"
    request_head = _request_head(request, endpoint.path)
    pool = app[POOL_KEY]
    response: web.StreamResponse | None = None
    conn: Exchange | None = None
    started = time.perf_counter()
    try:
        async with asyncio.timeout(deadline(request, app[CONFIG_KEY])):
            conn = await pool.send(
                endpoint.address, endpoint.identity, request_head, head_only=head_only
            )
            reason = conn.reason or None
            first = b"" if head_only else await conn.read()
            if conn.finished and not head_only:
                # The whole page came with the head (the common case for a scrape): one
                # response, one write, no streaming machinery. aiohttp sets Content-Length.
                pool.release(conn)
                metrics.upstream(name, time.perf_counter() - started)
                metrics.request(name, conn.status)
                headers = _response_headers(conn, keep_length=False)
                return web.Response(status=conn.status, reason=reason, headers=headers, body=first)
            headers = _response_headers(conn, keep_length=True)
            response = web.StreamResponse(status=conn.status, reason=reason, headers=headers)
            await response.prepare(request)
            if first:
                await response.write(first)
            while chunk := await conn.read():
                await response.write(chunk)
    except PermissionError:
        detail = _permission_detail(endpoint.socket)
        return _failure(metrics, "permission", name, name, "permission denied", detail)
    except (UpstreamError, TimeoutError) as exc:
        if conn is not None:
            conn.abort()
        kind = exc.kind if isinstance(exc, UpstreamError) else "timeout"
        reason = exc.reason if isinstance(exc, UpstreamError) else "upstream deadline exceeded"
        metrics.upstream(name, time.perf_counter() - started)
        if response is None:
            return _failure(metrics, kind, name, name, f"upstream: {reason}", endpoint.socket)
        # The status line is out: the only honest signal left is to break the connection.
        metrics.error(name, kind)
        metrics.request(name, response.status)
        log.warning("%s: aborted mid-response: %s (%s)", name, reason, endpoint.socket)
        _abort_client(request)
        return response
    except BaseException:
        if conn is not None:
            conn.abort()
        raise
    finally:
        limits.leave(name)
    pool.release(conn)
    metrics.upstream(name, time.perf_counter() - started)
    metrics.request(name, response.status)
    return response


def _request_head(request: web.Request, path: str) -> bytes:
    query = request.rel_url.raw_query_string
    target = f"{path}?{query}" if query else path
    connection_named = frozenset(
        token.strip().lower().encode("latin-1")
        for value in request.headers.getall("Connection", ())
        for token in value.split(",")
    )
    host = b"localhost"
    forwarded_for: list[bytes] = []
    parts = [f"{request.method} {target} HTTP/1.1\r\n".encode("latin-1")]
    for header, value in request.raw_headers:
        lower = header.lower()
        if lower in _HOP_BY_HOP or lower in connection_named:
            if lower == b"host" and value:
                host = value
            elif lower == b"x-forwarded-for":
                forwarded_for.append(value)
            continue
        parts.append(header + b": " + value + b"\r\n")
    parts.append(b"Host: " + host + b"\r\n")
    if request.remote:
        forwarded_for.append(request.remote.encode("latin-1"))
    if forwarded_for:
        parts.append(b"X-Forwarded-For: " + b", ".join(forwarded_for) + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _response_headers(conn: Exchange, *, keep_length: bool) -> list[tuple[str, str]]:
    headers = []
    named: set[str] = set()  # headers the upstream's Connection header makes hop-by-hop
    for header, value in conn.headers:
        name = header.decode("latin-1")
        lower = name.lower()
        if lower in _HOP_BY_HOP_RESPONSE:
            if lower == "connection":
                named.update(token.strip().lower() for token in value.decode("latin-1").split(","))
        elif lower != "content-length" or keep_length:
            headers.append((name, value.decode("latin-1")))
    if named:
        headers = [(name, value) for name, value in headers if name.lower() not in named]
    return headers


def _abort_client(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _permission_detail(path: str) -> str:
    """Which file, which group, and who we are: what an operator needs to fix the permissions."""
    try:
        st = os.stat(path)
        owner = _user_name(st.st_uid)
        group = _group_name(st.st_gid)
        about = f"{path} is {owner}:{group} mode {st.st_mode & 0o7777:04o}"
    except OSError:
        parent = os.path.dirname(path) or "."
        try:
            st = os.stat(parent)
            about = (
                f"directory {parent} is {_user_name(st.st_uid)}:{_group_name(st.st_gid)} "
                f"mode {st.st_mode & 0o7777:04o}"
            )
        except OSError:
            about = f"{path} cannot be inspected"
    groups = ",".join(_group_name(gid) for gid in sorted(set(os.getgroups()) | {os.getegid()}))
    return f"{about}; aegis runs as {_user_name(os.geteuid())} in groups {groups}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
