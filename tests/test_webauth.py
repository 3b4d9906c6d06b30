"""webauth: basic auth, rate limit and headers in front of a real aiohttp server, real clients."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from webserve import get, serve, write

from aegis.cli.logformat import LogfmtFormatter
from aegis.proxy import Config, make_app
from aegis.webauth import CHECKS_PER_CLIENT, FAILURES_BURST, setup_web_config
from aegis.webconfig import load_web_config
from conftest import Upstreams


def users_yaml(tmp_path: Path) -> Path:
    alice = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode()
    bob = "$2y$" + bcrypt.hashpw(b"builder", bcrypt.gensalt(4)).decode()[4:]  # htpasswd -B
    return write(
        tmp_path,
        f"basic_auth_users:\n  alice: '{alice}'\n  bob: '{bob}'\n"
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
        "    Content-Security-Policy: \"default-src 'self'\"\n",
    )


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_basic_auth_strips_authorization_and_adds_headers(tmp_path: Path) -> None:
    async with serve(load_web_config(users_yaml(tmp_path))) as url:
        for user, password in (("alice", "wonderland"), ("bob", "builder"), ("bob", "builder")):
            status, headers, body = await get(url, headers=basic(user, password))
            assert status == 200
            # Handlers get the request as it came, as with the toolkit; the proxy is the one that
            # never forwards Aegis' credentials (test_a_real_upstream_behind_the_proxy_...).
            assert body["name"] == "node"
            assert headers["X-Frame-Options"] == "deny"
            assert headers["Content-Security-Policy"] == "default-src 'self'"


@pytest.mark.parametrize(
    "headers",
    [
        basic("alice", "wrong"),
        basic("mallory", "wonderland"),
        basic("alice", "x" * 100),
        {"Authorization": "Basic !!!"},
        {"Authorization": "Bearer abc"},
        {},
    ],
    ids=["wrong password", "unknown user", "overlong", "bad base64", "not basic", "missing"],
)
async def test_basic_auth_failures_are_401_with_challenge_and_headers(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    async with serve(load_web_config(users_yaml(tmp_path))) as url:
        status, resp_headers, _ = await get(url, headers=headers)
        assert status == 401
        assert resp_headers["WWW-Authenticate"] == "Basic"
        assert resp_headers["X-Frame-Options"] == "deny"


async def test_refused_credentials_are_logged_rate_limited_without_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "aegis.webauth")
    async with serve(load_web_config(users_yaml(tmp_path))) as url:
        assert (await get(url, headers=basic("alice", "s3cret-guess")))[0] == 401
        assert (await get(url, headers=basic("mallory", "s3cret-guess")))[0] == 401
        assert (await get(url))[0] == 401
        assert (await get(url, headers=basic("alice", "wonderland")))[0] == 200
    records = [record for record in caplog.records if record.name == "aegis.webauth"]
    lines = [LogfmtFormatter().format(record) for record in records]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "refused credentials"),
        (logging.DEBUG, "refused credentials"),  # within the minute: shown at debug level only
        (logging.DEBUG, "refused credentials"),
    ]
    assert lines[0].endswith(
        ' msg="refused credentials" user=alice reason="wrong password" remote=127.0.0.1'
    )
    assert ' user=mallory reason="unknown user" ' in lines[1]
    assert ' user="" reason="no credentials" ' in lines[2]
    assert not any("s3cret" in line for line in lines)


async def test_bcrypt_runs_once_per_good_password_and_for_unknown_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    costs: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        costs.append(hashed[:7])
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    async with serve(load_web_config(users_yaml(tmp_path))) as url:
        for _ in range(3):
            assert (await get(url, headers=basic("alice", "wonderland")))[0] == 200
        assert len(costs) == 1  # later scrapes hit the cache
        for _ in range(2):
            assert (await get(url, headers=basic("alice", "nope")))[0] == 401
        assert len(costs) == 3  # failures are never cached
        assert (await get(url, headers=basic("mallory", "x")))[0] == 401
        assert costs[-1] == b"$2b$04$"  # unknown users pay the configured cost


async def test_unknown_route_is_protected_too(tmp_path: Path) -> None:
    async with (
        serve(load_web_config(users_yaml(tmp_path))) as url,
        aiohttp.ClientSession() as session,
        session.get(url + "/-/healthy") as resp,
    ):
        assert resp.status == 401


async def test_rate_limit(tmp_path: Path) -> None:
    config = load_web_config(write(tmp_path, "rate_limit:\n  interval: 1m\n  burst: 2\n"))
    assert config.rate_limit is not None
    assert config.rate_limit.interval == 60.0
    async with serve(config) as url:
        assert [(await get(url))[0] for _ in range(3)] == [200, 200, 429]


async def test_a_real_upstream_behind_the_proxy_never_sees_the_credentials(
    tmp_path: Path, sockdir: Path, upstreams: Upstreams
) -> None:
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="up 1\n")

    await upstreams.http(sockdir / "node.sock", record)
    app = make_app(Config(sockdir=sockdir))
    setup_web_config(app, load_web_config(users_yaml(tmp_path)))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        headers = {**basic("alice", "wonderland"), "Accept": "text/plain", "X-Probe": "kept"}
        response = await client.get("/node", headers=headers)
        assert (response.status, await response.text()) == (200, "up 1\n")
        assert response.headers["X-Frame-Options"] == "deny"
        assert (await client.get("/node")).status == 401  # and no upstream request for it
    assert len(seen) == 1
    assert "Authorization" not in seen[0]
    assert seen[0]["X-Probe"] == "kept"
    assert seen[0]["Accept"] == "text/plain"


def cost10(tmp_path: Path, *users: tuple[str, str]) -> Path:
    """Users with bcrypt hashes of the cost htpasswd and the README use: tens of ms a check."""
    lines = "".join(
        f"  {user}: '{bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()}'\n"
        for user, password in users
    )
    return write(tmp_path, f"basic_auth_users:\n{lines}")


async def statuses(url: str, passwords: list[str], source: str) -> list[int]:
    """A request for each password at once, from the address ``source`` (any 127/8 address is
    local)."""
    connector = aiohttp.TCPConnector(limit=0, local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(password: str) -> int:
            headers = basic("prometheus", password)
            async with session.get(url + "/node/metrics", headers=headers) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*map(one, passwords))


async def test_300_wrong_passwords_from_a_client_cost_at_most_a_few_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 wrong passwords at once used to be 300 bcrypt checks, one at a time on the event
    loop, and the next correct login waited behind all of them (9.5 s)."""
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    config = load_web_config(cost10(tmp_path, ("prometheus", "right")))
    async with serve(config) as url:
        guesses = [f"guess{index}" for index in range(300)]
        attack = asyncio.create_task(statuses(url, guesses, "127.0.0.2"))
        await asyncio.sleep(0.05)
        assert (await get(url, headers=basic("prometheus", "right")))[0] == 200
        answered = await attack
    # At most CHECKS_PER_CLIENT at once, and FAILURES_BURST in a row: the rest 429, unchecked.
    assert answered.count(401) <= CHECKS_PER_CLIENT + FAILURES_BURST, answered.count(401)
    assert answered.count(401) + answered.count(429) == 300
    assert len(checks) == answered.count(401) + 1
    assert checks.count(b"right") == 1


