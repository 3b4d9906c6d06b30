"""Names are untrusted input: only a single, conservative path component ever reaches a socket."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from aegis import targets as targets_module
from aegis.targets import (
    BadName,
    DirectoryUnavailable,
    NoSuchTarget,
    Target,
    Targets,
    check_name,
)
from aegis.upstream import UpstreamPool
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
    assert list(Targets(sockdir, {}).names()) == ["svc"]
    held.close()


def test_missing_sockdir_is_unavailable_not_empty_until_it_appears(tmp_path: Path) -> None:
    targets = Targets(tmp_path / "not-yet", {})
    with pytest.raises(DirectoryUnavailable, match="not-yet: does not exist"):
        targets.names()
    assert targets.count() is None
    with pytest.raises(DirectoryUnavailable, match="does not exist"):
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
    assert list(targets.names()) == ["a", "b", "zz"]
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
    aegis: AegisFactory, upstreams: Upstreams, sockdir: Path, raw_path: bytes, status: int
) -> None:
    """The request line is sent byte for byte, so no client normalises the attack away."""
    outside = await upstreams.metrics(sockdir.parent / "outside.sock", "secret 1\n")
    hidden = await upstreams.metrics(sockdir / ".hidden.sock", "hidden 1\n")
    client = await aegis()
    assert client.port is not None
    request = b"GET " + raw_path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await raw_http(client.port, request)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == str(status).encode()
    assert outside == []
    assert hidden == []


def bind_anywhere(path: Path) -> socket.socket:
    """A Unix socket at a path of any length: bound by its name, from inside its directory (a
    test may change the working directory; Aegis never does)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
    return sock


def test_a_long_socket_path_is_reached_through_a_descriptor_of_that_very_file(
    sockdir: Path,
) -> None:
    name = "n" * 90
    held = bind_anywhere(sockdir / f"{name}.sock")
    targets = Targets(sockdir, {})
    endpoint = targets.resolve(name)
    assert endpoint.socket == str(sockdir / f"{name}.sock")
    assert len(endpoint.address) <= 107
    assert os.stat(endpoint.address).st_ino == endpoint.identity[1]
    # The same descriptor while the file stays: pooled connections keep matching.
    assert targets.resolve(name).address == endpoint.address
    held.close()
    (sockdir / f"{name}.sock").unlink()
    replacement = bind_anywhere(sockdir / f"{name}.sock")
    again = targets.resolve(name)
    assert again.identity != endpoint.identity
    assert os.stat(again.address).st_ino == again.identity[1]
    replacement.close()


def test_descriptors_of_long_paths_are_bounded_and_closed_once_unused(tmp_path: Path) -> None:
    sockdir = tmp_path / ("d" * 80)
    sockdir.mkdir()
    count = targets_module._MAX_PINNED + 36
    held = [bind_anywhere(sockdir / f"svc{i:03d}.{'x' * 40}.sock") for i in range(count)]
    targets = Targets(sockdir, {})
    before = len(os.listdir("/proc/self/fd"))
    for i in range(count):
        targets.resolve(f"svc{i:03d}.{'x' * 40}")
    assert len(os.listdir("/proc/self/fd")) - before <= targets_module._MAX_PINNED
    kept = targets.resolve(f"svc000.{'x' * 40}")
    del targets
    assert os.stat(kept.address).st_ino == kept.identity[1]  # still held by the endpoint
    address = kept.address
    del kept
    assert not os.path.exists(address)
    for sock in held:
        sock.close()


