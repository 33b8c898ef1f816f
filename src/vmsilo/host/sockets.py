"""Listening Unix sockets the supervisor binds itself before anything connects to them.

Every socket a VMM or a sidecar connects to is bound and listening before that peer starts, so
connections wait in the backlog until someone accepts them: nobody ever races a server that is
not up yet, and nobody needs to retry.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from vmsilo.errors import VmsiloError

#: Unix socket paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: Room for many vm-run clients queued while the VM starts (the kernel caps it at somaxconn).
BACKLOG = 128


def bind_listening(
    path: str, *, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> socket.socket:
    """A blocking, listening Unix stream socket at ``path`` (stale file replaced).

    ``mode`` and ``owner`` (uid, gid) are set before ``listen``, so no one else can connect
    in between."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise VmsiloError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes",
            "use a shorter runtimeDir",
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def socket_live(path: str) -> bool:
    """True if something accepts connections on the Unix socket ``path``.

    Cheap on purpose (no plan, no asyncio): a warm ``vm-run`` asks this first."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True