async def test_a_client_that_logged_in_before_goes_ahead_of_queued_wrong_passwords(
    tmp_path: Path,
) -> None:
    """Many clients' wrong passwords fill the queue; a login from the address of a scraper
    that logged in before (a second job's credentials, not cached yet) is answered while they
    still wait."""
    config = load_web_config(cost10(tmp_path, ("prometheus", "right"), ("other", "job")))
    async with serve(config) as url:
        assert (await get(url, headers=basic("prometheus", "right")))[0] == 200
        attackers = [
            asyncio.create_task(
                statuses(url, [f"guess{index}-{n}" for n in range(3)], f"127.0.1.{index}")
            )
            for index in range(1, 41)
        ]
        await asyncio.sleep(0.3)  # all of them arrived; the queue is full
        assert (await get(url, headers=basic("other", "job")))[0] == 200
        pending = sum(not attacker.done() for attacker in attackers)
        answered = [status for result in await asyncio.gather(*attackers) for status in result]
    assert pending > 0, "the correct login waited for every wrong one"
    assert set(answered) <= {401, 429}
    assert answered.count(429) > 0  # beyond the queue's bound: refused at once, never checked


async def test_an_anonymous_flood_takes_no_rate_limit_tokens_from_the_scraper(
    tmp_path: Path,
) -> None:
    """The README's rate_limit (10 at once, then one per 100 ms) with basic auth: a client
    without credentials at about 100 requests a second made 19 of 20 scrapes answer 429."""
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()
    config = load_web_config(
        write(
            tmp_path,
            f"basic_auth_users:\n  prometheus: '{hashed}'\n"
            "rate_limit:\n  interval: 100ms\n  burst: 10\n",
        )
    )
    async with serve(config) as url:
        stop = asyncio.Event()

        async def flood() -> list[int]:
            seen = []
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    async with session.get(url + "/node/metrics") as response:
                        seen.append(response.status)
                    await asyncio.sleep(0.01)
            return seen

        anonymous = asyncio.create_task(flood())
        scrapes = []
        for _ in range(20):
            scrapes.append((await get(url, headers=basic("prometheus", "right")))[0])
            await asyncio.sleep(0.15)
        stop.set()
        flooded = await anonymous
    assert scrapes == [200] * 20
    assert len(flooded) > 100
    assert set(flooded) == {401}
