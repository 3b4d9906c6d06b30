"""``--web.config.file``: TLS, basic auth and response headers in exporter-toolkit's format.

The file format is Prometheus exporter-toolkit's (docs/web-configuration.md), so one file can
serve Aegis and the exporters next to it. Where Python's ``ssl`` cannot do what Go's
``crypto/tls`` does, Aegis refuses the file at start rather than run weaker than asked:

* ``client_auth_type`` ``RequestClientCert`` / ``RequireAnyClientCert`` ask for a certificate
  without verifying it; OpenSSL as exposed by ``ssl`` has no "accept anything" verify callback,
  so these are errors (use ``RequireAndVerifyClientCert`` with ``client_ca_file``).
* Verifying modes need ``client_ca``/``client_ca_file``: Go would fall back to the system
  roots, which would let any publicly issued certificate in.
* ``min_version``/``max_version`` ``TLS10``/``TLS11`` are errors: ``ssl`` deprecates them and
  OpenSSL 3 refuses them at its default security level anyway.
* ``curve_preferences`` may name one curve only (``SSLContext.set_ecdh_curve``).
* ``client_allowed_sans`` is checked per request (403), not in the handshake, and needs a
  verifying ``client_auth_type`` (the toolkit silently ignores it with ``NoClientCert``).
* Any key under ``tls_server_config`` turns TLS on and then needs a cert and key (the toolkit
  silently serves plain HTTP when only e.g. ``min_version`` is set); an empty file is an error.
* ``http_server_config.http2: true`` (the toolkit's default) is accepted and ignored with a
  warning: aiohttp speaks HTTP/1.1 only and clients fall back to it through ALPN.
* ``rate_limit.burst`` must be at least 1 when ``interval`` is set (0 would refuse everything).
* A failed TLS handshake (no or an untrusted client certificate, a protocol or cipher mismatch)
  is logged, at most once a minute with a count of the others; the toolkit leaves it
  to Go's http.Server error log.
* The file itself is read once, at start (the toolkit re-reads it per request); the cert, key
  and client CA files are re-read on the first handshake after their stat() changes, and a
  broken rotation keeps the previous pair and logs an error.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .logs import RateLimited
from .yamlfile import YamlFile

__all__ = [
    "RateLimit",
    "TLSConfig",
    "WebConfig",
    "WebConfigError",
    "load_web_config",
    "server_ssl_context",
]

log = logging.getLogger(__name__)


class WebConfigError(Exception):
    """The web config file is unusable; the message names the file and the key."""


# The toolkit allows only these response headers; a tuple restricts the value.
_HEADERS: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_AUTH_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1"}
_CURVES["X25519"] = "X25519"
# Go's tls.CipherSuites() names (IANA) -> OpenSSL names. TLS 1.3 suites are not configurable
# in Go either, so they are accepted and left to OpenSSL's defaults.
_TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
_BCRYPT = re.compile(rb"\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class TLSConfig:
    """``tls_server_config``, validated, with file paths resolved against the file's dir."""

    source: str  # the config file, for messages about later reloads
    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_ca_file: Path | None = None
    client_ca: str | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: tuple[str, ...] = ()
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    cipher_suites: tuple[str, ...] = ()  # OpenSSL names
    prefer_server_cipher_suites: bool = True
    curve: str | None = None  # OpenSSL name


@dataclass(frozen=True)
class RateLimit:
    """``rate_limit``: a token bucket refilled every ``interval`` seconds, ``burst`` deep."""

    interval: float
    burst: int


