"""vm-run's blocking client against a scripted agent on a socket pair (no VM).

What the asyncio client does with threads, the blocking client does in one loop: these pin the
parts where that could differ — stdin held to the agent's credit, output beyond the window,
a reader that stops reading, ``--timeout`` while a write blocks, signals forwarded while a
write blocks — and that both clients give the same outcome for the same frames. The real-VM
behaviour is tests/test_vm_e2e.py's and tests/test_vm_runtime.py's (vm-run runs this client);
the hostile corpus runs through both clients in tests/security/test_hostile_agent.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmsilo.channel import blocking_client
from vmsilo.channel.blocking_client import SIGPIPE_STATUS, SessionTimeout, run_blocking_session
from vmsilo.channel.client import run_session
from vmsilo.channel.protocol import (
    FRAME_COST,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME,
    WINDOW,
    ChannelError,
    ExecRequest,
    FrameType,
    ProtocolVersionError,
    encode_error,
    encode_exit,
    encode_frame,
    encode_u32,
)


class Agent:
    """The far end of the socket pair: reads frames in a thread, runs ``script`` first."""

    def __init__(self, sock: socket.socket, script: Callable[[Agent], None]) -> None:
        self.sock = sock
        self.frames: list[tuple[int, bytes]] = []
        self.eof = threading.Event()
        self.got = threading.Condition()
        self._script = script
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def send(self, ftype: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_frame(ftype, 0, payload))

    def _run(self) -> None:
        # signals sent to the process go to the client's (main) thread, as in vm-run, which
        # has no other thread
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        with contextlib.suppress(OSError):
            self._script(self)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.eof.set()
                with self.got:
                    self.got.notify_all()
                return
            buf += data
            while len(buf) >= HEADER_SIZE:
                _, ftype, length, _ = HEADER.unpack_from(buf)
                if len(buf) < HEADER_SIZE + length:
                    break
                with self.got:
                    self.frames.append((ftype, buf[HEADER_SIZE : HEADER_SIZE + length]))
                    self.got.notify_all()
                buf = buf[HEADER_SIZE + length :]

    def wait_for(
        self, pred: Callable[[list[tuple[int, bytes]]], bool], timeout: float = 10
    ) -> bool:
        with self.got:
            return self.got.wait_for(lambda: pred(self.frames) or self.eof.is_set(), timeout)

    def of(self, ftype: int) -> list[bytes]:
        return [p for t, p in self.frames if t == ftype]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    for s in (a, b):
        s.close()


def test_stdin_is_held_to_the_agents_credit(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    data = os.urandom(3 * WINDOW)

    def script(agent: Agent) -> None:
        # no credit: the client sends at most one window of stdin, then waits
        assert agent.wait_for(
            lambda f: sum(len(p) for t, p in f if t == FrameType.STDIN) >= WINDOW // 2
        )
        time.sleep(0.3)
        sent = agent.of(FrameType.STDIN)
        assert sum(len(p) + FRAME_COST for p in sent) <= WINDOW
        while not agent.wait_for(lambda f: (FrameType.STDIN_EOF, b"") in f, 0.05):
            got = sum(len(p) + FRAME_COST for p in agent.of(FrameType.STDIN))
            agent.send(FrameType.CREDIT, encode_u32(got))  # all of it back, repeatedly
        agent.send(FrameType.EXIT, encode_exit(0))

    def feed() -> None:
        os.write(w, data)
        os.close(w)

    agent = Agent(b, script)
    threading.Thread(target=feed, daemon=True).start()
    # (an assertion failing in the agent's thread ends the session by the timeout)
    status = run_blocking_session(
        a, ExecRequest(argv=["cat"]), stdin=r, stdout=None, stderr=None, timeout=30
    )
    os.close(r)
    assert status == 0
    assert b"".join(agent.of(FrameType.STDIN)) == data


def test_output_beyond_the_window_ends_the_session(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Tiny frames cost FRAME_COST each: two windows' worth with no credit asked for."""
    a, b = pair
    devnull = os.open(os.devnull, os.O_WRONLY)

    def script(agent: Agent) -> None:
        agent.sock.sendall(encode_frame(FrameType.STDOUT, 0, b"y") * (2 * WINDOW // FRAME_COST))

    Agent(b, script)
    with pytest.raises(ChannelError, match="beyond its credit window"):
        run_blocking_session(a, ExecRequest(argv=["yes"]), stdin=None, stdout=devnull)
    os.close(devnull)


def test_a_reader_that_stops_reading_stops_the_guest_and_a_vanished_one_ends_it(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output into a pipe nobody reads: the client blocks on it and reads no more, so the guest's
    flood stays in the guest (vm-run holds at most a window and a frame); once the reader is
    gone the session ends like a shell pipeline's writer (141)."""
    a, b = pair
    r, w = os.pipe()
    held: list[int] = []
    real = blocking_client._Session._read_socket

    def recording(self: Any) -> int | None:
        held.append(len(self._inbuf))
        status = real(self)
        held.append(len(self._inbuf))
        return status

    monkeypatch.setattr(blocking_client._Session, "_read_socket", recording)
    flooded = threading.Event()

    def script(agent: Agent) -> None:
        frame = encode_frame(FrameType.STDOUT, 0, b"y" * 32768)
        for _ in range(64):  # 2 MiB, credit ignored
            agent.sock.sendall(frame)
        flooded.set()

    Agent(b, script)
    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.append(
            run_blocking_session(
                a, ExecRequest(argv=["yes"]), stdin=None, stdout=w, forward_signals=False
            )
        ),
        daemon=True,
    )
    t.start()
    assert not flooded.wait(1.5)  # the agent could not get its flood out
    assert max(held) <= WINDOW + MAX_FRAME
    os.close(r)
    t.join(10)
    os.close(w)
    assert result == [SIGPIPE_STATUS]


def test_timeout_hangs_up_even_while_a_write_blocks(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    r, w = os.pipe()

    def script(agent: Agent) -> None:
        agent.sock.sendall(encode_frame(FrameType.STDOUT, 0, b"y" * 32768) * 4)

    agent = Agent(b, script)
    before = signal.getsignal(signal.SIGALRM)
    t = time.monotonic()
    with pytest.raises(SessionTimeout):
        run_blocking_session(a, ExecRequest(argv=["yes"]), stdin=None, stdout=w, timeout=0.5)
    assert 0.4 < time.monotonic() - t < 5
    assert agent.eof.wait(5)  # hung up: the agent sees the connection end
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    os.close(r)
    os.close(w)


def test_signals_are_forwarded_even_while_a_write_blocks(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    r, w = os.pipe()

    def script(agent: Agent) -> None:
        agent.sock.sendall(encode_frame(FrameType.STDOUT, 0, b"y" * 32768) * 4)
        time.sleep(0.5)  # the client is blocked writing into the full pipe by now
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert agent.wait_for(lambda f: len([t for t, _ in f if t == FrameType.SIGNAL]) == 2)
        os.close(r)  # the reader goes: the write fails and the session ends
        agent.send(FrameType.EXIT, encode_exit(130))

    agent = Agent(b, script)
    before = signal.getsignal(signal.SIGINT)
    status = run_blocking_session(a, ExecRequest(argv=["yes"]), stdin=None, stdout=w, timeout=30)
    os.close(w)
    assert status == SIGPIPE_STATUS
    assert agent.of(FrameType.SIGNAL) == [bytes([signal.SIGINT]), bytes([signal.SIGTERM])]
    assert signal.getsignal(signal.SIGINT) is before


SCRIPTS: dict[str, list[bytes]] = {
    "output and status": [
        encode_frame(FrameType.STDOUT, 0, b"out\n"),
        encode_frame(FrameType.STDERR, 0, b"err\n"),
        encode_frame(FrameType.EXIT, 0, encode_exit(3)),
    ],
    "the agent's message": [encode_frame(FrameType.EXIT, 0, encode_exit(127, "x: not found"))],
    "an error frame": [encode_frame(FrameType.ERROR, 0, encode_error("x", "no \x1b[2J way"))],
    "another version": [encode_frame(FrameType.ERROR, 0, encode_error("version", "v", 9))],
    "an unknown frame": [encode_frame(0x3F, 0, b"")],
    "a bad exit": [encode_frame(FrameType.EXIT, 0, b"[]")],
    "a lost link": [encode_frame(FrameType.STDOUT, 0, b"partial")],
    "a frame cut short": [encode_frame(FrameType.STDOUT, 0, b"cut")[:-1]],
}


def outcome(client: str, frames: list[bytes]) -> tuple[object, bytes, bytes]:
    """(status or the error's type and text, stdout, stderr) of one session with ``client``."""
    a, b = socket.socketpair()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    def script(agent: Agent) -> None:
        agent.wait_for(lambda f: bool(f))
        for frame in frames:
            agent.sock.sendall(frame)
        agent.sock.shutdown(socket.SHUT_WR)

    Agent(b, script)
    kw: dict[str, Any] = {"stdin": None, "stdout": out_w, "stderr": err_w}
    try:
        if client == "blocking":
            result: object = run_blocking_session(a, ExecRequest(argv=["x"]), **kw)
        else:

            async def go() -> int:
                return await run_session(
                    await asyncio.open_connection(sock=a), ExecRequest(argv=["x"]), **kw
                )

            result = asyncio.run(go())
    except ChannelError as e:
        result = (type(e).__name__, str(e))
    finally:
        a.close()
        b.close()
        os.close(out_w)
        os.close(err_w)
    out, err = os.read(out_r, 65536), os.read(err_r, 65536)
    os.close(out_r)
    os.close(err_r)
    return result, out, err


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_both_clients_give_the_same_outcome(name: str) -> None:
    blocking = outcome("blocking", SCRIPTS[name])
    assert blocking == outcome("asyncio", SCRIPTS[name])
    if name == "another version":
        assert blocking[0] == ("ProtocolVersionError", str(ProtocolVersionError(1, 9)))
