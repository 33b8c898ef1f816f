"""SPEC §11.1 for the window path (§9.1): a guest's Wayland connections are streams only the
supervisor opens. A local account that can reach a VM's command socket (``vm-run``'s door)
must not be able to open the Wayland control stream (and read which program connections wait)
nor claim a waiting connection by its ticket (and play compositor to a guest program).

Before the fix the supervisor relayed any OPEN payload to the agent verbatim, so both were one
frame away: the attack below reached the guest agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from hostile_rig import Rig

from vmsilo.channel.mux import StreamLink
from vmsilo.channel.protocol import (
    SERVICE_WAYLAND,
    SERVICE_WAYLAND_CONTROL,
    FrameType,
    ServiceRequest,
    decode_error,
)


def test_a_local_client_cannot_open_service_streams(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        await rig.start()
        try:
            for request in (
                ServiceRequest(SERVICE_WAYLAND_CONTROL),
                ServiceRequest(SERVICE_WAYLAND, 1),
            ):
                r, w = await asyncio.open_unix_connection(str(rig.cmd_path))
                client = StreamLink(r, w)
                await client.send(FrameType.OPEN, request.encode())
                frame = await asyncio.wait_for(client.recv(), 10)
                assert frame is not None and frame.type == FrameType.ERROR, frame
                assert "opened by vmsilo only" in decode_error(frame.payload).message
                await client.aclose()
            # nothing reached the agent: its script queue was never asked for a session
            assert rig.frames_sent == 0
            assert rig.supervisor_alive()
        finally:
            await rig.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_clients_late_frame_never_costs_it_the_exit(tmp_path: Path) -> None:
    """The supervisor used to close a command-socket connection right after relaying EXIT; a
    client whose last frame (a CREDIT, a STDIN_EOF) went out after that got EPIPE, and an
    asyncio stream then dropped the EXIT it had not read yet: vm-run reported a lost connection
    for a program that had exited. Now the supervisor half-closes and waits for the client."""
    from hostile_rig import raw_frame

    from vmsilo.channel.protocol import ExecRequest, encode_u32

    async def main() -> list[int]:
        rig = Rig(tmp_path)
        await rig.start()
        types = []
        try:
            rig.scripts.append(
                lambda sid: [
                    raw_frame(FrameType.STDOUT, sid, b"x" * 4000),
                    raw_frame(FrameType.EXIT, sid, b'{"status":3}'),
                ]
            )
            r, w = await asyncio.open_unix_connection(str(rig.cmd_path))
            client = StreamLink(r, w)
            await client.send(FrameType.OPEN, ExecRequest(argv=["x"]).encode())
            await asyncio.sleep(0.5)  # the EXIT is relayed meanwhile (and not read yet)
            await client.send(FrameType.CREDIT, encode_u32(4064))  # a late frame
            await asyncio.sleep(0.1)
            while (frame := await client.recv()) is not None:
                types.append(frame.type)
            await client.aclose()
        finally:
            await rig.stop()
        return types

    types = asyncio.run(asyncio.wait_for(main(), 30))
    assert types == [FrameType.STDOUT, FrameType.EXIT]


# --- a hostile guest on the window path (SPEC §11.2 for §9.1's streams) -----------------------


def _hostile_windows(control_lines: list[bytes], hang_connects: bool) -> tuple[list[str], int, int]:
    """WindowStreams (the supervisor's side) against a guest whose agent writes
    ``control_lines`` on the control stream. Returns the supervisor's log, how many streams it
    took to the desktop and how many it reset."""
    import socket

    from vmsilo.channel.mux import ChannelMux, MuxSession
    from vmsilo.channel.protocol import decode_json
    from vmsilo.supervisor.windows import MAX_STREAMS, WindowStreams

    logs: list[str] = []
    counts = {"connects": 0, "resets": 0}

    async def guest(session: MuxSession) -> None:
        first = await session.recv()
        assert first is not None
        request = decode_json(first.payload)
        if request["service"] == "wayland-control":
            for line in control_lines:
                for i in range(0, len(line), 32 << 10):  # as frames carry it: ≤ 32 KiB each
                    await session.send(FrameType.STDOUT, line[i : i + (32 << 10)])
            while await session.recv() is not None:
                pass
            return
        while (frame := await session.recv()) is not None:
            if frame.type == FrameType.RESET:
                counts["resets"] += 1
                return

    class Desktop:
        async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            counts["connects"] += 1
            if hang_connects:
                await asyncio.Event().wait()  # a desktop that never answers: streams pile up
            raise OSError("no desktop here")

    async def main() -> None:
        a, b = socket.socketpair()
        (hr, hw), (gr, gw) = (
            await asyncio.open_connection(sock=a),
            await asyncio.open_connection(sock=b),
        )
        host, guest_mux = ChannelMux(hr, hw, name="host"), ChannelMux(gr, gw, on_open=guest)
        host.start()
        guest_mux.start()

        async def open_link() -> MuxSession:
            return host.open_session()

        streams = WindowStreams(Desktop(), open_link, logs.append)  # type: ignore[arg-type]
        task = asyncio.ensure_future(streams.run())
        await asyncio.sleep(2)  # the guest has said everything; the supervisor has acted
        assert len(streams.streams) <= MAX_STREAMS + len(control_lines)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await host.aclose()
        await guest_mux.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))
    return logs, counts["connects"], counts["resets"]


def test_a_ticket_flood_takes_at_most_max_streams_to_the_desktop() -> None:
    from vmsilo.supervisor.windows import MAX_STREAMS

    lines = [b"".join(b'{"open": %d}\n' % n for n in range(1, 201))]
    logs, connects, resets = _hostile_windows(lines, hang_connects=True)
    assert connects == MAX_STREAMS  # the rest never reach the desktop user's side
    assert resets == 200 - MAX_STREAMS
    assert len([m for m in logs if "windows at once" in m]) == 1  # said once, not 136 times


def test_malformed_control_lines_end_the_window_path_only() -> None:
    for junk in (
        b"[" * 100_000 + b"\n",
        b'{"open": ' + b"9" * 5000 + b"}\n",
        b'{"open": -3}\n',
        b"\xff\xfe\n",
        b"x" * 300,  # no newline, longer than a line may be
    ):
        logs, connects, _ = _hostile_windows([junk], hang_connects=False)
        assert connects == 0
        assert any("broke the Wayland control stream" in m for m in logs), (junk[:20], logs)


def test_refused_clients_that_write_without_end_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No compositor: the filter refuses each client and hears it out until it hangs up
    (waypipe must read why). A hostile guest program that keeps writing must not keep that
    going: each refusal ends after REFUSE_LINGER s in all, at most MAX_REFUSING linger at
    once (the rest are closed at once), and the filter serves the next client as before."""
    import socket
    import threading
    import time

    from vmsilo.wayland import proxy as proxy_module
    from vmsilo.wayland.policy import Labels

    monkeypatch.setattr(proxy_module, "REFUSE_LINGER", 1.0)
    filt = proxy_module.Proxy(
        Labels("work", "green"), str(tmp_path / "vm" / "f.sock"), str(tmp_path / "none")
    )
    filt.bind()
    runner = threading.Thread(target=filt.run, daemon=True)
    runner.start()
    clients = []
    stop = threading.Event()
    most = 0

    def flood(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(b"\x01\x00\x00\x00\x01\x00\x0c\x00\x02\x00\x00\x00" * 256)

    try:
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(tmp_path / "vm" / "f.sock"))
            clients.append(sock)
            threading.Thread(target=flood, args=(sock,), daemon=True).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lingering = sum(t.name == "refuse" for t in threading.enumerate())
            most = max(most, lingering)
            if lingering == 0 and most > 0:
                break
            time.sleep(0.05)
        assert 0 < most <= proxy_module.MAX_REFUSING, most
        assert not any(t.name == "refuse" for t in threading.enumerate()), "still lingering"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
            late.settimeout(10)
            late.connect(str(tmp_path / "vm" / "f.sock"))
            data = b""
            while b"no Wayland compositor" not in data and (chunk := late.recv(4096)):
                data += chunk
            assert b"vmsilo: no Wayland compositor at" in data
    finally:
        stop.set()
        for sock in clients:
            sock.close()
        filt.stop()
        runner.join(10)
