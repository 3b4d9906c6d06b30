"""The upstream's answer as the scraper gets it: its head relayed as bytes, not re-serialised.

aiohttp builds a response head from ``str`` headers: Latin-1 bytes would go out re-encoded as
UTF-8, and a missing ``Content-Type`` would become ``application/octet-stream``. A
:class:`Relayed` response lets aiohttp decide only what belongs to the scraper's connection
(keep-alive, chunked or not, ``Date`` when the upstream sent none, as RFC 9110 asks of a proxy)
and writes everything else exactly as the upstream sent it: status code, reason phrase, header
names and values, in their order. Hop-by-hop fields are dropped (RFC 9110 §7.6.1), including
those the upstream's ``Connection`` field names. Headers an ``on_response_prepare`` hook sets
(``--web.config.file``'s ``http_server_config.headers``) replace the upstream's of that name;
aiohttp's own defaults (``Server``, ``Content-Type``) are never added.

aiohttp has no public way to write a head of given bytes, so :class:`Relayed` overrides one
protected method, ``StreamResponse._write_headers``, which ``prepare()`` calls once the head is
framed and the ``on_response_prepare`` hooks have run. That is the only aiohttp internal Aegis
relies on: ``pyproject.toml`` bounds aiohttp above, and ``tests/test_aiohttp_contract.py`` fails
with a message naming this module should a new aiohttp change it.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from .upstream import content_length

__all__ = ["Relayed", "relayed_fields"]

# What aiohttp puts in a response's headers in prepare() on its own (spelt as it does): framing
# for this connection, and defaults that are not relayed.
_ADDED_BY_AIOHTTP = frozenset(
    {"Content-Length", "Transfer-Encoding", "Connection", "Date", "Server", "Content-Type"}
)
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


Fields = list[tuple[bytes, bytes]]


def relayed_fields(headers: Fields, *, keep_length: bool) -> tuple[Fields, bool, int | None]:
    """The header fields to relay, whether a ``Date`` is among them, and the upstream's
    ``Content-Length`` (left out of the fields unless ``keep_length``: Aegis frames the body)."""
    named: frozenset[bytes] = frozenset()
    for header, value in headers:
        if header.lower() == b"connection":
            named = named.union(token.strip().lower() for token in value.split(b","))
    kept = []
    has_date = False
    length = None
    for header, value in headers:
        lower = header.lower()
        if lower in _HOP_BY_HOP or lower in named:
            continue
        if lower == b"content-length":
            length = content_length(value)  # checked with the head: digits, one value
            if not keep_length:
                continue
        elif lower == b"date":
            has_date = True
        kept.append((header, value))
    return kept, has_date, length


class Relayed(web.StreamResponse):
    """An answer whose head is the upstream's; ``body``, if given, is the whole page, sent with
    the head in one write. Otherwise the caller writes the body after :meth:`prepare`."""

    def __init__(
        self,
        status: int,
        reason: bytes,
        fields: Fields,
        *,
        has_date: bool,
        length: int | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(status=status)
        self._relayed_head = (reason, fields, has_date)
        self._relayed_body = body
        self._request: web.BaseRequest | None = None
        if length is not None:
            self.content_length = length

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        self._request = request
        return await super().prepare(request)

    async def _write_headers(self) -> None:
        # Runs in prepare(), once aiohttp has framed the answer for this connection.
        request = self._request
        assert request is not None
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the scraper hung up")
        reason, fields, has_date = self._relayed_head
        framing = self.headers
        version = b"HTTP/1.1 " if request.version >= (1, 1) else b"HTTP/1.0 "
        parts = [version, b"%d %s\r\n" % (self.status, reason)]
        own = [(k, v) for k, v in framing.items() if k not in _ADDED_BY_AIOHTTP]
        if own:  # set by a hook: they replace the upstream's fields of the same name
            replaced = {name.lower().encode() for name, _ in own}
            fields = [field for field in fields if field[0].lower() not in replaced]
            parts.extend(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in own)
        parts.extend(b"%s: %s\r\n" % field for field in fields)
        if (length := framing.get("Content-Length")) is not None:
            parts.append(b"Content-Length: %s\r\n" % length.encode())
        if "Transfer-Encoding" in framing:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if (connection := framing.get("Connection")) is not None:
            parts.append(b"Connection: %s\r\n" % connection.encode())
        if not has_date:
            parts.append(b"Date: %s\r\n" % framing["Date"].encode())
        parts.append(b"\r\n")
        if body := self._relayed_body:
            parts.append(body)
            transport.writelines(parts)  # one system call, the page not copied
        else:
            transport.write(b"".join(parts))

    async def write_eof(self, data: bytes = b"") -> None:
        request = self._request
        await super().write_eof(data)
        # aiohttp waits for a full buffer to drain only after writing a body itself, and the
        # page went out in _write_headers: without this, every pipelined request would queue
        # one more whole page for a client that does not read. Waiting here, before aiohttp
        # takes the next request, keeps at most about one answer queued per connection; the
        # write deadline (aegis.cli.bounds.Guard) bounds the wait. An empty buffer, the usual case,
        # costs no await.
        if request is None:
            return
        transport = request.transport
        if transport is not None and transport.get_write_buffer_size():
            await request.writer.drain()
