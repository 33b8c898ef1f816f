"""Attacks SPEC §11.2 with a hostile guest agent: nothing it sends reaches a host terminal
unfiltered, nothing of it is buffered beyond the credit window, malformed frames end one
session, and readiness stays pinned to the first hello.

A fixed corpus (seeded: the same frames on every run) of more than 20,000 mutated frames goes
through the real supervisor side (readiness, command socket, mux, relay) into the real vm-run
client with ptys as stdout and stderr. Before the fix: ESC/C1 from EXIT and ERROR messages, a
C1 CSI completed across stdout and stderr, lone C1 bytes, an unbounded writer backlog, a
traceback (RecursionError) for deep JSON, and a later hello switching the transport.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hostile_rig import (
    FORBIDDEN_IN_LINE,
    Rig,
    raw_frame,
    reaches_terminal,
    recorded_backlogs,
    u32,
)

from vmsilo.channel.blocking_client import run_blocking_session
from vmsilo.channel.client import run_session
from vmsilo.channel.escapes import EscapeFilter
from vmsilo.channel.mux import StreamLink
from vmsilo.channel.protocol import (
    CHUNK,
    MAX_PAYLOAD,
    WINDOW,
    ChannelError,
    ExecRequest,
    FrameType,
    encode_exit,
    encode_farewell,
    encode_ready,
)
from vmsilo.cli.vm_run import channel_failure

SEED = 0x5EC11  # the corpus is a pure function of it
SESSIONS = 500
MIN_FRAMES = 20_000
T = TypeVar("T")

# --- the corpus ---------------------------------------------------------------------------------

#: Pieces a hostile program or agent puts in text meant for the user's terminal.
NASTY = [
    b"\x1b[2J",
    b"\x1b]0;pwned\x07",
    b"\x1b]52;c;aGk=\x07",  # OSC 52: write the clipboard
    b"\x1bP$q\x1b\\",  # DCS answer-back
    b"\x9b31m",  # lone C1 CSI
    b"\x9d0;t\x9c",  # lone C1 OSC ... ST
    b"\xc2\x9b2J",  # C1 CSI as UTF-8
    b"\xc2",  # to be completed by the next frame (maybe the other stream's)
    b"\x9b",
    b"\x7f",
    b"\x00\x07\x08\x0b\x0c",
    b"\r\n",
    "héllo € 漢字 🙂".encode(),
    b"\xe2\x82",  # a truncated character
    b"\xf0\x9f",
    b"\xff\xfe",
    b"\xed\xa0\x80",  # a surrogate
    b"\xc0\x9b",  # an overlong CSI
    b"plain text ",
]
NASTY_TEXT = [
    "\x1b[2J",
    "\x1b]0;pwned\x07",
    "\u009b31m",
    "\u0085",
    "\x7f",
    "line\nvm-run: forged",
    "\ud83d",
    "\u202eevil",
    "ok",
]


def nasty_bytes(rng: random.Random, n: int) -> bytes:
    out = b"".join(rng.choice(NASTY) for _ in range(n))
    if rng.random() < 0.2:
        out += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return out


def nasty_text(rng: random.Random) -> str:
    return "".join(rng.choice(NASTY_TEXT) for _ in range(rng.randrange(1, 6)))


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def huge_int(digits: int) -> bytes:
    return b"9" * digits


def exit_payload(rng: random.Random) -> bytes:
    """A valid or malformed EXIT payload."""
    kind = rng.randrange(9)
    if kind == 0:
        return deep_json(rng.choice([1000, 30_000, MAX_PAYLOAD // 2]))
    if kind == 1:
        return b'{"status":' + huge_int(rng.choice([30, 5000, 60_000])) + b"}"
    if kind == 2:
        return b'{"status":0,"message":"\xff\xc2\x9b\x1b[2J"}'  # bad UTF-8
    if kind == 3:
        return json.dumps({"status": 1, "message": [[[["x"]]]]}).encode()
    if kind == 4:
        return b'{"status":true}' if rng.random() < 0.5 else b'{"status":-1}'
    if kind == 5:
        return b'{"status":1,"message":"' + b"[" * 10_000 + b'"}'
    msg = nasty_text(rng)
    raw = rng.random() < 0.5  # raw UTF-8 (a real agent writes \\u escapes)
    return json.dumps({"status": rng.randrange(256), "message": msg}, ensure_ascii=not raw).encode(
        "utf-8", "surrogatepass"
    )


def error_payload(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return deep_json(MAX_PAYLOAD // 2)
    if kind == 1:
        return b'{"code":"version","version":' + huge_int(5000) + b"}"
    if kind == 2:
        return b'{"code":"version","version":' + huge_int(40) + b"}"
    if kind == 3:
        return b'{"code":"x","message":{"nested":[1,2]}}'
    return json.dumps({"code": "protocol", "message": nasty_text(rng)}).encode()


def mutated_session(rng: random.Random) -> list[tuple[int, int, bytes, int]]:
    """One session's frames: (type, session offset, payload, version). Offset 0 is the
    session itself; others hit unknown sessions."""
    frames: list[tuple[int, int, bytes, int]] = []
    spent = 0
    hostility = rng.choice([0.0, 0.005, 0.02, 0.1, 0.3])  # the share of non-data frames
    for _ in range(rng.randrange(20, 70)):
        r = 0.7 + 0.3 * rng.random() if rng.random() < hostility else 0.7 * rng.random()
        off = 0 if rng.random() < 0.95 else rng.choice([1, 7, -1])
        version = 1 if rng.random() < 0.98 else rng.choice([0, 2, 255])
        if r < 0.70:
            ftype: int = rng.choice([FrameType.STDOUT, FrameType.STDERR])
            payload = nasty_bytes(rng, rng.randrange(1, 8))
            if spent + len(payload) + 64 > WINDOW // 2:
                payload = b"\xc2"  # stay within the window (the flood tests are separate)
            spent += len(payload) + 64
            frames.append((ftype, off, payload, version))
        elif r < 0.75:
            frames.append((FrameType.CREDIT, off, rng.choice([u32(1 << 32 - 1), b"", b"12345"]), 1))
        elif r < 0.80:
            ftype = rng.choice([0, 1, 2, 3, 11, 12, 200, 255])  # unknown or the host's
            frames.append((ftype, off, nasty_bytes(rng, 2), version))
        elif r < 0.83:
            frames.append((FrameType.STDOUT, off, b"", version))  # empty data frame
        elif r < 0.84:
            frames.append((FrameType.STDOUT, off, b"x" * (MAX_PAYLOAD + 1), version))
        elif r < 0.92:
            frames.append((FrameType.EXIT, off, exit_payload(rng), version))
        else:
            frames.append((FrameType.ERROR, off, error_payload(rng), version))
    # a clean end, in case nothing above ended the session
    frames.append((FrameType.EXIT, 0, encode_exit(0, "the end \x1b[0m"), 1))
    return frames


def corpus() -> list[list[tuple[int, int, bytes, int]]]:
    rng = random.Random(SEED)
    return [mutated_session(rng) for _ in range(SESSIONS)]


def late_ready_lines() -> list[bytes]:
    """What guest root writes to the ready port after the agent's hello."""
    return [
        encode_ready("vsock", 1),
        b'{"hello":"vmsilo-agent","version":99,"transport":"channel"}\n',
        b'{"hello":"vmsilo-agent","version":' + huge_int(6000) + b',"transport":"vsock"}\n',
        b'{"hello":"vmsilo-agent","version":1,"transport":"carrier-pigeon"}\n',
        deep_json(100_000) + b"\n",
        b"x" * (2 << 20) + b"\n",  # 2 MiB without a newline before the end
        b'{"hello":"vmsilo-agent","version":1,"transport":"\xff\xfe"}\n',
        b'{"bye":"vmsilo-agent","reason":"' + b"[" * 5000 + b'"}\n',
        b'{"bye":"vmsilo-agent","reason":"x","idle_s":' + huge_int(400) + b"}\n",
        encode_farewell("owned\x1b]0;title\x07\u009b2J\nforged line"),
        encode_ready("vsock", 2),
    ]


