"""The VM's console: the VMM's virtio-console relayed to a log and to one attacher.

The VMM connects to ``R/<vm>-console-backend.socket`` (the supervisor listens). Everything the
guest prints is appended to ``S/<vm>-console.log`` (size-capped: the previous generation is
kept as ``.1``), each line stamped with the host's time and each boot opened by a separator
line, so boots do not run together and a guest cannot fake when something happened; it is
copied unstamped to whoever is attached to ``R/<vm>-console`` (``vm-shell``) — one
attacher at a time, a second one is told the console is busy. What the attacher types goes to
the guest. ``vm-start-debug`` attaches the supervisor's own terminal instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

LOG_CAP = 1 << 20  # bytes per generation
#: opens every boot in the log; ``vmsilo logs`` shows it as is
BOOT_MARK = b"-- vmsilo: boot at "


def host_stamp(now: float | None = None) -> bytes:
    """``2026-12-01 15:04:05.123`` in the host's local time."""
    t = time.time() if now is None else now
    return (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
    ).encode()


class ConsoleLog:
    def __init__(self, path: str, cap: int = LOG_CAP) -> None:
        self.path = Path(path)
        self.cap = cap
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size
        # the last boot may have ended mid-line: the separator still gets a line of its own
        self._line_start = self._size == 0 or os.pread(self._fd, 1, self._size - 1) == b"\n"
        self.mark_boot()

    def mark_boot(self) -> None:
        """A separator line before the output of a new boot (also after a guest reset)."""
        lead = b"" if self._line_start else b"\n"
        self._append(lead + BOOT_MARK + host_stamp() + f" (supervisor {os.getpid()}) --\n".encode())
        self._line_start = True

    def write(self, data: bytes) -> None:
        """Guest output, each line prefixed with the host time it arrived at."""
        if not data:
            return
        stamp = host_stamp() + b" "
        out = bytearray()
        start = 0
        while start < len(data):
            if self._line_start:
                out += stamp
            end = data.find(b"\n", start)
            if end < 0:
                out += data[start:]
                self._line_start = False
                break
            out += data[start : end + 1]
            self._line_start = True
            start = end + 1
        self._append(bytes(out))

    def _append(self, data: bytes) -> None:
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
