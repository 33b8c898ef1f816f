"""What every sidecar daemon of a VM shares: a listening socket the supervisor bound before
the VMM, one process, a task watching it — and one way to end all three.

Subclasses (:class:`~vmsilo.supervisor.sidecars.ShareDaemon` for virtiofsd,
:class:`~vmsilo.supervisor.sound.SoundDaemon`) know how to start their program and what its
death means; stopping is the same for both: SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`,
the watcher cancelled, the socket closed and its path removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

STOP_TIMEOUT = 5.0


class SocketDaemon:
    """A sidecar process serving a socket bound by the supervisor."""

    #: the listening socket's path (removed on stop)
    socket_path: str

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.proc: asyncio.subprocess.Process | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.stopping = False

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def stop(self) -> None:
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(BaseException):
                await self.watcher
        self.close_socket()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
