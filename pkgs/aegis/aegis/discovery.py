"""What Aegis tells about itself: ``/-/sd``, ``/-/healthy``, ``/-/ready``, and how the answers
listing every target (these and the landing page, :mod:`aegis.landing`) are kept and sent.

The lists come from :meth:`aegis.targets.Targets.catalog` (a directory scan, reused only while
the directory's time stamps say nothing changed): a socket that appears is listed by the next
request. A socket directory that cannot be listed makes ``/-/sd`` a 503 with the reason:
Prometheus keeps the targets it had (an empty list would make it drop them all); the landing
page shows the reason.

``/-/sd`` is Prometheus HTTP service discovery (``http_sd_configs``): one group per target,
addressed the way the client reached Aegis (its ``Host`` header, or without one the address of
the listener it came in on), unless an external URL says how Prometheus should reach it (behind
a reverse proxy, another host name, TLS in front). Each group carries its socket's path (links
followed), owner and group as ``__meta_aegis_socket*`` labels, from the catalog: nothing is
looked at per request.

What these answers cost never grows with what a client sends (:class:`Answers`): the address
is at most 255 bytes (:mod:`aegis.protocol`), and each answer is built once per catalog and
shared by every client that asks for it, in pieces that wait for the client to read the one
before, so a client that reads nothing holds no copy of its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json
from typing import cast
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from . import protocol
from .targets import Catalog, DirectoryUnavailable, Targets

__all__ = ["ENDPOINTS", "PIECE_NAMES", "Answers", "ExternalURL", "joined", "service_discovery"]

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


#: Names per piece of an answer built as it is sent: about 250 bytes each with their socket's
#: labels, plus the address (at most 255 bytes): at most about 32 KiB a piece, under the
#: transport's 64 KiB high-water mark, so a client that reads nothing holds that buffer and one
#: piece (256 names held four pieces of 91 KiB each: 370 KB a client, when clients asked with
#: distinct Hosts). The landing page's rows are about as long.
PIECE_NAMES = 64
#: Bytes of a shared answer written at once: the next waits until the client took this one.
_SLICE = 64 * 1024
#: Answers kept per catalog: /-/sd for a few addresses (a scraper asks with one or two).
MAX_KEPT_ANSWERS = 6
#: Whole answers held at once, kept or still being sent, in bytes; past it, an answer that is
#: not kept is built piece by piece as it is sent, each client holding one piece at most.
MAX_HELD_BYTES = 32 * 1024 * 1024

Pieces = Iterator[bytes]


class _Whole:
    """A built answer, and how many hold it (the cache, and each client being sent it)."""

    __slots__ = ("body", "users")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.users = 0


class Answers:
    """The bodies of ``/-/sd``, built once per catalog and key (address, scheme and prefix),
    and shared: every client asking for the same answer gets the same bytes object, written out
    in slices (uvloop's transports write from it without a copy). At most
    :data:`MAX_KEPT_ANSWERS` are kept per catalog, and whole answers held at once, kept or
    being sent, take at most :data:`MAX_HELD_BYTES` (plus the one being built); any other
    answer is built piece by piece while it is sent. So what clients that do not read can pin
    is bounded: none of them holds more than a piece or a slice of its own, and the
    transport's buffer (64 KiB), until the write deadline cuts it.

    An answer with a part that changes between requests (the landing page's last scrapes) keeps
    its per-target parts instead (:meth:`rows`), one sequence per key and catalog, and is built
    piece by piece as it is sent."""

    def __init__(self) -> None:
        self._catalog: Catalog | None = None
        self._kept: dict[Hashable, _Whole] = {}
        self._rows: dict[Hashable, Sequence[bytes]] = {}
        self._held = 0
        self.sending = 0  # answers being written now

    @property
    def held_bytes(self) -> int:
        """Bytes of the whole answers kept or being sent (each counted once)."""
        return self._held

    def get(self, catalog: Catalog, key: Hashable, build: Callable[[], Pieces]) -> _Whole | Pieces:
        """The answer for ``key`` given ``catalog``: a shared whole (to :meth:`release` once
        sent), or pieces built as they are sent."""
        self._follow(catalog)
        whole = self._kept.get(key)
        if whole is None:
            if len(self._kept) >= MAX_KEPT_ANSWERS or self._held >= MAX_HELD_BYTES:
                return build()
            whole = self._kept[key] = _Whole(b"".join(build()))
            self._take(whole)  # the cache's hold
        self._take(whole)
        return whole

    def rows(
        self, catalog: Catalog, key: Hashable, build: Callable[[], Sequence[bytes]]
    ) -> Sequence[bytes]:
        """The per-target parts of ``key``'s answer given ``catalog``, built once: one per name
        (as many as the catalog holds, so their bytes grow with the directory, like it)."""
        self._follow(catalog)
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = build()
        return rows

    def _follow(self, catalog: Catalog) -> None:
        """Forget what was built from another catalog."""
        if catalog is not self._catalog:
            for outdated in self._kept.values():
                self.release(outdated)
            self._kept.clear()
            self._rows.clear()
            self._catalog = catalog

    def _take(self, whole: _Whole) -> None:
        if not whole.users:
            self._held += len(whole.body)
        whole.users += 1

    def release(self, whole: _Whole) -> None:
        whole.users -= 1
        if not whole.users:
            self._held -= len(whole.body)

    async def send(
        self, request: web.Request, content_type: str, answer: _Whole | Pieces
    ) -> web.StreamResponse:
        """Write ``answer`` (from :meth:`get`), each piece once the client took the one before
        (aiohttp's write waits while the transport's buffer is full)."""
        response = web.StreamResponse()
        response.content_type = content_type
        response.charset = "utf-8"
        whole = answer if isinstance(answer, _Whole) else None
        self.sending += 1
        try:
            if whole is not None:
                response.content_length = len(whole.body)
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            # The last piece goes with write_eof, which then waits while the transport's
            # buffer is full: a pipelined request is taken only then, as after any other
            # answer. (Typed bytes; aiohttp takes any buffer, and a memoryview saves a copy.)
            if whole is not None:
                # Slices of the shared body cost nothing to make ahead.
                view = memoryview(whole.body)
                starts = range(0, len(view), _SLICE)
                for start in starts[:-1]:
                    await response.write(cast(bytes, view[start : start + _SLICE]))
                await response.write_eof(cast(bytes, view[starts[-1] :] if starts else b""))
            else:
                assert not isinstance(answer, _Whole)
                # One piece at a time, never the next built while one waits to be written;
                # chunked, so write_eof's closing chunk is a write that waits too.
                for piece in answer:
                    await response.write(piece)
                await response.write_eof()
        except ConnectionError:
            pass  # the client went away: nothing more to send
        finally:
            self.sending -= 1
            if whole is not None:
                self.release(whole)
        return response


async def service_discovery(
    request: web.Request, targets: Targets, external: ExternalURL | None, answers: Answers
) -> web.StreamResponse:
    try:
        catalog = targets.catalog()
    except DirectoryUnavailable as exc:
        # The reason names the directory, whose path need not be UTF-8.
        reason = f"socket directory unavailable: {exc.reason}\n"
        return web.Response(
            status=503,
            body=reason.encode(errors="backslashreplace"),
            content_type="text/plain",
            charset="utf-8",
        )
    labels: dict[str, str] = {}
    if external is not None:
        address, prefix = external.address, external.prefix
        labels["__scheme__"] = external.scheme
    else:
        # Validated: at most 255 bytes of host[:port] (aegis.protocol). HTTP/1.0 may leave it
        # out: then the listener's own address, never a Unix socket's path.
        address = request.headers.get(hdrs.HOST) or protocol.listener_address(request) or ""
        if not address:
            return web.Response(
                status=400,
                text="a Host header is needed: this listener is a Unix socket, no address\n",
            )
        prefix = _prefix(request, "/-/sd")
        if request.secure:
            labels["__scheme__"] = "https"
    key = ("sd", address, tuple(labels.items()), prefix)
    answer = answers.get(catalog, key, lambda: _sd_groups(catalog, address, labels, prefix))
    return await answers.send(request, "application/json", answer)


def _sd_groups(catalog: Catalog, address: str, labels: dict[str, str], prefix: str) -> Pieces:
    """``json.dumps`` of one group per name, to the byte, written out by hand (with ten
    thousand sockets the generic encoder alone took longer than the whole answer may), in
    pieces of :data:`PIECE_NAMES` groups."""
    common = "".join(f"{_json(key)}: {_json(value)}, " for key, value in labels.items())
    head = f'{{"targets": {json.dumps([address])}, "labels": {{{common}"__metrics_path__": '
    sockets = catalog.sockets

    def group(name: str) -> str:
        # Empty owner and group (an explicit target's socket that cannot be looked at) are, to
        # Prometheus, labels that are not there.
        file = sockets[name]
        return (
            f'{head}{_json(f"{prefix}/{name}")}, "target": {_json(name)}, '
            f'"__meta_aegis_socket": {_json(file.path)}, '
            f'"__meta_aegis_socket_owner": {_json(file.owner)}, '
            f'"__meta_aegis_socket_group": {_json(file.group)}}}}}'
        )

    return joined("[", catalog.names, group, ", ", "]")


def joined(
    first: str, names: Sequence[str], item: Callable[[str], str], between: str, last: str
) -> Pieces:
    """``first + between.join(map(item, names)) + last``, encoded, in pieces."""
    yield first.encode()
    for start in range(0, len(names), PIECE_NAMES):
        # No name for the text: the generator would keep it while the piece waits.
        yield (
            (between if start else "") + between.join(map(item, names[start : start + PIECE_NAMES]))
        ).encode()
    yield last.encode()


async def healthy(_: web.Request) -> web.Response:
    return web.Response(text="Aegis is Healthy.\n")


async def ready(_: web.Request) -> web.Response:
    return web.Response(text="Aegis is Ready.\n")
