"""Names are untrusted input: only a single, conservative path component ever reaches a socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from aegis.targets import BadName, NoSuchTarget, Target, Targets, check_name
from conftest import AegisFactory, Upstreams, raw_http


def make_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


@pytest.mark.parametrize("name", ["node", "node-exporter", "pg_1", "a.b", "A9", "x" * 100])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "-", "-x", "a/b", "a\x00b", "a b", "a%2Fb", "é", "x" * 101],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(BadName):
        check_name(name)


def test_resolve_finds_sockets_and_only_sockets(sockdir: Path) -> None:
    held = make_socket(sockdir / "svc.sock")
    (sockdir / "file.sock").write_text("not a socket")
    (sockdir / "dir.sock").mkdir()
    targets = Targets(sockdir, {})
    endpoint = targets.resolve("svc")
    assert endpoint.socket == str(sockdir / "svc.sock")
    assert endpoint.path == "/metrics"
    st = os.stat(sockdir / "svc.sock")
    assert endpoint.identity == (st.st_dev, st.st_ino)
    for name in ("file", "dir", "absent"):
        with pytest.raises(NoSuchTarget):
            targets.resolve(name)
    held.close()


def test_replaced_socket_gets_a_new_identity(sockdir: Path) -> None:
    first = make_socket(sockdir / "svc.sock")
    targets = Targets(sockdir, {})
    before = targets.resolve("svc").identity
    first.close()
    (sockdir / "svc.sock").unlink()
    # Hold the old inode open elsewhere so the number can't simply be recycled.
    keep = (sockdir / "other").open("w")
    second = make_socket(sockdir / "svc.sock")
    assert targets.resolve("svc").identity != before
    second.close()
    keep.close()


def test_symlink_in_sockdir_may_point_at_a_socket_elsewhere(tmp_path: Path, sockdir: Path) -> None:
    elsewhere = tmp_path / "service-runtime"
    elsewhere.mkdir()
    held = make_socket(elsewhere / "metrics.sock")
    (sockdir / "svc.sock").symlink_to(elsewhere / "metrics.sock")
    assert Targets(sockdir, {}).resolve("svc").socket == str(sockdir / "svc.sock")
    assert Targets(sockdir, {}).names() == ["svc"]
    held.close()


def test_missing_sockdir_is_empty_not_fatal(tmp_path: Path) -> None:
    targets = Targets(tmp_path / "not-yet", {})
    assert targets.names() == []
    with pytest.raises(NoSuchTarget):
        targets.resolve("svc")
    (tmp_path / "not-yet").mkdir()
    held = make_socket(tmp_path / "not-yet" / "svc.sock")
    assert targets.resolve("svc").name == "svc"
    held.close()


def test_names_lists_valid_socket_names_and_explicit_targets(tmp_path: Path, sockdir: Path) -> None:
    held = [make_socket(sockdir / f"{name}.sock") for name in ("b", ".hidden", "a")]
    (sockdir / "plain.sock").write_text("")
    (sockdir / "nosuffix").write_text("")
    explicit = {"zz": Target("zz", tmp_path / "elsewhere.sock", "/stats")}
    targets = Targets(sockdir, explicit)
    assert targets.names() == ["a", "b", "zz"]
    endpoint_error = pytest.raises(NoSuchTarget)
    with endpoint_error:
        targets.resolve("zz")  # listed, but its socket is not there yet
    for sock in held:
        sock.close()


def test_explicit_target_takes_its_own_path(tmp_path: Path, sockdir: Path) -> None:
    held = make_socket(tmp_path / "elsewhere.sock")
    targets = Targets(sockdir, {"zz": Target("zz", tmp_path / "elsewhere.sock", "/stats")})
    endpoint = targets.resolve("zz")
    assert (endpoint.socket, endpoint.path) == (str(tmp_path / "elsewhere.sock"), "/stats")
    held.close()


@pytest.mark.parametrize("path", ["metrics", "/a b", "/x\n", ""])
def test_explicit_target_rejects_bad_paths(tmp_path: Path, path: str) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        Target("x", tmp_path / "x.sock", path)


@pytest.mark.parametrize(
    ("raw_path", "status"),
    [
        (b"/..%2Foutside", 400),
        (b"/%2e%2e%2Foutside", 400),
        (b"/..", 400),
        (b"/.hidden", 400),
        (b"/%2Ehidden", 400),
        (b"/svc%00", 400),
        (b"/svc%2F..%2F..%2Foutside", 400),
        (b"/svc/../outside", 404),
        (b"/" + b"x" * 101, 400),
        (b"/-", 400),
        (b"/outside", 404),
    ],
)
async def test_hostile_names_never_leave_sockdir(
    aegis: AegisFactory, upstreams: Upstreams, tmp_path: Path, raw_path: bytes, status: int
) -> None:
    """The request line is sent byte for byte, so no client normalises the attack away."""
    outside = await upstreams.metrics(tmp_path / "outside.sock", "secret 1\n")
    hidden = await upstreams.metrics(tmp_path / "run" / ".hidden.sock", "hidden 1\n")
    client = await aegis()
    assert client.port is not None
    request = b"GET " + raw_path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await raw_http(client.port, request)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == str(status).encode()
    assert outside == []
    assert hidden == []