@dataclass(frozen=True)
class WebConfig:
    tls: TLSConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    rate_limit: RateLimit | None = None


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate the file once, at start; every problem is one WebConfigError."""
    src = os.fspath(path)
    file = YamlFile(src, WebConfigError)
    data = file.load()
    if data is None:
        # An empty file most likely means a failed template; serving without TLS/auth is unsafe.
        raise WebConfigError(f"{src}: file is empty")
    top = file.mapping("", data, _TOP_KEYS)
    tls_keys = file.mapping("tls_server_config", top.get("tls_server_config"), _TLS_KEYS)
    tls = _tls_config(file, Path(src).parent, tls_keys) if tls_keys else None
    users: dict[str, bytes] = {}
    for user, hashed in file.mapping("basic_auth_users", top.get("basic_auth_users")).items():
        h = file.string(f"basic_auth_users.{user}", hashed).encode("ascii", "replace")
        if not _BCRYPT.fullmatch(h):
            raise WebConfigError(f"{src}: basic_auth_users.{user}: not a bcrypt hash")
        users[user] = h
    http = file.mapping("http_server_config", top.get("http_server_config"), {"http2", "headers"})
    if http.get("http2", False) is True:
        log.warning("%s: http_server_config.http2: ignored, aiohttp serves HTTP/1.1 only", src)
    elif "http2" in http and http["http2"] is not False:
        raise WebConfigError(f"{src}: http_server_config.http2: must be true or false")
    headers: dict[str, str] = {}
    for name, value in file.mapping("http_server_config.headers", http.get("headers")).items():
        key = f"http_server_config.headers.{name}"
        if name not in _HEADERS:
            raise WebConfigError(f"{src}: {key}: header can not be configured")
        v = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        v = file.string(key, v)
        if _HEADERS[name] and v not in _HEADERS[name]:
            raise WebConfigError(f"{src}: {key}: {v!r} is not one of {list(_HEADERS[name])}")
        if v:  # the toolkit documents blank as unset
            headers[name] = v
    return WebConfig(tls, MappingProxyType(users), MappingProxyType(headers), _rate(file, top))


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """A server context that picks up rotated cert/key/CA files on the next handshake.

    OpenSSL calls ``sni_callback`` on every handshake, with or without SNI, so it is where a
    freshly built context can be swapped in without a restart.
    """
    ctx = _build_context(tls)
    ctx.sni_callback = _Rotator(tls, ctx)
    ctx.sslobject_class = _logging_handshakes(RateLimited(log))
    return ctx


def _logging_handshakes(failures: RateLimited) -> type[ssl.SSLObject]:
    """Connections' TLS objects that log a failed handshake.

    asyncio and uvloop drop such a connection without a word (they log it only when the loop
    runs in debug mode), and the listener's protocol never hears of it; every handshake step
    goes through the connection's SSLObject, which the context makes (``wrap_bio``).
    """

    class LoggingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # not a failure: more bytes to come
            except ssl.SSLError as exc:
                # "[SSL: HTTP_REQUEST] http request (_ssl.c:1006)": the text alone says it.
                err = re.sub(r"^\[SSL: \w+\] | \(_ssl\.c:\d+\)$", "", str(exc.strerror or exc))
                failures.log("TLS handshake failed", {"err": err})
                raise

    return LoggingSSLObject


_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
_TLS_KEYS = {
    *("cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file", "client_auth_type"),
    *("client_allowed_sans", "min_version", "max_version", "cipher_suites"),
    *("prefer_server_cipher_suites", "curve_preferences"),
}


def _rate(file: YamlFile, top: dict[str, Any]) -> RateLimit | None:
    src = file.src
    d = file.mapping("rate_limit", top.get("rate_limit"), {"interval", "burst"})
    raw = d.get("interval", 0)
    if (raw == 0 and not isinstance(raw, bool)) or raw == "0":
        return None  # the toolkit: an interval of 0 disables the limiter
    if not isinstance(raw, str) or not re.fullmatch(f"(?:{_DURATION.pattern})+", raw):
        raise WebConfigError(f"{src}: rate_limit.interval: not a duration like 1s or 100ms")
    interval = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(raw))
    burst = d.get("burst", 0)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise WebConfigError(f"{src}: rate_limit.burst: must be an integer of at least 1")
    return RateLimit(interval, burst) if interval > 0 else None


def _tls_config(file: YamlFile, base: Path, d: dict[str, Any]) -> TLSConfig:
    def get(name: str) -> str | None:
        value = d.get(name)
        return None if value is None or value == "" else file.string(f"{pre}{name}", value)

    src, pre = file.src, "tls_server_config."
    files = {n: base / v for n in ("cert_file", "key_file", "client_ca_file") if (v := get(n))}
    inline = {n: v for n in ("cert", "key", "client_ca") if (v := get(n))}
    for name in ("cert", "key", "client_ca"):
        if f"{name}_file" in files and name in inline:
            raise WebConfigError(f"{src}: {pre}{name}: give {name} or {name}_file, not both")
    for name in ("cert", "key"):
        if f"{name}_file" not in files and name not in inline:
            raise WebConfigError(f"{src}: {pre}{name}_file: missing (or give {name} inline)")
    auth = get("client_auth_type") or "NoClientCert"
    if auth in _UNVERIFIED_AUTH:
        raise WebConfigError(
            f"{src}: {pre}client_auth_type: {auth} is not supported: Python's ssl cannot accept"
            " a client certificate without verifying it; use RequireAndVerifyClientCert"
        )
    if auth not in _AUTH_MODES:
        raise WebConfigError(f"{src}: {pre}client_auth_type: unknown value {auth!r}")
    has_ca = "client_ca_file" in files or "client_ca" in inline
    if auth == "NoClientCert" and has_ca:
        raise WebConfigError(f"{src}: {pre}client_auth_type: client CA given without a policy")
    if auth != "NoClientCert" and not has_ca:
        raise WebConfigError(f"{src}: {pre}client_ca_file: required by {auth}")
    sans = file.strings(f"{pre}client_allowed_sans", d.get("client_allowed_sans"))
    if sans and auth == "NoClientCert":
        raise WebConfigError(f"{src}: {pre}client_allowed_sans: needs a verifying client_auth_type")
    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        v = get(name) or default
        if v not in _VERSIONS:
            hint = " (no longer supported)" if v in ("TLS10", "TLS11") else ""
            raise WebConfigError(f"{src}: {pre}{name}: unknown TLS version {v!r}{hint}")
        versions[name] = _VERSIONS[v]
    if versions["min_version"] > versions["max_version"]:
        raise WebConfigError(f"{src}: {pre}min_version: above max_version")
    ciphers = file.strings(f"{pre}cipher_suites", d.get("cipher_suites"))
    for c in ciphers:
        if c not in _CIPHERS and c not in _TLS13_SUITES:
            raise WebConfigError(f"{src}: {pre}cipher_suites: unknown cipher {c!r}")
    curves = file.strings(f"{pre}curve_preferences", d.get("curve_preferences"))
    if len(curves) > 1 or any(c not in _CURVES for c in curves):
        raise WebConfigError(f"{src}: {pre}curve_preferences: give one of {list(_CURVES)}")
    prefer = d.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError(f"{src}: {pre}prefer_server_cipher_suites: must be true or false")
    tls = TLSConfig(
        source=src,
        cert_file=files.get("cert_file"),
        key_file=files.get("key_file"),
        cert=inline.get("cert"),
        key=inline.get("key"),
        client_ca_file=files.get("client_ca_file"),
        client_ca=inline.get("client_ca"),
        client_auth_type=auth,
        client_allowed_sans=sans,
        cipher_suites=tuple(_CIPHERS[c] for c in ciphers if c in _CIPHERS),
        prefer_server_cipher_suites=prefer,
        curve=_CURVES[curves[0]] if curves else None,
        **versions,
    )
    _build_context(tls)  # missing, unreadable or mismatched files fail now, not at first scrape
    return tls


def _pem(tls: TLSConfig, name: str, path: Path | None, inline: str | None) -> str:
    if path is None:
        return inline or ""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise WebConfigError(f"{tls.source}: tls_server_config.{name}_file: {e}") from e
    if not text.strip():
        raise WebConfigError(f"{tls.source}: tls_server_config.{name}_file: {path} is empty")
    return text


def _build_context(tls: TLSConfig) -> ssl.SSLContext:
    src, pre = tls.source, "tls_server_config."
    cert = _pem(tls, "cert", tls.cert_file, tls.cert)
    key = _pem(tls, "key", tls.key_file, tls.key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version, ctx.maximum_version = tls.min_version, tls.max_version
    if tls.cipher_suites:
        ctx.set_ciphers(":".join(tls.cipher_suites))
    if not tls.prefer_server_cipher_suites:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.curve:
        ctx.set_ecdh_curve(tls.curve)
    try:  # a scratch store tells a bad certificate apart from a bad or mismatched key
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert)
    except (ssl.SSLError, ValueError) as e:
        name = "cert_file" if tls.cert_file else "cert"
        raise WebConfigError(f"{src}: {pre}{name}: no valid PEM certificate: {e}") from e
    try:
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file, password="")
        else:  # ssl loads chains from files only; the private dir is removed at once
            with tempfile.TemporaryDirectory(prefix="aegis-tls-") as tmp:
                Path(tmp, "c.pem").write_text(cert)
                Path(tmp, "k.pem").write_text(key)
                ctx.load_cert_chain(Path(tmp, "c.pem"), Path(tmp, "k.pem"), password="")
    except ssl.SSLError as e:
        name = "key_file" if tls.key_file else "key"
        raise WebConfigError(f"{src}: {pre}{name}: bad key or not the certificate's: {e}") from e
    if tls.client_auth_type != "NoClientCert":
        ca = _pem(tls, "client_ca", tls.client_ca_file, tls.client_ca)
        try:
            ctx.load_verify_locations(cadata=ca)
        except (ssl.SSLError, ValueError) as e:
            name = "client_ca_file" if tls.client_ca_file else "client_ca"
            raise WebConfigError(f"{src}: {pre}{name}: no valid PEM certificate: {e}") from e
        ctx.verify_mode = _AUTH_MODES[tls.client_auth_type]
    return ctx


class _Rotator:
    """SNI callback: swap in a context built from the files when their stat() changed."""

    def __init__(self, tls: TLSConfig, ctx: ssl.SSLContext) -> None:
        self._tls, self._ctx = tls, ctx
        self._stamp = self._stat()

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for p in (self._tls.cert_file, self._tls.key_file, self._tls.client_ca_file):
            try:
                st = p.stat() if p else None
                out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else None)
            except OSError:
                out.append(None)
        return tuple(out)

    def __call__(self, conn: ssl.SSLObject, _server_name: str | None, _: ssl.SSLContext) -> None:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp  # a half-written rotation is retried once the files change again
            try:
                self._ctx = _build_context(self._tls)
            except WebConfigError as e:
                log.error("keeping the previous certificate: %s", e)
        if conn.context is not self._ctx:
            conn.context = self._ctx
