"""Telling others how a start is going: systemd (sd_notify) and the process that spawned us.

Under systemd the supervisor sends ``READY=1`` once the guest said hello and ``STATUS=`` on the
way. In embedded mode, the spawner (``vm-run`` autostart, ``vmsilo start``) passes a pipe; the
supervisor writes one line per milestone (``bound``, ``ready``, ``failed <message>``, and
``step <what it is doing>`` on the way, which a start on a terminal shows) and the spawner
reads them: no polling, and a supervisor that dies early closes the pipe, which the spawner
sees as EOF at once.
"""

from __future__ import annotations

import contextlib
import os
import socket


def sd_notify(message: str) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET``; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


class SpawnerPipe:
    """The write end of the spawner's milestone pipe (or nothing)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
