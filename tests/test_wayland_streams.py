"""The QEMU window path's streams in process (SPEC §9.1): the real guest agent and its
:class:`~vmsilo.guest.wayland.WaylandBridge` on one end of a real channel mux, the supervisor's
:class:`~vmsilo.supervisor.windows.WindowStreams` on the other, a "program" connecting where
waypipe's server would, and a stand-in for the host's waypipe client."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from test_channel_mux import run, stream_pair
from vmsilo.channel.mux import ChannelMux, Link
from vmsilo.channel.protocol import (
    PROTOCOL_VERSION,
    ExecRequest,
    FrameType,
    ProtocolError,
    ProtocolVersionError,
    ServiceRequest,
    decode_open,
    encode_json,
)
from vmsilo.guest.agent import Agent
from vmsilo.guest.wayland import WaylandBridge
from vmsilo.supervisor.windows import DesktopUnavailable, WindowStreams, _parse_ticket

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class FakeBridge:
    """Where the host's waypipe client would be: ``connect`` as the test says."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect


class Rig:
    def __init__(self, tmp: Path, connect: Connect) -> None:
        self.tmp = tmp
        self.connect = connect
        self.logs: list[str] = []

    async def __aenter__(self) -> Rig:
        (hr, hw), (gr, gw) = await stream_pair()
        self.agent = Agent(os.getuid(), os.getgid())
        self.bridge = WaylandBridge(os.getuid(), os.getgid(), str(self.tmp / "bridge.sock"))
        await self.bridge.listen()
        self.agent.wayland = self.bridge
        self.guest = ChannelMux(gr, gw, on_open=self.agent.handle_mux_session, name="guest")
        self.host = ChannelMux(hr, hw, name="host")
        self.guest.start()
        self.host.start()

        async def open_link() -> Link:
            return self.host.open_session()

        self.streams = WindowStreams(FakeBridge(self.connect), open_link, self.logs.append)  # type: ignore[arg-type]
        self.task = asyncio.ensure_future(self.streams.run())
        while self.bridge.control is None:  # the control stream is up (one mux round trip)
            await asyncio.sleep(0.01)
        return self

    async def program(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A guest program's Wayland connection, as waypipe's server makes it."""
        return await asyncio.open_unix_connection(str(self.tmp / "bridge.sock"))

    async def __aexit__(self, *exc: Any) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.host.aclose()
        await self.guest.aclose()
        assert self.bridge.server is not None
        self.bridge.server.close()


class EchoServer:
    """The host's end: echoes the first ``echo`` bytes, and counts what arrived until EOF."""

    def __init__(self, tmp: Path, echo: int = 1 << 62) -> None:
        self.path = str(tmp / "echo.sock")
        self.echo = echo
        self.received = 0
        self.eof = asyncio.Event()

    async def start(self) -> asyncio.Server:
        return await asyncio.start_unix_server(self._echo, path=self.path)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.path)

    async def _echo(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                keep = data[: max(0, self.echo - self.received)]
                self.received += len(data)
                if keep:
                    w.write(keep)
                    await w.drain()
        except ConnectionError:
            pass
        self.eof.set()
        w.close()


def test_a_program_connection_crosses_both_ways_intact(tmp_path: Path) -> None:
    """Bytes arrive in order both ways; a program that closes its connection has everything
    it wrote delivered first, then the host's end sees EOF (Wayland connections end whole:
    a close of either end ends the stream)."""

    async def main() -> None:
        data = random.Random(7).randbytes(3 << 20)
        echo = EchoServer(tmp_path, echo=len(data))
        server = await echo.start()
        async with Rig(tmp_path, echo.connect) as rig:
            r, w = await rig.program()

            async def send() -> None:
                w.write(data)
                await w.drain()

            sender = asyncio.ensure_future(send())
            got = await r.readexactly(len(data))
            await sender
            assert got == data
            w.write(bytes(1 << 20))  # a last burst, then the program is gone
            await w.drain()
            w.close()
            await asyncio.wait_for(echo.eof.wait(), 20)
            assert echo.received == len(data) + (1 << 20)
        server.close()

    run(main(), timeout=60)


def test_a_saturated_window_stream_does_not_starve_a_session(tmp_path: Path) -> None:
    """A repaint burst into a slow compositor fills the stream's window; a vm-run session on
    the same channel still gets its answers."""

    async def main() -> None:
        received = 0

        async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal received
            while data := await r.read(4096):
                received += len(data)
                await asyncio.sleep(0.01)

        path = str(tmp_path / "slow.sock")
        server = await asyncio.start_unix_server(slow, path=path)
        async with Rig(tmp_path, lambda: asyncio.open_unix_connection(path)) as rig:
            _r, w = await rig.program()
            burst = 32 << 20

            async def repaint() -> None:
                w.write(bytes(burst))
                await w.drain()

            painter = asyncio.ensure_future(repaint())
            while received < 64 << 10:  # the stream is flowing
                await asyncio.sleep(0.01)
            session = rig.host.open_session()
            await session.send(FrameType.OPEN, ExecRequest(argv=["/bin/cat"]).encode())
            for i in range(20):
                ping = f"ping {i}\n".encode()
                await session.send(FrameType.STDIN, ping)
                frame = await session.recv()
                while frame is not None and frame.type == FrameType.CREDIT:
                    frame = await session.recv()
                assert frame is not None and frame.type == FrameType.STDOUT, frame
                assert frame.payload == ping
                await session.send(FrameType.CREDIT, (len(ping) + 64).to_bytes(4, "big"))
            assert not painter.done() and received < burst, "the burst was not saturating"
            await session.send(FrameType.STDIN_EOF)
            painter.cancel()
            w.close()
        server.close()

    run(main(), timeout=60)


def test_no_desktop_ends_the_program_connection_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async def unavailable() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            raise DesktopUnavailable("no Wayland compositor at /run/user/1000/wayland-0")

        async with Rig(tmp_path, unavailable) as rig:
            for _ in range(3):
                r, w = await rig.program()
                # EOF long before the guest's own wait for a stream (15 s) would end it
                assert await asyncio.wait_for(r.read(), 5) == b""
                w.close()
            said = [m for m in rig.logs if "no Wayland compositor" in m]
            assert len(said) == 1, rig.logs  # once, not once per window

    run(main(), timeout=30)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"{",
        b"[1]",
        b'{"open": 0}',
        b'{"open": -1}',
        b'{"open": 4294967296}',
        b'{"open": true}',
        b'{"open": "1"}',
        b'{"open": 1e3}',
        b"\xff",
        b"[" * 5000,
    ],
)
def test_malformed_control_lines_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        _parse_ticket(line)


def test_open_payloads() -> None:
    req = decode_open(ServiceRequest("wayland", 7).encode())
    assert req == ServiceRequest("wayland", 7)
    assert isinstance(decode_open(ExecRequest(argv=["true"]).encode()), ExecRequest)
    bad = [
        {"version": PROTOCOL_VERSION, "service": "shell"},
        {"version": PROTOCOL_VERSION, "service": "wayland", "ticket": -1},
        {"version": PROTOCOL_VERSION, "service": "wayland", "ticket": 1 << 40},
    ]
    for obj in bad:
        with pytest.raises(ProtocolError):
            decode_open(encode_json(obj))
    with pytest.raises(ProtocolVersionError):
        decode_open(encode_json({"version": 99, "service": "wayland"}))
