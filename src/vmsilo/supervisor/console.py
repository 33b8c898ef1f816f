"""The VM's console: the VMM's virtio-console relayed to a log and to one attacher.

The VMM connects to ``R/<vm>-console-backend.socket`` (the supervisor listens). Everything the
guest prints is appended to ``S/<vm>-console.log`` (size-capped: the previous generation is
kept as ``.1``) and copied to whoever is attached to ``R/<vm>-console`` (``vm-shell``) — one
attacher at a time, a second one is told the console is busy. What the attacher types goes to
the guest. ``vm-start-debug`` attaches the supervisor's own terminal instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

LOG_CAP = 1 << 20  # bytes per generation


class ConsoleLog:
    def __init__(self, path: str, cap: int = LOG_CAP) -> None:
        self.path = Path(path)
        self.cap = cap
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.cap:
            os.close(self._fd)
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640
            )
            self._size = 0
        os.write(self._fd, data)
        self._size += len(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class ConsoleRelay:
    """Glue between the VMM's console stream, the log and a single attached client."""

    def __init__(self, log: ConsoleLog) -> None:
        self.log = log
        self.backend: asyncio.StreamWriter | None = None
        self.attached: asyncio.StreamWriter | None = None
        self.tty_out: int | None = None
        self.backend_connected = asyncio.Event()

    async def on_backend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The VMM connected its virtio-console: pump guest output until it goes away."""
        if self.backend is not None:
            writer.close()
            return
        self.backend = writer
        self.backend_connected.set()
        try:
            while data := await reader.read(65536):
                self.log.write(data)
                if self.tty_out is not None:
                    with contextlib.suppress(OSError):
                        os.write(self.tty_out, data)
                client = self.attached
                if client is not None:
                    try:
                        client.write(data)
                        await asyncio.wait_for(client.drain(), timeout=5)
                    except (OSError, TimeoutError):
                        self._detach(client)
        except (ConnectionError, OSError):
            pass
        finally:
            self.backend = None
            if self.attached is not None:
                self._detach(self.attached)

    async def on_attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A ``vm-shell`` attached: relay its keystrokes to the guest until it leaves."""
        if self.attached is not None:
            writer.write(b"vmsilo: the console is busy (another vm-shell is attached)\r\n")
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        self.attached = writer
        try:
            while data := await reader.read(4096):
                await self.send_input(data)
        except (ConnectionError, OSError):
            pass
        finally:
            self._detach(writer)

    async def send_input(self, data: bytes) -> None:
        backend = self.backend
        if backend is not None:
            backend.write(data)
            with contextlib.suppress(OSError):
                await backend.drain()

    def _detach(self, writer: asyncio.StreamWriter) -> None:
        if self.attached is writer:
            self.attached = None
        with contextlib.suppress(Exception):
            writer.close()
