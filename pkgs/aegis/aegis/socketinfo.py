"""Who owns a socket file, and who Aegis is: what an operator needs to see why a socket can or
cannot be reached, wherever a target's socket is shown (``aegis check``, a permission error).

Names are looked up in the user and group databases; a number without a name stays a number.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

__all__ = [
    "OwnerNames",
    "SocketFile",
    "group_name",
    "permission_detail",
    "socket_file",
    "user_name",
    "whoami",
]


@dataclass(frozen=True, slots=True)
class SocketFile:
    """A socket as the file system shows it, links followed."""

    #: Where the links lead: the file a connection reaches.
    path: str
    owner: str
    group: str
    #: The permission bits, as ``chmod`` takes them: ``"0660"``.
    mode: str


class OwnerNames:
    """A socket file's facts from its status, each owner and group looked up once: with
    thousands of sockets owned by a few users, the user and group databases (which NSS may read
    from a file per lookup, or ask a service) are asked a few times, not thousands."""

    __slots__ = ("_groups", "_users")

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def file(self, path: str, st: os.stat_result) -> SocketFile:
        user = self._users.get(st.st_uid)
        if user is None:
            user = self._users[st.st_uid] = user_name(st.st_uid)
        group = self._groups.get(st.st_gid)
        if group is None:
            group = self._groups[st.st_gid] = group_name(st.st_gid)
        return SocketFile(path, user, group, _mode(st.st_mode))


def socket_file(path: str) -> SocketFile | None:
    """``path``'s file, owner, group and mode; None when this process may not look at it (or it
    is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return SocketFile(
        os.path.realpath(path), user_name(st.st_uid), group_name(st.st_gid), _mode(st.st_mode)
    )


def permission_detail(path: str, program: str = "aegis") -> str:
    """Which file (or, when it cannot be looked at, which directory), its owner, group and mode,
    and who ``program`` runs as: what is needed to fix a permission error."""
    try:
        st = os.stat(path)
        about = f"{path} is {user_name(st.st_uid)}:{group_name(st.st_gid)} mode {_mode(st.st_mode)}"
    except OSError:
        parent = os.path.dirname(path) or "."
        try:
            st = os.stat(parent)
            about = (
                f"directory {parent} is {user_name(st.st_uid)}:{group_name(st.st_gid)} "
                f"mode {_mode(st.st_mode)}"
            )
        except OSError:
            about = f"{path} cannot be inspected"
    return f"{about}; {program} runs as {whoami()}"


def whoami() -> str:
    """``user in groups a,b``: the effective user and every group this process has."""
    groups = ",".join(group_name(gid) for gid in sorted(set(os.getgroups()) | {os.getegid()}))
    return f"{user_name(os.geteuid())} in groups {groups}"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _mode(st_mode: int) -> str:
    return f"{st_mode & 0o7777:04o}"