async def test_an_entry_replaced_by_a_link_after_its_check_is_not_what_is_reached(
    sockdir: Path, upstreams: Upstreams
) -> None:
    """A member of the directory's group renames a link over an entry (a socket of its own)
    between Aegis's check of it and the connect: the connect must reach the file that was
    checked, never where the link leads (a socket only Aegis may open)."""
    private = sockdir.parent / "private"
    private.mkdir()
    await upstreams.metrics(private / "secret.sock", "secret 1\n")
    await upstreams.metrics(sockdir / ".own", "own 1\n")  # a hidden name: no target itself
    os.link(sockdir / ".own", sockdir / "evil.sock")
    endpoint = Targets(sockdir, {}).resolve("evil")
    (sockdir / ".swap").symlink_to(private / "secret.sock")
    os.rename(sockdir / ".swap", sockdir / "evil.sock")  # atomic, as a racing member does it
    pool = UpstreamPool()
    head = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
    conn = await pool.send(endpoint.address, endpoint.identity, head, head_only=False)
    page = b""
    while piece := await conn.read():
        page += piece
    conn.close()
    assert page == b"own 1\n"


def test_a_name_too_long_for_a_deep_directory_is_unknown_not_an_error(tmp_path: Path) -> None:
    # Past PATH_MAX (4096 bytes with the NUL) no path names a file at all; a deep directory still
    # serves the names that fit, through a descriptor.
    sockdir = tmp_path
    while len(str(sockdir)) < 4000 - 201:
        sockdir = sockdir / ("p" * 200)
    sockdir = sockdir / ("q" * (4000 - len(str(sockdir)) - 1))
    sockdir.mkdir(parents=True)
    assert len(str(sockdir)) == 4000
    held = bind_anywhere(sockdir / "short.sock")
    targets = Targets(sockdir, {})
    endpoint = targets.resolve("short")
    assert os.stat(endpoint.address).st_ino == endpoint.identity[1]
    assert list(targets.names()) == ["short"]
    with pytest.raises(NoSuchTarget, match="file name too long"):
        targets.resolve("x" * 100)
    held.close()


def test_an_explicit_socket_path_longer_than_the_system_allows_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than the system allows"):
        Target("x", Path("/" + "a/" * 2100 + "x.sock"))


def test_odd_entries_are_neither_listed_nor_resolved(tmp_path: Path, sockdir: Path) -> None:
    held = make_socket(sockdir / "ok.sock")
    (sockdir / "loop.sock").symlink_to("loop.sock")
    (sockdir / "ping.sock").symlink_to("pong.sock")
    (sockdir / "pong.sock").symlink_to("ping.sock")
    (sockdir / "dangling.sock").symlink_to(tmp_path / "nowhere.sock")
    (tmp_path / "a-directory").mkdir()
    (sockdir / "dirlink.sock").symlink_to(tmp_path / "a-directory")
    os.mkfifo(sockdir / "fifo.sock")
    odd = make_socket(Path(os.fsdecode(bytes(sockdir) + b"/odd\xff\x01.sock")))
    targets = Targets(sockdir, {})
    assert list(targets.names()) == ["ok"]
    for name, why in [
        ("loop", "symlink loop"),
        ("ping", "symlink loop"),
        ("dangling", "no such socket"),
        ("dirlink", "not a socket"),
        ("fifo", "not a socket"),
    ]:
        with pytest.raises(NoSuchTarget, match=why):
            targets.resolve(name)
    assert targets.count() == 1
    held.close()
    odd.close()


@pytest.mark.parametrize("kind", ["missing", "file", "loop", "dangling"])
def test_a_broken_directory_is_unavailable_with_its_reason(tmp_path: Path, kind: str) -> None:
    sockdir = tmp_path / "run"
    reason = {
        "missing": "does not exist",
        "file": "is not a directory",
        "loop": "symlink loop",
        "dangling": "does not exist",
    }[kind]
    if kind == "file":
        sockdir.write_text("")
    elif kind == "loop":
        sockdir.symlink_to(sockdir)
    elif kind == "dangling":
        sockdir.symlink_to(tmp_path / "gone")
    explicit_socket = make_socket(tmp_path / "explicit.sock")
    targets = Targets(sockdir, {"explicit": Target("explicit", tmp_path / "explicit.sock")})
    assert targets.directory_problem() == f"{sockdir}: {reason}"
    with pytest.raises(DirectoryUnavailable, match=reason):
        targets.names()
    with pytest.raises(DirectoryUnavailable, match=reason):
        targets.resolve("svc")
    assert targets.count() is None
    assert targets.resolve("explicit").name == "explicit"
    explicit_socket.close()


