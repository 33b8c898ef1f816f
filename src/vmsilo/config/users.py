"""Host user lookup behind a seam, so tests can plan for any user.

The plan needs the uid, gid and home of ``user`` (kernel parameter ``vmsilo.user=``, the Wayland
and PulseAudio paths, socket ownership). Production reads ``pwd``/``grp``; tests pass a
:class:`StaticUsers` mapping instead of depending on the machine's accounts.
"""

from __future__ import annotations

import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class HostUser:
    name: str
    uid: int
    gid: int
    home: str

    @property
    def runtime_dir(self) -> str:
        """The user's XDG runtime directory, where Wayland and PulseAudio sockets live."""
        return f"/run/user/{self.uid}"


class UserLookup(Protocol):
    def __call__(self, name: str) -> HostUser | None: ...


def system_users(name: str) -> HostUser | None:
    """Look ``name`` up in the host's account database."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return HostUser(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir)


class StaticUsers:
    """A fixed user table for tests and for planning on another machine's behalf."""

    def __init__(self, users: Mapping[str, HostUser]) -> None:
        self._users = dict(users)

    def __call__(self, name: str) -> HostUser | None:
        return self._users.get(name)

    @classmethod
    def single(cls, name: str = "alice", uid: int = 1000, gid: int = 1000) -> StaticUsers:
        return cls({name: HostUser(name, uid, gid, f"/home/{name}")})