# --- running it ---------------------------------------------------------------------------------


def run(coro: Awaitable[T], timeout: float = 600) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


#: vm-run's two clients: the blocking one it runs for every session but ``-t``, the asyncio one
#: it runs with ``-t`` (and which the supervisor uses for its own sessions).
CLIENTS = ["blocking", "asyncio"]


async def session(client: str, target: Any, request: ExecRequest, **kw: Any) -> int:
    """One session with ``client``; the blocking one runs in a thread (the rig's supervisor
    shares this event loop)."""
    if client == "asyncio":
        return await run_session(target, request, **kw)
    return await asyncio.to_thread(run_blocking_session, target, request, **kw)


def script_of(frames: list[tuple[int, int, bytes, int]]) -> Any:
    return lambda sid: [raw_frame(t, (sid + off) & 0xFFFFFFFF, p, v) for t, off, p, v in frames]


@pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor's room runs as root")
@pytest.mark.parametrize("client", CLIENTS)
def test_hostile_frames_reach_no_terminal_and_end_only_their_session(
    tmp_path: Path, client: str
) -> None:
    sessions = corpus()
    assert sum(len(s) for s in sessions) >= MIN_FRAMES

    async def body() -> None:
        from hostile_rig import Pty

        rig = Rig(tmp_path)
        await rig.start()
        loop = asyncio.get_running_loop()
        out, err = Pty(loop), Pty(loop)
        messages: list[str] = []
        outcomes = {"status": 0, "channel error": 0}
        with recorded_backlogs() as backlogs:
            for i, frames in enumerate(sessions):
                rig.scripts.append(script_of(frames))
                if i % 50 == 25:  # late hellos and junk on the ready port meanwhile
                    for line in late_ready_lines():
                        await rig.say(line)
                try:
                    await session(
                        client,
                        str(rig.cmd_path),
                        ExecRequest(argv=["prog"]),
                        stdin=None,
                        stdout=out.slave,
                        stderr=err.slave,
                        forward_signals=False,
                        new_output_filter=EscapeFilter,
                    )
                    outcomes["status"] += 1
                except ChannelError as e:  # never anything else: no traceback for vm-run
                    outcomes["channel error"] += 1
                    messages.append(str(channel_failure("hostile", e, None)))
                assert rig.supervisor_alive(), f"session {i} ended the supervisor"
            # the supervisor still serves a well-behaved session
            rig.scripts.append(
                script_of(
                    [
                        (FrameType.STDOUT, 0, b"still here\n", 1),
                        (FrameType.EXIT, 0, b'{"status":0}', 1),
                    ]
                )
            )
            status = await session(
                client,
                str(rig.cmd_path),
                ExecRequest(argv=["prog"]),
                stdin=None,
                stdout=out.slave,
                stderr=err.slave,
                forward_signals=False,
                new_output_filter=EscapeFilter,
            )
            await backlogs.join_writers()  # every byte written before the sentinel goes
        stdout, stderr = await out.finish(), await err.finish()
        assert status == 0 and stdout.endswith(b"still here\n")
        assert rig.frames_sent >= MIN_FRAMES
        assert outcomes["status"] > 50 and outcomes["channel error"] > 50, outcomes
        for name, data in (("stdout", stdout), ("stderr", stderr)):
            assert reaches_terminal(data) is None, f"{name}: {reaches_terminal(data)}"
        assert b"vm-run: " in stderr  # EXIT messages were written, filtered
        for m in messages:
            assert FORBIDDEN_IN_LINE.search(m) is None, repr(m)
        assert max(backlogs, default=0) <= WINDOW  # (the blocking client has no backlog)
        # readiness stayed with the first hello; the farewell is printable text
        assert rig.readiness.hello == rig.first_hello
        assert rig.readiness.hello is not None and rig.readiness.hello.transport == "channel"
        farewell = rig.readiness.farewell or ""
        assert farewell.startswith("owned") and FORBIDDEN_IN_LINE.search(farewell) is None
        assert rig.supervisor_alive() and rig.errors == []
        await rig.stop()

    run(body())


