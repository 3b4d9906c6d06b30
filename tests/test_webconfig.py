"""webconfig: real files, real certificates, a real aiohttp server and real clients."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from aegisrun import Children, free_port, needs_aegis
from webserve import get, serve, write

from aegis.webconfig import (
    WebConfigError,
    load_web_config,
    server_ssl_context,
)
from conftest import Upstreams


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(tmp_path: Path, ca: trustme.CA) -> Path:
    """server.crt/server.key for 127.0.0.1 and a client CA with one client, all in tmp_path."""
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp_path / "client_ca.crt"))
    client_ca.issue_cert("scraper.example").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client.pem")
    )
    trustme.CA().issue_cert("scraper.example").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "stranger.pem")
    )
    return tmp_path


def client_ctx(ca: trustme.CA, cert: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if cert is not None:
        ctx.load_cert_chain(cert)
    return ctx


TLS = 'tls_server_config:\n  cert_file: server.crt\n  key_file: "server.key"\n'


async def test_tls_serves_with_relative_paths_and_enforces_min_version(
    certs: Path, ca: trustme.CA
) -> None:
    config = load_web_config(write(certs, TLS + "  min_version: TLS13\n"))
    assert config.tls is not None
    assert config.tls.cert_file == certs / "server.crt"
    async with serve(config) as url:
        status, _, body = await get(url, client_ctx(ca))
        assert status == 200
        assert body["name"] == "node"
        old = client_ctx(ca)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(aiohttp.ClientConnectorError):
            await get(url, old)


async def test_require_and_verify_client_cert(certs: Path, ca: trustme.CA) -> None:
    text = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: client_ca.crt\n"
    async with serve(load_web_config(write(certs, text))) as url:
        assert (await get(url, client_ctx(ca, certs / "client.pem")))[0] == 200
        for ctx in (client_ctx(ca), client_ctx(ca, certs / "stranger.pem")):
            with pytest.raises(aiohttp.ClientError):
                await get(url, ctx)


async def test_verify_client_cert_if_given(certs: Path, ca: trustme.CA) -> None:
    text = TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca: |\n"
    text += "".join(f"    {line}\n" for line in (certs / "client_ca.crt").read_text().splitlines())
    async with serve(load_web_config(write(certs, text))) as url:
        assert (await get(url, client_ctx(ca)))[0] == 200
        assert (await get(url, client_ctx(ca, certs / "client.pem")))[0] == 200
        with pytest.raises(aiohttp.ClientError):
            await get(url, client_ctx(ca, certs / "stranger.pem"))


async def test_client_allowed_sans(certs: Path, ca: trustme.CA) -> None:
    text = TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: client_ca.crt\n"
    good = load_web_config(write(certs, text + "  client_allowed_sans: [scraper.example]\n"))
    async with serve(good) as url:
        assert (await get(url, client_ctx(ca, certs / "client.pem")))[0] == 200
        assert (await get(url, client_ctx(ca)))[0] == 403  # no certificate, no SAN
    bad = load_web_config(write(certs, text + "  client_allowed_sans: [other.example]\n"))
    async with serve(bad) as url:
        assert (await get(url, client_ctx(ca, certs / "client.pem")))[0] == 403


async def test_rotated_certificate_is_served_without_restart(certs: Path, ca: trustme.CA) -> None:
    async def served_cert(url: str) -> bytes:
        host, port = url.removeprefix("https://").split(":")
        _, writer = await asyncio.open_connection(host, int(port), ssl=client_ctx(ca))
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        return bytes(der)

    async with serve(load_web_config(write(certs, TLS))) as url:
        first = await served_cert(url)
        assert first == ssl.PEM_cert_to_DER_cert((certs / "server.crt").read_text())
        fresh = ca.issue_cert("127.0.0.1")
        fresh.private_key_pem.write_to_path(str(certs / "server.key"))
        fresh.cert_chain_pems[0].write_to_path(str(certs / "server.crt"))
        st = (certs / "server.crt").stat()  # coarse mtime clocks must still see a change
        os.utime(certs / "server.crt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        second = await served_cert(url)
        assert second != first
        assert second == ssl.PEM_cert_to_DER_cert(fresh.cert_chain_pems[0].bytes().decode())
        (certs / "server.key").write_text("garbage")  # a broken rotation keeps the old pair
        os.utime(certs / "server.key", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
        assert await served_cert(url) == second


async def test_rotated_client_ca_replaces_the_old_one(certs: Path, ca: trustme.CA) -> None:
    text = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: client_ca.crt\n"
    async with serve(load_web_config(write(certs, text))) as url:
        assert (await get(url, client_ctx(ca, certs / "client.pem")))[0] == 200
        new_ca = trustme.CA()
        new_ca.cert_pem.write_to_path(str(certs / "client_ca.crt"))
        new_client = new_ca.issue_cert("scraper.example").private_key_and_cert_chain_pem
        new_client.write_to_path(str(certs / "new.pem"))
        st = (certs / "client_ca.crt").stat()
        os.utime(certs / "client_ca.crt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert (await get(url, client_ctx(ca, certs / "new.pem")))[0] == 200
        with pytest.raises(aiohttp.ClientError):
            await get(url, client_ctx(ca, certs / "client.pem"))


def test_http2_true_is_accepted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_web_config(write(tmp_path, "http_server_config:\n  http2: true\n"))
    assert "http2: ignored" in caplog.text
    assert load_web_config(write(tmp_path, "http_server_config:\n  http2: false\n")).tls is None


ERRORS: list[tuple[str, str]] = [
    ("", "file is empty"),
    ("tls_server_config: [\n", "not valid YAML"),
    ("tls_server_config:\n  cert_filse: server.crt\n", "tls_server_config.cert_filse: unknown key"),
    ("junk: 1\n", "junk: unknown key"),
    ("basic_auth_users:\n  a: '$2y$10$x'\n", "basic_auth_users.a: not a bcrypt hash"),
    ("basic_auth_users:\n  a: x\n  a: y\n", "duplicate key 'a'"),
    ("http_server_config:\n  headers:\n    Server: x\n", "headers.Server: header can not"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "X-Frame-Options: 'allow'"),
    ("http_server_config:\n  http2: maybe\n", "http_server_config.http2: must be"),
    ("rate_limit:\n  interval: 1s\n  burst: 0\n", "rate_limit.burst"),
    ("rate_limit:\n  interval: soon\n", "rate_limit.interval"),
    ("tls_server_config:\n  min_version: TLS13\n", "tls_server_config.cert_file: missing"),
    (TLS.replace("server.crt", "nope.crt"), "tls_server_config.cert_file: [Errno 2]"),
    (TLS.replace("server.key", "empty.key"), "tls_server_config.key_file: "),
    (TLS.replace("server.key", "client_ca.crt"), "tls_server_config.key_file: bad key"),
    (TLS.replace("server.crt", "server.key"), "tls_server_config.cert_file: no valid PEM"),
    (TLS.replace("server.key", "other.key"), "tls_server_config.key_file: bad key"),
    (TLS + "  client_auth_type: RequireAnyClientCert\n", "RequireAnyClientCert is not supported"),
    (TLS + "  client_auth_type: RequestClientCert\n", "RequestClientCert is not supported"),
    (TLS + "  client_auth_type: Sometimes\n", "client_auth_type: unknown value 'Sometimes'"),
    (TLS + "  client_ca_file: client_ca.crt\n", "client_auth_type: client CA given"),
    (TLS + "  client_auth_type: VerifyClientCertIfGiven\n", "client_ca_file: required by"),
    (TLS + "  min_version: TLS14\n", "min_version: unknown TLS version 'TLS14'"),
    (TLS + "  min_version: TLS10\n", "min_version: unknown TLS version 'TLS10' (no longer"),
    (TLS + "  max_version: TLS12\n  min_version: TLS13\n", "min_version: above max_version"),
    (TLS + "  cipher_suites: [TLS_INVENTED]\n", "cipher_suites: unknown cipher"),
    (TLS + "  curve_preferences: [X25519, CurveP256]\n", "curve_preferences: give one of"),
    (TLS + "  client_allowed_sans: [a]\n", "client_allowed_sans: needs a verifying"),
    (TLS + "  cert: inline\n", "tls_server_config.cert: give cert or cert_file"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_errors_name_file_and_key(certs: Path, text: str, message: str) -> None:
    (certs / "empty.key").write_text("")
    trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(certs / "other.key"))
    path = write(certs, text)
    with pytest.raises(WebConfigError) as err:
        load_web_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match=r"web\.yml: cannot read"):
        load_web_config(tmp_path / "web.yml")


def test_inline_cert_and_key_and_toolkit_options(certs: Path, ca: trustme.CA) -> None:
    def block(name: str) -> str:
        lines = (certs / name).read_text().splitlines()
        return "|\n" + "".join(f"    {line}\n" for line in lines)

    text = (
        f"tls_server_config:\n  cert: {block('server.crt')}  key: {block('server.key')}"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
        "  curve_preferences: [CurveP256]\n  prefer_server_cipher_suites: false\n"
    )
    config = load_web_config(write(certs, text))
    assert config.tls is not None
    assert config.tls.cert_file is None
    assert config.tls.cipher_suites == ("ECDHE-ECDSA-AES128-GCM-SHA256",)
    ctx = server_ssl_context(config.tls)
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert "TLS_AES_128_GCM_SHA256" in {c["name"] for c in ctx.get_ciphers()}
    assert "ECDHE-RSA-AES128-GCM-SHA256" not in {c["name"] for c in ctx.get_ciphers()}


@needs_aegis
async def test_a_bad_file_stops_the_command_at_start_naming_file_and_key(
    tmp_path: Path, sockdir: Path
) -> None:
    children = Children(tmp_path)
    path = write(tmp_path, "tls_server_config:\n  cert_filse: server.crt\n")
    try:
        child = children.start("-sockdir", str(sockdir), "--web.config.file", str(path))
        assert await child.wait() == 2
        assert f"{path}: tls_server_config.cert_filse: unknown key" in child.output()
    finally:
        await children.close()


@needs_aegis
async def test_the_command_serves_tls_on_tcp_and_unix_listeners(
    certs: Path, ca: trustme.CA, sockdir: Path, upstreams: Upstreams
) -> None:
    await upstreams.metrics(sockdir / "node.sock", "up 1\n")
    children = Children(certs)
    port, unix = free_port(), certs / "aegis.sock"
    try:
        child = children.start(
            *("-hostport", f"127.0.0.1:{port}", "--web.listen-address", f"unix:{unix}"),
            *("-sockdir", str(sockdir), "--web.config.file", str(write(certs, TLS))),
        )
        await child.ready("127.0.0.1", port)
        await child.ready(None, unix)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{port}/node", ssl=client_ctx(ca)) as resp,
        ):
            assert (resp.status, await resp.text()) == (200, "up 1\n")
        # aiohttp's UnixConnector speaks no TLS: a plain stream does the request by hand.
        reader, writer = await asyncio.open_unix_connection(
            str(unix), ssl=client_ctx(ca), server_hostname="127.0.0.1"
        )
        writer.write(b"GET /node HTTP/1.1\r\nHost: aegis\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nup 1\n")
        plain = await asyncio.open_connection("127.0.0.1", port)
        plain[1].write(b"GET /node HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" not in await plain[0].read(100)  # no plain-HTTP way in
        plain[1].close()
    finally:
        await children.close()


@needs_aegis
async def test_failed_tls_handshakes_are_logged_once_a_minute_with_the_reason(
    certs: Path, ca: trustme.CA, sockdir: Path
) -> None:
    text = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: client_ca.crt\n"
    children = Children(certs)
    port = free_port()
    try:
        child = children.start(
            *("-hostport", f"127.0.0.1:{port}", "-sockdir", str(sockdir)),
            *("--web.config.file", str(write(certs, text)), "--log.level", "debug"),
        )
        await child.ready("127.0.0.1", port)
        url = f"https://127.0.0.1:{port}"
        for ctx in (client_ctx(ca), client_ctx(ca, certs / "stranger.pem")):
            with pytest.raises(aiohttp.ClientError):
                await get(url, ctx)
        # Not TLS at all past the record type: a scanner, or a client speaking something else.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01\x00\x05hello")
        assert await reader.read() == b""
        writer.close()
        await child.wait_for_output("unexpected message")
        assert (await get(url, client_ctx(ca, certs / "client.pem")))[0] == 404
    finally:
        await children.close()
    failures = [line for line in child.output().splitlines() if "TLS handshake failed" in line]
    # aiohttp tries a GET a second time when the connection breaks: one or two lines each.
    assert " level=warn source=webconfig.py:" in failures[0], child.output()
    assert failures[0].endswith(
        'msg="TLS handshake failed" err="peer did not return a certificate"'
    )
    # The minute is not over: the others are at debug level only.
    assert all(" level=debug " in line for line in failures[1:]), child.output()
    assert any('err="certificate verify failed: ' in line for line in failures), child.output()
    assert failures[-1].endswith('err="unexpected message"')
