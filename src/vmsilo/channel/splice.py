"""A byte stream carried as one channel session, both ways, under the session's credit.

Sessions usually run a program; a *stream session* instead joins a socket on each side (a
guest Wayland connection and the host's waypipe client, SPEC §9.1). :func:`splice` is both
ends of it: bytes read from the local socket leave as DATA frames of ``send_type`` only while
the peer has granted credit, and DATA frames of ``recv_type`` are written to the local socket
before their credit goes back. So at most one window per direction is ever in flight, a
repaint burst waits for the window instead of growing a queue, and on a mux other sessions'
frames keep interleaving with it (each frame is at most :data:`CHUNK` bytes).

Either side may end it, as a Wayland connection ends — whole, not half-closed: the local
socket's EOF (after every byte before it went out) sends ``end_type`` (the guest sends EXIT, the
host RESET); a terminal frame, a vanished link or a protocol error from the peer closes the
local socket. Standard library only: the guest runs it too.
"""

from __future__ import annotations

import asyncio
import contextlib

from vmsilo.channel.mux import Link
from vmsilo.channel.protocol import (
    CHUNK,
    FRAME_COST,
    TERMINAL_TYPES,
    WINDOW,
    FrameType,
    ProtocolError,
    decode_u32,
    encode_exit,
    encode_u32,
)


class _Credit:
    """What the peer still lets us send; woken when it returns some."""

    def __init__(self) -> None:
        self.available = WINDOW
        self.event = asyncio.Event()

    def grant(self, n: int) -> None:
        self.available += n
        if self.available > WINDOW:
            raise ProtocolError("peer returned more credit than it was given")
        self.event.set()

    async def wait(self) -> None:
        while self.available <= FRAME_COST:
            self.event.clear()
            await self.event.wait()


async def _outbound(
    link: Link, reader: asyncio.StreamReader, credit: _Credit, send_type: FrameType
) -> None:
    """Local socket → link, within the credit, until the socket's EOF (or error)."""
    while True:
        await credit.wait()
        try:
            data = await reader.read(min(CHUNK, credit.available - FRAME_COST))
        except (ConnectionError, OSError):
            return
        if not data:
            return
        credit.available -= len(data) + FRAME_COST
        await link.send(send_type, data)


async def _inbound(
    link: Link, writer: asyncio.StreamWriter, credit: _Credit, recv_type: FrameType
) -> None:
    """Link → local socket; credit goes back once the bytes are written. Returns when the peer
    ends the stream. A local socket that can no longer be written (its reader is gone) only
    stops the writing: what it still has to say is read to its end by :func:`_outbound`."""
    writable = True
    while True:
        frame = await link.recv()
        if frame is None or frame.type in TERMINAL_TYPES:
            return
        if frame.type == recv_type:
            if writable:
                try:
                    writer.write(frame.payload)
                    await writer.drain()
                except (ConnectionError, OSError):
                    writable = False
            await link.send(FrameType.CREDIT, encode_u32(frame.cost))
        elif frame.type == FrameType.CREDIT:
            credit.grant(decode_u32(frame.payload))
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} in a stream session")


async def splice(
    link: Link,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    send_type: FrameType,
    recv_type: FrameType,
    end_type: FrameType,
) -> None:
    """Carry the socket (``reader``/``writer``) over ``link`` until either side ends it.

    Always closes ``writer``; sends ``end_type`` unless the peer ended first. Returns normally
    whichever way it ended (a protocol error of the peer only ends this stream)."""
    credit = _Credit()
    outbound = asyncio.ensure_future(_outbound(link, reader, credit, send_type))
    inbound = asyncio.ensure_future(_inbound(link, writer, credit, recv_type))
    try:
        done, _ = await asyncio.wait({outbound, inbound}, return_when=asyncio.FIRST_COMPLETED)
        broken = inbound in done and inbound.exception() is not None  # the peer misbehaved
        if outbound in done or broken:  # local EOF (or a bad peer): the peer is told
            payload = encode_exit(0) if end_type == FrameType.EXIT else b""
            with contextlib.suppress(Exception):
                await link.send(end_type, payload)
    finally:
        for task in (outbound, inbound):
            task.cancel()
        for task in (outbound, inbound):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            writer.close()