def test_a_replaced_directory_is_looked_at_anew(tmp_path: Path, sockdir: Path) -> None:
    first = make_socket(sockdir / "svc.sock")
    targets = Targets(sockdir, {})
    before = targets.resolve("svc").identity
    sockdir.rename(tmp_path / "old")
    sockdir.mkdir()
    second = make_socket(sockdir / "svc.sock")
    assert targets.resolve("svc").identity != before
    assert list(targets.names()) == ["svc"]
    first.close()
    second.close()


class _Later:
    """``time`` for aegis.targets, a minute ahead: every listing counts as settled and is kept."""

    @staticmethod
    def time_ns() -> int:
        return time.time_ns() + 60 * 10**9


def tick() -> None:
    """Let the file system's clock tick, so the next change moves the directory's time stamps
    (a change in the same tick as a listing is what the settling time is for)."""
    time.sleep(0.03)


def test_a_kept_listing_still_sees_every_change(
    tmp_path: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing is reused while the directory's time stamps stand, as on a quiet server:
    additions, removals, renames and what links point at still show at once."""
    monkeypatch.setattr(targets_module, "time", _Later)
    held = [make_socket(sockdir / "a.sock")]
    (sockdir / "link.sock").symlink_to(tmp_path / "elsewhere.sock")
    targets = Targets(sockdir, {})
    assert list(targets.names()) == ["a"]
    assert list(targets.names()) == ["a"]
    held.append(make_socket(tmp_path / "elsewhere.sock"))  # the link's target appears
    assert list(targets.names()) == ["a", "link"]
    tick()
    held.append(make_socket(sockdir / "b.sock"))
    assert list(targets.names()) == ["a", "b", "link"]
    tick()
    (sockdir / "a.sock").unlink()
    assert list(targets.names()) == ["b", "link"]
    tick()
    (sockdir / "b.sock").rename(sockdir / "c.sock")
    assert list(targets.names()) == ["c", "link"]
    for sock in held:
        sock.close()


def test_a_kept_listing_is_dropped_when_the_directory_is_replaced(
    tmp_path: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(targets_module, "time", _Later)
    held = make_socket(sockdir / "a.sock")
    targets = Targets(sockdir, {})
    assert list(targets.names()) == ["a"]
    tick()
    sockdir.rename(tmp_path / "old")
    sockdir.mkdir()
    assert list(targets.names()) == []
    held.close()


def test_the_catalog_stays_the_same_object_while_what_it_lists_does(
    tmp_path: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is built from the catalog (/-/sd, the landing page's rows) is kept while ``is``
    holds: a change in the directory that changes no target keeps it, a new socket does not."""
    monkeypatch.setattr(targets_module, "time", _Later)
    held = [make_socket(sockdir / "a.sock")]
    targets = Targets(sockdir, {"x": Target("x", tmp_path / "x.sock")})
    first = targets.catalog()
    assert first.names == ("a", "x")
    assert first.sockets["x"].owner == ""  # not there yet
    assert targets.catalog() is first
    tick()
    (sockdir / "notes.txt").write_text("not a socket\n")
    assert targets.catalog() is first
    held.append(make_socket(tmp_path / "x.sock"))
    second = targets.catalog()
    assert second is not first
    assert second.sockets["x"].path == str(tmp_path / "x.sock")
    assert second.sockets["x"].mode == f"{os.stat(tmp_path / 'x.sock').st_mode & 0o7777:04o}"
    assert targets.catalog() is second
    tick()
    held.append(make_socket(sockdir / "b.sock"))
    assert targets.catalog().names == ("a", "b", "x")
    for sock in held:
        sock.close()