async def _flood(target: Any) -> tuple[str, int]:
    """A flood of stdout into a pipe nobody reads; (vm-run's error, the peak backlog)."""
    r, w = os.pipe()
    with recorded_backlogs() as backlogs:
        try:
            with pytest.raises(ChannelError) as e:
                await run_session(
                    target,
                    ExecRequest(argv=["yes"]),
                    stdin=None,
                    stdout=w,
                    stderr=w,
                    forward_signals=False,
                )
        finally:
            os.close(r)  # the writer thread blocked on the full pipe fails (EPIPE) and ends
            await backlogs.join_writers()
            os.close(w)
    return str(e.value), max(backlogs, default=0)


def flood_frames(sid: int, frames: int) -> list[bytes]:
    return [raw_frame(FrameType.STDOUT, sid, b"y" * CHUNK) for _ in range(frames)] + [
        raw_frame(FrameType.EXIT, sid, b'{"status":0}')
    ]


def test_client_refuses_output_beyond_the_window() -> None:
    """vm-run's client alone (a guest behind vsock is piped to it byte for byte): 4 windows of
    output with no credit into a pipe nobody reads."""

    async def body() -> tuple[str, int]:
        import socket

        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        agent_r, agent_w = await asyncio.open_connection(sock=b)

        async def agent() -> None:
            await StreamLink(agent_r, agent_w).recv()  # the OPEN
            for data in flood_frames(0, 4 * WINDOW // CHUNK):
                agent_w.write(data)
                await agent_w.drain()

        task = asyncio.create_task(agent())
        try:
            return await _flood((reader, writer))
        finally:
            task.cancel()
            agent_w.close()

    message, backlog = run(body(), 60)
    assert "credit window" in message
    assert backlog <= WINDOW


@pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor's room runs as root")
def test_supervisor_relay_refuses_output_beyond_the_window(tmp_path: Path) -> None:
    """The same flood on the virtio-serial mux: the supervisor's session fails, vm-run gets a
    protocol error, and the next session is served."""

    async def body() -> tuple[str, int, int]:
        rig = Rig(tmp_path)
        await rig.start()
        rig.scripts.append(lambda sid: flood_frames(sid, 4 * WINDOW // CHUNK))
        message, backlog = await _flood(str(rig.cmd_path))
        rig.scripts.append(lambda sid: [raw_frame(FrameType.EXIT, sid, b'{"status":7}')])
        status = await run_session(
            str(rig.cmd_path), ExecRequest(argv=["x"]), None, None, None, forward_signals=False
        )
        assert rig.supervisor_alive() and rig.errors == []
        await rig.stop()
        return message, backlog, status

    message, backlog, status = run(body(), 60)
    assert "window" in message
    assert backlog <= WINDOW
    assert status == 7


@pytest.mark.parametrize("client", CLIENTS)
def test_one_filter_per_stream(client: str) -> None:
    """A ``\\xc2`` held back at the end of stdout is neither taken by stderr's next byte nor
    lost to stdout's next frame, whose ``\\x9b`` would then reach the terminal as a C1 CSI."""

    async def body(tmp: Path) -> tuple[bytes, bytes]:
        import socket

        from hostile_rig import Pty

        a, b = socket.socketpair()
        target: Any = a if client == "blocking" else await asyncio.open_connection(sock=a)
        agent_r, agent_w = await asyncio.open_connection(sock=b)
        loop = asyncio.get_running_loop()
        out = Pty(loop)

        async def agent() -> None:
            await StreamLink(agent_r, agent_w).recv()
            for t, p in [
                (FrameType.STDOUT, b"a\xc2"),
                (FrameType.STDERR, b"\xa9"),
                (FrameType.STDOUT, b"\x9b2J"),
            ]:
                agent_w.write(raw_frame(t, 0, p))
            agent_w.write(raw_frame(FrameType.EXIT, 0, b'{"status":0}'))
            await agent_w.drain()

        task = asyncio.create_task(agent())
        with recorded_backlogs() as backlogs:
            status = await session(
                client,
                target,
                ExecRequest(argv=["x"]),
                stdin=None,
                stdout=out.slave,
                stderr=out.slave,  # one terminal for both, as usual
                forward_signals=False,
                new_output_filter=EscapeFilter,
            )
            await task
            agent_w.close()
            assert status == 0
            await backlogs.join_writers()
        data = await out.finish()
        return data, b""

    data, _ = run(body(Path("/")), 30)
    assert reaches_terminal(data) is None, data
    assert b"2J" in data
