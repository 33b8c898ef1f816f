"""In-process tests of the multiplexer and the relay over real socketpairs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from vmsilo.channel.mux import ChannelMux, MuxSession, StreamLink, read_frame
from vmsilo.channel.protocol import (
    PROTOCOL_VERSION,
    QUEUE_LIMIT,
    ChannelError,
    FrameType,
    ProtocolError,
    decode_json,
    encode_frame,
)
from vmsilo.channel.relay import relay_client

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 20) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def stream_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
]:
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


async def echo_handler(session: MuxSession) -> None:
    """A stand-in agent: echo STDIN as STDOUT until STDIN_EOF, then EXIT."""
    while True:
        frame = await session.recv()
        if frame is None or frame.type == FrameType.RESET:
            return
        if frame.type == FrameType.STDIN:
            await session.send(FrameType.STDOUT, frame.payload)
        elif frame.type == FrameType.STDIN_EOF:
            await session.send(FrameType.EXIT, b'{"status":0}')
            return


async def mux_pair(
    handler: Callable[[MuxSession], Awaitable[None]] = echo_handler,
) -> tuple[ChannelMux, ChannelMux]:
    (hr, hw), (gr, gw) = await stream_pair()
    host = ChannelMux(hr, hw, name="host")
    guest = ChannelMux(gr, gw, on_open=handler, name="guest")
    host.start()
    guest.start()
    return host, guest


def test_many_sessions_interleave() -> None:
    async def main() -> None:
        host, guest = await mux_pair()

        async def one(i: int) -> None:
            s = host.open_session()
            await s.send(FrameType.OPEN, b"{}")
            expected = b""
            for j in range(20):
                chunk = f"{i}:{j};".encode()
                expected += chunk
                await s.send(FrameType.STDIN, chunk)
            await s.send(FrameType.STDIN_EOF)
            got = b""
            while True:
                f = await s.recv()
                assert f is not None
                if f.type == FrameType.EXIT:
                    break
                got += f.payload
            assert got == expected
            s.close()

        await asyncio.gather(*(one(i) for i in range(50)))
        assert host.session_count == 0
        await host.aclose()
        await guest.closed.wait()

    run(main())


def test_overrun_fails_only_that_session() -> None:
    """A peer sending beyond the queue bound to a non-reading session fails just that one."""

    async def main() -> None:
        (hr, hw), (_gr, gw) = await stream_pair()
        host = ChannelMux(hr, hw, name="host")
        host.start()
        slow = host.open_session()
        fine = host.open_session()
        chunk = b"x" * 32768
        for _ in range(QUEUE_LIMIT // len(chunk) + 2):
            gw.write(encode_frame(FrameType.STDOUT, slow.id, chunk))
        gw.write(encode_frame(FrameType.STDOUT, fine.id, b"hello"))
        await gw.drain()
        f = await fine.recv()
        assert f is not None and f.payload == b"hello"
        with pytest.raises(ProtocolError, match="window"):
            await slow.recv()
        assert await slow.recv() is None
        assert slow.queued_cost == 0  # nothing kept for a failed session
        await host.aclose()
        gw.close()

    run(main())


def test_malformed_frame_fails_only_that_session() -> None:
    async def main() -> None:
        (hr, hw), (_gr, gw) = await stream_pair()
        host = ChannelMux(hr, hw, name="host")
        host.start()
        a = host.open_session()
        b = host.open_session()
        gw.write(encode_frame(0xEE, a.id, b"junk"))
        # A frame of another protocol version (header layout is frozen across versions).
        bad = bytearray(encode_frame(FrameType.STDOUT, b.id, b"v2"))
        bad[0] = PROTOCOL_VERSION + 1
        gw.write(encode_frame(FrameType.STDOUT, b.id, b"before"))
        gw.write(bytes(bad))
        await gw.drain()
        with pytest.raises(ProtocolError):
            await a.recv()
        # A failed session is dead: what it had queued is dropped with it.
        with pytest.raises(ProtocolError, match="version"):
            await b.recv()
        # The stream is still in sync: a third session works.
        c = host.open_session()
        gw.write(encode_frame(FrameType.STDOUT, c.id, b"ok"))
        await gw.drain()
        f = await c.recv()
        assert f is not None and f.payload == b"ok"
        await host.aclose()
        gw.close()

    run(main())


def test_guest_answers_bad_open_with_error() -> None:
    async def main() -> None:
        (hr, hw), (gr, gw) = await stream_pair()
        guest = ChannelMux(gr, gw, on_open=echo_handler, name="guest")
        guest.start()
        data = bytearray(encode_frame(FrameType.OPEN, 5, b"{}"))
        data[0] = 99
        hw.write(bytes(data))
        await hw.drain()
        f = await read_frame(hr)
        assert f is not None and f.type == FrameType.ERROR and f.session == 5
        assert decode_json(f.payload)["code"] == "version"
        await guest.aclose()
        hw.close()

    run(main())


def test_link_eof_ends_every_session() -> None:
    async def main() -> None:
        (hr, hw), (_gr, gw) = await stream_pair()
        host = ChannelMux(hr, hw, name="host")
        host.start()
        sessions = [host.open_session() for _ in range(3)]
        gw.close()
        for s in sessions:
            assert await s.recv() is None
        await host.closed.wait()
        with pytest.raises(ChannelError):
            host.open_session()
        await s.send(FrameType.STDIN, b"x")  # never raises on a dead link

    run(main())


def test_relay_client_disconnect_sends_reset_and_bad_type_errors() -> None:
    async def main() -> None:
        seen: list[list[int]] = []

        async def recording(session: MuxSession) -> None:
            types: list[int] = []
            seen.append(types)
            while True:
                try:
                    f = await session.recv()
                except ProtocolError:
                    types.append(-1)
                    return
                if f is None:
                    return
                types.append(f.type)
                if f.type in (FrameType.RESET, FrameType.ERROR):
                    return
                if f.type == FrameType.OPEN:
                    await session.send(FrameType.STDOUT, b"hi")

        host, guest = await mux_pair(recording)

        # 1. client disconnects mid-session → agent side sees RESET.
        (cr, cw), (sr, sw) = await stream_pair()
        relay = asyncio.create_task(relay_client(sr, sw, host))
        client = StreamLink(cr, cw)
        await client.send(FrameType.OPEN, b"{}")
        f = await client.recv()
        assert f is not None and f.payload == b"hi"
        await client.aclose()
        await relay
        # 2. client sends a frame type it may not send → ERROR both ways.
        (cr, cw), (sr, sw) = await stream_pair()
        relay = asyncio.create_task(relay_client(sr, sw, host))
        client = StreamLink(cr, cw)
        await client.send(FrameType.OPEN, b"{}")
        await client.recv()
        await client.send(FrameType.STDOUT, b"not yours")
        f = await client.recv()
        assert f is not None and f.type == FrameType.ERROR
        await relay
        # 3. first frame is not OPEN → ERROR to the client, nothing reaches the agent.
        (cr, cw), (sr, sw) = await stream_pair()
        relay = asyncio.create_task(relay_client(sr, sw, host))
        client = StreamLink(cr, cw)
        await client.send(FrameType.STDIN, b"x")
        f = await client.recv()
        assert f is not None and f.type == FrameType.ERROR
        await relay
        await host.aclose()
        await guest.closed.wait()
        assert seen == [
            [FrameType.OPEN, FrameType.RESET],
            [FrameType.OPEN, FrameType.ERROR],
        ]

    run(main())
