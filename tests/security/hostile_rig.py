"""A hostile guest agent in process, for the SPEC §11.2 attack tests.

:class:`Rig` wires the real supervisor side — :class:`~vmsilo.supervisor.readiness.Readiness`
(ready port and channel mux), :class:`~vmsilo.supervisor.sessions.Sessions` on a real command
socket, the mux relay — to a fake agent that speaks raw bytes on socketpairs, and runs the real
``vm-run`` client (:func:`~vmsilo.channel.client.run_session`) against the command socket with
a pty for stdout and one for stderr, so that its escape filters run as they do for a user.
What reaches each pty is collected in full (a sentinel written after the last session marks
the end, so nothing is waited for by time).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import tty
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vmsilo.channel.mux import read_frame
from vmsilo.channel.protocol import HEADER, FrameType, encode_ready
from vmsilo.supervisor.readiness import Readiness
from vmsilo.supervisor.sessions import Sessions

#: What must never reach a terminal from a guest: C0 controls but tab/LF/CR, DEL, the C1
#: controls as UTF-8 (U+0080–U+009F) and as lone bytes (surrogateescape: U+DC80–U+DC9F).
FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\udc80-\udc9f]")
#: In a one-line message: newline and tab too.
FORBIDDEN_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
SENTINEL = b"<<end of the attack>>"


def raw_frame(ftype: int, sid: int, payload: bytes = b"", version: int = 1) -> bytes:
    """A frame as a hostile agent may write it: any version, type and (≤ u16) payload."""
    return HEADER.pack(version, ftype, len(payload), sid) + payload


def reaches_terminal(data: bytes) -> str | None:
    """The first forbidden character in ``data`` and its context, or None."""
    text = data.decode("utf-8", "surrogateescape")
    m = FORBIDDEN.search(text)
    if m is None:
        return None
    return f"{m.group()!r} at {m.start()}: {text[max(0, m.start() - 40) : m.end() + 40]!r}"


class Pty:
    """A raw pty whose master is drained into :attr:`data` by the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.data = bytearray()
        self.loop = loop
        self._done = asyncio.Event()
        os.set_blocking(self.master, False)
        loop.add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except (BlockingIOError, OSError):
            return
        self.data += chunk
        if SENTINEL in self.data[-len(SENTINEL) - len(chunk) :]:
            self._done.set()

    async def finish(self) -> bytes:
        """Everything written so far (a sentinel goes after it and is cut off again)."""
        os.write(self.slave, SENTINEL)
        await self._done.wait()
        self.loop.remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)
        return bytes(self.data[: self.data.index(SENTINEL)])


Script = Callable[[int], list[bytes]]


class Rig:
    """The supervisor side of one VM plus a fake agent; see the module docstring."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cmd_path = tmp / "command.sock"
        self.readiness = Readiness("hostile")
        vm = SimpleNamespace(name="hostile", id=3)
        self.sessions = Sessions(vm, self.readiness, lambda: None)  # type: ignore[arg-type]
        self.scripts: deque[Script] = deque()
        self.frames_sent = 0
        self.errors: list[str] = []  # exceptions the loop saw in any task
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _l, ctx: self.errors.append(str(ctx)))
        chan_host, chan_guest = socket.socketpair()
        ready_host, self.ready_guest = socket.socketpair()
        r, w = await asyncio.open_connection(sock=chan_host, limit=1 << 20)
        self.channel_task = loop.create_task(self.readiness.on_channel_port(r, w))
        r, w = await asyncio.open_connection(sock=ready_host, limit=1 << 20)
        self.ready_task = loop.create_task(self.readiness.on_ready_port(r, w))
        self.guest_reader, self.guest_writer = await asyncio.open_connection(sock=chan_guest)
        self.agent_task = loop.create_task(self._agent())
        self.server = await asyncio.start_unix_server(
            self.sessions.on_client, path=str(self.cmd_path), limit=1 << 20
        )
        self.ready_guest.setblocking(False)
        await self.say(encode_ready("channel", 42))
        await self.readiness.ready.wait()
        self.first_hello = self.readiness.hello
        self.readiness.operational.set()

    async def say(self, data: bytes) -> None:
        """Write ``data`` to the ready port, as guest root may."""
        await asyncio.get_running_loop().sock_sendall(self.ready_guest, data)

    async def _agent(self) -> None:
        """The guest end of the channel: every OPEN gets the next script's frames."""
        while (frame := await read_frame(self.guest_reader)) is not None:
            if frame.type != FrameType.OPEN:
                continue  # credit, EOF, reset: a hostile agent ignores them
            script = self.scripts.popleft()
            for data in script(frame.session):
                self.guest_writer.write(data)
                self.frames_sent += 1
                await self.guest_writer.drain()

    def supervisor_alive(self) -> bool:
        return not (self.channel_task.done() or self.ready_task.done() or self.agent_task.done())

    async def stop(self) -> None:
        self.server.close()
        for t in (self.agent_task, self.channel_task, self.ready_task):
            t.cancel()
        self.ready_guest.close()
        self.guest_writer.close()


class Backlogs(list[int]):
    """Writer backlogs seen, and the writers (their threads outlive a session)."""

    writers: list[Any]

    async def join_writers(self) -> None:
        """Wait until every writer thread is gone: only then may its descriptor be closed
        (closed earlier, a new socket could take its number and get the rest)."""
        for w in self.writers:
            await asyncio.to_thread(w._thread.join)


@contextmanager
def recorded_backlogs() -> Iterator[Backlogs]:
    """The writer backlog of vm-run's client after every chunk it took (bytes not written)."""
    from vmsilo.channel import client

    seen = Backlogs()
    seen.writers = []
    original = client._ThreadWriter.submit

    def submit(self: Any, data: bytes, cost: int) -> None:
        original(self, data, cost)
        seen.append(self.backlog)
        if self not in seen.writers:
            seen.writers.append(self)

    client._ThreadWriter.submit = submit  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        client._ThreadWriter.submit = original  # type: ignore[method-assign]


def u32(n: int) -> bytes:
    return struct.pack("!I", n)
