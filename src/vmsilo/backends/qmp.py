"""A small blocking QMP client that can hand QEMU a file descriptor (``getfd``).

Saving and restoring a fastStart VM (SPEC §10) pass QEMU an open state file over the QMP
socket (SCM_RIGHTS) instead of a path or a shell command: QEMU's seccomp filter denies it
spawning anything, and as ``-runas`` user it could not open a root-only file. The supervisor
runs these calls in a worker thread; every wait is bounded by the socket's timeout (the reply
or event QEMU sends wakes it, nothing polls).
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

Event = dict[str, Any]


class QmpError(Exception):
    """QEMU answered with an error, went away, or did not answer in time."""


class Qmp:
    """One QMP connection, in command mode once constructed."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events: deque[Event] = deque()
        try:
            self.sock.connect(path)
            self._read()  # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QmpError("QEMU did not answer on QMP in time") from None
            except OSError as e:
                raise QmpError(f"QMP connection failed: {e}") from None
            if not chunk:
                raise QmpError("QEMU closed its QMP connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise QmpError(f"unexpected QMP message: {line[:200]!r}")
        return obj

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> Any:
        """Run ``command``; its return value. Events read meanwhile are kept for
        :meth:`wait_event`."""
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise QmpError(f"QMP {command}: {e}") from None
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('desc', err)}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, wanted: Callable[[Event], bool], timeout: float) -> Event:
        """The first event (already read, or to come within ``timeout`` s) that ``wanted``."""
        deadline = time.monotonic() + timeout
        while True:
            while self.events:
                event = self.events.popleft()
                if wanted(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QEMU did not report the expected event in time")
            previous = self.sock.gettimeout()
            self.sock.settimeout(left)
            try:
                message = self._read()
            finally:
                self.sock.settimeout(previous)
            if "event" in message:
                self.events.append(message)


def migration_status(event: Event) -> str | None:
    """The status of a MIGRATION event, else None."""
    if event.get("event") != "MIGRATION":
        return None
    status = event.get("data", {}).get("status")
    return status if isinstance(status, str) else None


#: Terminal migration statuses.
MIGRATION_DONE = ("completed", "failed", "cancelled")
