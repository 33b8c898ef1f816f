"""asyncio protocols for the agent's pipe and pty file descriptors.

asyncio's StreamReader reads ahead and offers no "wait until data is there" call, which the
agent needs: it must first know that output is available, then take exactly as much as the
peer's flow-control credit allows, without reserving credit while blocked (two pumps — stdout
and stderr — share one session window, and a reservation held by a silent stdout would starve
stderr). :class:`PipeReader` buffers at most ``limit`` bytes and pauses the pipe beyond that,
so back-pressure reaches the guest program.

Standard library only: this module runs in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import cast


class PipeReader(asyncio.Protocol):
    """Read side of a pipe or pty master: bounded buffer + wait()/take()."""

    def __init__(self, limit: int = 128 * 1024) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.eof = False
        self._event = asyncio.Event()
        self._transport: asyncio.ReadTransport | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.ReadTransport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._event.set()
        if not self._paused and len(self.buffer) >= self.limit and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._event.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # A pty master reports EIO once every slave fd is closed: that is its EOF.
        self.eof = True
        self._event.set()

    async def wait(self) -> bool:
        """Wait until there is data or EOF; True if there is data."""
        while not self.buffer and not self.eof:
            self._event.clear()
            await self._event.wait()
        return bool(self.buffer)

    def take(self, n: int) -> bytes:
        chunk = bytes(self.buffer[:n])
        del self.buffer[:n]
        if self._paused and len(self.buffer) < self.limit // 2 and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    def close(self) -> None:
        """Stop reading (the writer then gets EPIPE/SIGPIPE) and report EOF."""
        self.eof = True
        self.buffer.clear()
        self._event.set()
        if self._transport is not None:
            self._transport.close()


class PipeWriter(asyncio.Protocol):
    """Write side of a pipe or pty master with drain-style back-pressure."""

    def __init__(self) -> None:
        self._transport: asyncio.WriteTransport | None = None
        self._paused = False
        self._resumed = asyncio.Event()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.WriteTransport, transport)

    def pause_writing(self) -> None:
        self._paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        self._paused = False
        self._resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._resumed.set()

    async def write(self, data: bytes) -> None:
        """Write and wait while the pipe is full; BrokenPipeError once the reader is gone."""
        if self.closed or self._transport is None or self._transport.is_closing():
            raise BrokenPipeError("pipe closed")
        self._transport.write(data)
        while self._paused and not self.closed:
            await self._resumed.wait()
        if self.closed:
            raise BrokenPipeError("pipe closed")

    def close(self) -> None:
        """Close after pending data is flushed (the reader sees EOF)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self.closed = True

    def abort(self) -> None:
        """Close now, discarding unwritten data."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self.closed = True


async def open_pipe_reader(fd: int, limit: int = 128 * 1024) -> PipeReader:
    """Wrap ``fd`` (pipe, socket or char device; ownership passes) in a PipeReader."""
    loop = asyncio.get_running_loop()
    reader = PipeReader(limit)
    f = os.fdopen(fd, "rb", buffering=0)
    try:
        await loop.connect_read_pipe(lambda: reader, f)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        raise
    return reader


async def open_pipe_writer(fd: int) -> PipeWriter:
    """Wrap ``fd`` (pipe, socket or char device; ownership passes) in a PipeWriter."""
    loop = asyncio.get_running_loop()
    writer = PipeWriter()
    f = os.fdopen(fd, "wb", buffering=0)
    try:
        await loop.connect_write_pipe(lambda: writer, f)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        raise
    return writer


async def open_fd_streams(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a read-write char device such as a virtio port (owns ``fd``).

    The device is opened once (virtio ports allow a single opener) and dup'ed so the read and
    write transports each own one descriptor.
    """
    loop = asyncio.get_running_loop()
    wfd = os.dup(fd)
    reader = asyncio.StreamReader(limit=2 * 65536)
    rf = os.fdopen(fd, "rb", buffering=0)
    wf = os.fdopen(wfd, "wb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rf)
    wproto = asyncio.StreamReaderProtocol(asyncio.StreamReader())
    transport, _ = await loop.connect_write_pipe(lambda: wproto, wf)
    writer = asyncio.StreamWriter(transport, wproto, None, loop)
    return reader, writer
