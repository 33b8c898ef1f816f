"""End to end on the host: real agent process ↔ real sockets ↔ mux ↔ relay ↔ client library.

The agent runs as a subprocess under Debian's python3 with ``-S`` (no site-packages), the way
it runs in the guest, so an accidental non-stdlib import fails here. The test process plays the
supervisor: it listens on the channel and ready sockets (as the VMM's chardevs would connect),
runs :class:`ChannelMux` on the channel connection, serves a real command socket with
:func:`relay_client`, and drives sessions through :func:`run_session` with real pipes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vmsilo.channel import ChannelMux, ExecRequest, parse_ready, relay_client
from vmsilo.channel.client import run_session
from vmsilo.channel.mux import StreamLink
from vmsilo.channel.protocol import (
    PROTOCOL_VERSION,
    QUEUE_LIMIT,
    WINDOW,
    ChannelError,
    FrameType,
    ProtocolVersionError,
    decode_error,
    decode_exit,
    encode_frame,
)

SRC = Path(__file__).resolve().parent.parent / "src"
GUEST_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from vmsilo.guest.agent import main; "
    "sys.exit(main(sys.argv[1:]))"
)
PY = "python3"  # the program run *inside* the "guest" (resolved with the agent's PATH)
ARGV_JSON = "import sys, json; sys.stdout.write(json.dumps(sys.argv[1:]))"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent drops privileges: root")

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class Host:
    """The supervisor side of one agent, plus helpers to run sessions."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.chan_path = tmp / "channel.sock"
        self.ready_path = tmp / "ready.sock"
        self.cmd_path = tmp / "command.sock"
        self.proc: asyncio.subprocess.Process | None = None
        self.mux: ChannelMux | None = None
        self.hello: Any = None
        self._servers: list[asyncio.Server] = []

    async def start(self, *agent_args: str) -> None:
        loop = asyncio.get_running_loop()
        chan_fut: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        chan_fut = loop.create_future()
        ready_fut: asyncio.Future[bytes] = loop.create_future()

        async def on_chan(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if not chan_fut.done():
                chan_fut.set_result((r, w))

        async def on_ready(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            line = await r.readline()
            if not ready_fut.done():
                ready_fut.set_result(line)
            w.close()

        self._servers.append(await asyncio.start_unix_server(on_chan, path=str(self.chan_path)))
        self._servers.append(await asyncio.start_unix_server(on_ready, path=str(self.ready_path)))
        self.proc = await asyncio.create_subprocess_exec(
            GUEST_PYTHON,
            "-S",
            "-c",
            BOOT,
            str(SRC),
            "--channel-path",
            str(self.chan_path),
            "--ready-path",
            str(self.ready_path),
            "--user",
            "0:0",
            "--log-level",
            "WARNING",
            *agent_args,
        )
        reader, writer = await chan_fut
        self.mux = ChannelMux(reader, writer, name="host-mux")
        self.mux.start()
        self.hello = parse_ready(await ready_fut)
        mux = self.mux
        self._servers.append(
            await asyncio.start_unix_server(
                lambda r, w: relay_client(r, w, mux), path=str(self.cmd_path)
            )
        )

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        if self.mux is not None:
            await self.mux.aclose()
        if self.proc is not None and self.proc.returncode is None:
            # Closing the channel makes the agent exit 1; don't wait forever for it.
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def exec(
        self,
        argv: list[str | bytes],
        stdin: bytes | None = b"",
        *,
        read_output: bool = True,
        **req: Any,
    ) -> tuple[int, bytes, bytes]:
        """Run argv through the command socket with real pipes; (status, stdout, stderr)."""
        request = ExecRequest(argv=argv, **req)
        return await run_with_pipes(str(self.cmd_path), request, stdin, read_output=read_output)


async def _read_all(fd: int) -> bytes:
    """Read a pipe's read end to EOF on the event loop (the test's end: non-blocking is fine)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    f = os.fdopen(fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), f)
    try:
        return await reader.read()
    finally:
        transport.close()


def _feed(fd: int, data: bytes) -> threading.Thread:
    def work() -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view[: 1 << 16])
                view = view[n:]
        except OSError:
            pass
        finally:
            os.close(fd)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


async def run_with_pipes(
    target: Any, request: ExecRequest, stdin: bytes | None, *, read_output: bool = True
) -> tuple[int, bytes, bytes]:
    in_fd: int | None = None
    if stdin is not None:
        in_r, in_w = os.pipe()
        _feed(in_w, stdin)
        in_fd = in_r
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    readers = (
        [asyncio.create_task(_read_all(out_r)), asyncio.create_task(_read_all(err_r))]
        if read_output
        else []
    )
    try:
        status = await run_session(target, request, in_fd, out_w, err_w, forward_signals=False)
    finally:
        os.close(out_w)
        os.close(err_w)
        if in_fd is not None:
            os.close(in_fd)
    if not read_output:
        os.close(out_r)
        os.close(err_r)
        return status, b"", b""
    out, err = await asyncio.gather(*readers)
    return status, out, err


async def fifo_line(path: Path) -> bytes:
    """Wait (event-driven) for one line written to the FIFO at ``path`` by the guest program.

    Opened read-write so that it never reports EOF while no writer is attached yet.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_NONBLOCK), "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), f)
    try:
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def host_ctx(tmp: Path, *agent_args: str) -> AsyncIterator[Host]:
    host = Host(tmp)
    try:
        await host.start(*agent_args)
        yield host
    finally:
        await host.stop()


def with_host(tmp: Path, body: Callable[[Host], Awaitable[T]], timeout: float = 60) -> T:
    async def main() -> T:
        async with host_ctx(tmp) as host:
            return await body(host)

    return run(main(), timeout)


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths are limited to 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="vmsilo-t"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- tests


def test_hello_and_true(tmp: Path) -> None:
    async def body(h: Host) -> None:
        assert h.hello.version == PROTOCOL_VERSION
        assert h.hello.transport == "channel"
        status, out, err = await h.exec(["true"])
        assert (status, out, err) == (0, b"", b"")

    with_host(tmp, body)


WEIRD_ARGS = [
    "a b",
    "",
    "'single'",
    '"double"',
    "$HOME",
    "a;b",
    "*",
    "line1\nline2",
    "-n",
    "--",
    "grüße ☃",
    "back\\slash",
    " lead and trail ",
    "$(echo x)`echo y`",
]


def test_argv_byte_for_byte(tmp: Path) -> None:
    async def body(h: Host) -> None:
        status, out, err = await h.exec([PY, "-c", ARGV_JSON, *WEIRD_ARGS])
        assert status == 0, err
        assert json.loads(out) == WEIRD_ARGS
        # Non-UTF-8 bytes survive too, through printf (which does not reinterpret %s args).
        raw = b"\xff\xfe-\x80 x"
        status, out, _ = await h.exec(["printf", "%s|", raw, "", "-e"])
        assert status == 0
        assert out == raw + b"||-e|"

    with_host(tmp, body)


def test_exit_statuses(tmp: Path) -> None:
    script = tmp / "noexec.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)

    async def body(h: Host) -> None:
        assert (await h.exec(["sh", "-c", "exit 0"]))[0] == 0
        assert (await h.exec(["sh", "-c", "exit 3"]))[0] == 3
        status, _, err = await h.exec(["no-such-program-vmsilo"])
        assert status == 127
        assert b"not found" in err
        assert (await h.exec([str(script)]))[0] == 126
        assert (await h.exec(["sh", "-c", "kill -TERM $$"]))[0] == 143
        assert (await h.exec(["true"], cwd="/no/such/dir"))[0] == 126

    with_host(tmp, body)


def test_stdout_stderr_separate_and_env_cwd_user(tmp: Path) -> None:
    async def body(h: Host) -> None:
        status, out, err = await h.exec(
            ["sh", "-c", 'echo out; echo err >&2; echo "$FOO|$(pwd)"'],
            env=["FOO=a b=c"],
            cwd="/tmp",
        )
        assert status == 0
        assert out == b"out\na b=c|/tmp\n"
        assert err == b"err\n"
        status, out, _ = await h.exec(["id", "-u"], user="nobody")
        assert status == 0
        assert out.strip() == str(65534).encode()
        status, out, _ = await h.exec(["id", "-u"], user="root")
        assert out.strip() == b"0"

    with_host(tmp, body)


def test_sha256_of_10mb_stdin(tmp: Path) -> None:
    data = os.urandom(10 * 1024 * 1024)

    async def body(h: Host) -> float:
        t0 = time.monotonic()
        status, out, _ = await h.exec(["sha256sum"], stdin=data)
        elapsed = time.monotonic() - t0
        assert status == 0
        assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        # And the other direction: 10 MB of output.
        t0 = time.monotonic()
        status, out, _ = await h.exec(["head", "-c", str(len(data)), "/dev/zero"])
        assert status == 0 and out == bytes(len(data))
        return elapsed

    elapsed = with_host(tmp, body, timeout=120)
    print(f"10 MB stdin through sha256sum: {elapsed:.2f} s ({10 / elapsed:.1f} MB/s)")


def test_stdin_eof_half_close(tmp: Path) -> None:
    async def body(h: Host) -> None:
        # cat echoes, exits on EOF; its stdout keeps flowing after our stdin closed.
        status, out, _ = await h.exec(["sh", "-c", "cat; echo after-eof"], stdin=b"hello\nworld\n")
        assert status == 0
        assert out == b"hello\nworld\nafter-eof\n"
        status, out, _ = await h.exec(["cat"], stdin=None)
        assert (status, out) == (0, b"")

    with_host(tmp, body)


def test_twenty_concurrent_sessions(tmp: Path) -> None:
    async def body(h: Host) -> None:
        async def one(i: int) -> None:
            payload = os.urandom(100_000 + i)
            status, out, err = await h.exec(
                ["sh", "-c", f"sha256sum; echo {i} >&2; exit {i}"], stdin=payload
            )
            assert status == i
            assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()
            assert err == f"{i}\n".encode()

        await asyncio.gather(*(one(i) for i in range(20)))
        assert h.mux is not None
        assert h.mux.session_count == 0

    with_host(tmp, body, timeout=120)


def test_slow_reader_does_not_stall_others(tmp: Path) -> None:
    """A session whose client never reads keeps at most a window in the relay; others flow."""

    async def body(h: Host) -> None:
        assert h.mux is not None
        # A raw client that opens `yes` and never reads its socket nor returns credit.
        reader, writer = await asyncio.open_unix_connection(str(h.cmd_path))
        stuck = StreamLink(reader, writer)
        await stuck.send(FrameType.OPEN, ExecRequest(argv=["yes"]).encode())
        # Meanwhile another session moves 5 MB through.
        data = os.urandom(5 * 1024 * 1024)
        status, out, _ = await h.exec(["sha256sum"], stdin=data)
        assert status == 0
        assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        sessions = list(h.mux._sessions.values())
        assert len(sessions) == 1
        # The relay holds at most the window (the agent may send no more without credit) ...
        assert sessions[0].queued_cost <= WINDOW <= QUEUE_LIMIT
        # ... and everything `yes` got out so far is within one window, though it ran
        # throughout the other transfer: it is blocked on credit, not buffered somewhere.
        received = 0
        while True:
            try:
                frame = await asyncio.wait_for(stuck.recv(), 0.5)
            except TimeoutError:
                break
            assert frame is not None and frame.type == FrameType.STDOUT
            received += len(frame.payload)
        assert WINDOW // 2 < received <= WINDOW
        await stuck.aclose()

    with_host(tmp, body)


def test_slow_pipe_reader_client_library(tmp: Path) -> None:
    """Same with the client library: its stdout pipe is never read, another session proceeds."""

    async def body(h: Host) -> None:
        out_r, out_w = os.pipe()
        stuck = asyncio.create_task(
            run_session(
                str(h.cmd_path),
                ExecRequest(argv=["yes"]),
                None,
                out_w,
                None,
                forward_signals=False,
            )
        )
        data = os.urandom(2 * 1024 * 1024)
        status, out, _ = await h.exec(["sha256sum"], stdin=data)
        assert status == 0
        assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        assert not stuck.done()
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stuck
        os.close(out_r)  # unblocks the writer thread (EPIPE)
        os.close(out_w)

    with_host(tmp, body)


def test_malformed_frame_kills_only_its_session(tmp: Path) -> None:
    async def body(h: Host) -> None:
        other = asyncio.create_task(h.exec(["sh", "-c", "read x; echo got $x"], stdin=None))
        # A bad session: valid OPEN of a long sleep, then a frame of an unknown type.
        reader, writer = await asyncio.open_unix_connection(str(h.cmd_path))
        bad = StreamLink(reader, writer)
        await bad.send(FrameType.OPEN, ExecRequest(argv=["sleep", "100"]).encode())
        writer.write(encode_frame(0xEE, 0, b"garbage"))
        await writer.drain()
        frame = await bad.recv()
        assert frame is not None and frame.type == FrameType.ERROR
        await bad.aclose()
        # A session whose OPEN payload is not JSON gets an ERROR from the agent itself.
        reader, writer = await asyncio.open_unix_connection(str(h.cmd_path))
        bad2 = StreamLink(reader, writer)
        await bad2.send(FrameType.OPEN, b"{not json")
        frame = await bad2.recv()
        assert frame is not None and frame.type == FrameType.ERROR
        await bad2.aclose()
        # A client overrunning its stdin window: the agent ends that session only.
        reader, writer = await asyncio.open_unix_connection(str(h.cmd_path))
        bad3 = StreamLink(reader, writer)
        await bad3.send(FrameType.OPEN, ExecRequest(argv=["sleep", "100"]).encode())
        chunk = b"x" * 32768
        # `sleep` never reads; the pipe and the agent's pipe transport absorb some, which the
        # agent credits back, but two windows without waiting for credit are a violation.
        for _ in range(2 * WINDOW // len(chunk)):
            await bad3.send(FrameType.STDIN, chunk)
        frame = await bad3.recv()
        while frame is not None and frame.type == FrameType.CREDIT:
            frame = await bad3.recv()
        assert frame is not None and frame.type == FrameType.ERROR
        await bad3.aclose()
        # Meanwhile the other session still works.
        status, out, _ = await h.exec(["echo", "still", "fine"])
        assert (status, out) == (0, b"still fine\n")
        other.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await other

    with_host(tmp, body)


def test_version_mismatch(tmp: Path) -> None:
    async def body(h: Host) -> None:
        # A client speaking another version gets a version error (vm-run: 255, rebuild hint).
        with pytest.raises(ProtocolVersionError) as ei:
            await h.exec(["true"], version=PROTOCOL_VERSION + 1)
        assert "rebuild the image" in str(ei.value)

    with_host(tmp, body)


def test_client_disconnect_sends_sighup(tmp: Path) -> None:
    fifo = tmp / "hup"
    os.mkfifo(fifo)
    script = f"trap 'echo hup > {fifo}; exit 0' HUP; echo started; while :; do sleep 0.05; done"

    async def body(h: Host) -> None:
        reader, writer = await asyncio.open_unix_connection(str(h.cmd_path))
        link = StreamLink(reader, writer)
        await link.send(FrameType.OPEN, ExecRequest(argv=["sh", "-c", script]).encode())
        frame = await link.recv()
        assert frame is not None and frame.payload == b"started\n"
        got = asyncio.create_task(fifo_line(fifo))
        await link.aclose()  # vm-run died
        assert await got == b"hup\n"

    with_host(tmp, body)


def test_signal_forwarding(tmp: Path) -> None:
    async def body(h: Host) -> None:
        reader, writer = await asyncio.open_unix_connection(str(h.cmd_path))
        link = StreamLink(reader, writer)
        await link.send(
            FrameType.OPEN,
            ExecRequest(argv=["sh", "-c", "echo up; exec sleep 100"]).encode(),
        )
        frame = await link.recv()
        assert frame is not None and frame.payload == b"up\n"
        await link.send(FrameType.SIGNAL, bytes([signal.SIGINT]))
        frame = await link.recv()
        while frame is not None and frame.type == FrameType.CREDIT:
            frame = await link.recv()
        assert frame is not None and frame.type == FrameType.EXIT
        assert decode_exit(frame.payload)[0] == 128 + signal.SIGINT
        await link.aclose()

    with_host(tmp, body)


def test_signal_forwarding_when_the_agent_inherited_ignored_signals(tmp: Path) -> None:
    """Started as a shell's background job (SIGINT/SIGQUIT ignored, which exec keeps), the
    agent must still give its programs the default handlers: a forwarded SIGINT ends them."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        test_signal_forwarding(tmp)
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def test_detach(tmp: Path) -> None:
    fifo = tmp / "detached"
    os.mkfifo(fifo)

    async def body(h: Host) -> None:
        got = asyncio.create_task(fifo_line(fifo))
        t0 = time.monotonic()
        # The program takes 0.5 s before it reports: --detach must return well before that.
        status, out, err = await h.exec(["sh", "-c", f"sleep 0.5; echo done > {fifo}"], detach=True)
        assert status == 0 and out == b"" and err == b""
        assert time.monotonic() - t0 < 0.45
        assert not got.done()
        status, _, _ = await h.exec(["no-such-program-vmsilo"], detach=True)
        assert status == 127
        # The detached program still runs and finishes on its own.
        assert await got == b"done\n"

    with_host(tmp, body)


def test_tty(tmp: Path) -> None:
    async def body(h: Host) -> None:
        status, out, _ = await h.exec(["tty"], tty=True, rows=33, cols=101)
        assert status == 0, out
        assert out.startswith(b"/dev/pts/")
        status, out, _ = await h.exec(["stty", "size"], tty=True, rows=33, cols=101)
        assert status == 0
        assert out == b"33 101\r\n"
        status, out, _ = await h.exec(["sh", "-c", "echo $TERM"], tty=True, term="vt100")
        assert out == b"vt100\r\n"
        status, out, _ = await h.exec(["tty"])
        assert status == 1  # not a tty without -t

    with_host(tmp, body)


def test_tty_with_local_terminal(tmp: Path) -> None:
    """-t through the client library with a real local terminal: raw mode, size, restore."""
    import fcntl
    import struct
    import termios

    async def body(h: Host) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 77, 0, 0))
        before = termios.tcgetattr(slave)
        try:
            seen_raw: list[bool] = []

            def check_raw(data: bytes) -> bytes:
                # the escape-filter hook runs only for output going to a terminal: the slave
                seen_raw.append(not termios.tcgetattr(slave)[3] & termios.ICANON)
                return data

            os.write(master, b"typed\n")
            task = asyncio.create_task(
                run_session(
                    str(h.cmd_path),
                    ExecRequest(argv=["sh", "-c", "stty size; head -n1"], tty=True),
                    slave,
                    slave,
                    slave,
                    forward_signals=True,
                    tty_fd=slave,
                    new_output_filter=lambda: check_raw,
                )
            )
            status = await task
            os.set_blocking(master, False)
            out = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                out += chunk
            assert status == 0
            assert b"24 77\r\n" in out  # (the guest pty also echoes what was typed)
            assert b"typed" in out
            assert seen_raw and all(seen_raw)
            assert termios.tcgetattr(slave) == before
        finally:
            os.close(master)
            os.close(slave)

    with_host(tmp, body)


def test_tty_winsize_change(tmp: Path) -> None:
    async def body(h: Host) -> None:
        reader, writer = await asyncio.open_unix_connection(str(h.cmd_path))
        link = StreamLink(reader, writer)
        script = "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done"
        await link.send(
            FrameType.OPEN,
            ExecRequest(argv=["sh", "-c", script], tty=True, rows=10, cols=20).encode(),
        )
        got = b""
        while b"ready" not in got:
            frame = await link.recv()
            assert frame is not None and frame.type == FrameType.STDOUT
            got += frame.payload
        await link.send(FrameType.WINSIZE, (40).to_bytes(2, "big") + (120).to_bytes(2, "big"))
        got = b""
        while True:
            frame = await link.recv()
            assert frame is not None
            if frame.type == FrameType.EXIT:
                break
            if frame.type == FrameType.STDOUT:
                got += frame.payload
        assert b"40 120" in got
        await link.aclose()

    with_host(tmp, body)


def test_channel_loss_is_a_channel_error(tmp: Path) -> None:
    async def main() -> None:
        host = Host(tmp)
        await host.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(host.cmd_path))
            link = StreamLink(reader, writer)
            await link.send(
                FrameType.OPEN, ExecRequest(argv=["sh", "-c", "echo up; sleep 100"]).encode()
            )
            frame = await link.recv()
            assert frame is not None and frame.payload == b"up\n"
            assert host.proc is not None
            host.proc.kill()
            frame = await link.recv()
            assert frame is not None and frame.type == FrameType.ERROR
            with pytest.raises(ChannelError, match="lost"):
                raise decode_error(frame.payload)
            await link.aclose()
            # And through the client library, against a dead channel:
            with pytest.raises(ChannelError):
                await host.exec(["true"])
        finally:
            await host.stop()

    run(main())


def test_auto_shutdown(tmp: Path) -> None:
    async def main() -> None:
        host = Host(tmp)
        await host.start("--auto-shutdown-after", "0.5")
        try:
            # A session in progress holds the agent up beyond the idle time.
            status, _, _ = await host.exec(["sleep", "0.8"])
            assert status == 0
            assert host.proc is not None and host.proc.returncode is None
            # A detached program counts as a session until it exits.
            status, _, _ = await host.exec(["sleep", "1"], detach=True)
            assert status == 0
            t0 = time.monotonic()
            rc = await asyncio.wait_for(host.proc.wait(), 10)
            assert rc == 0  # 0 = power off
            assert 1.3 < time.monotonic() - t0 < 3
        finally:
            await host.stop()

    run(main())


def test_round_trip_figure(tmp: Path) -> None:
    async def body(h: Host) -> float:
        await h.exec(["true"])
        n = 20
        t0 = time.monotonic()
        for _ in range(n):
            assert (await h.exec(["true"]))[0] == 0
        return (time.monotonic() - t0) / n

    per = with_host(tmp, body)
    print(f"round trip of `true` over the mux: {per * 1000:.1f} ms")
    assert per < 1.0


def test_per_connection_transport_vsock_style(tmp: Path) -> None:
    """The vsock shape: one stream per session, relayed by plain piping (relay_to_agent).

    The agent side runs in-process (Agent.handle_link on a StreamLink), which is exactly what
    the agent does per accepted vsock connection; the host side pipes a command-socket
    connection to it and vm-run's library talks through an already connected stream pair.
    """
    import socket as socketmod

    from vmsilo.channel.relay import relay_to_agent
    from vmsilo.guest.agent import Agent

    async def main() -> None:
        agent = Agent(0, 0)
        agent.start()
        up_a, up_b = socketmod.socketpair()  # "vsock connection": relay end, agent end
        cl_a, cl_b = socketmod.socketpair()  # "command socket": client end, supervisor end
        ar, aw = await asyncio.open_connection(sock=up_b)
        served = asyncio.create_task(agent.handle_link(StreamLink(ar, aw)))
        up_a.setblocking(False)
        sr, sw = await asyncio.open_connection(sock=cl_b)
        relay = asyncio.create_task(relay_to_agent(sr, sw, up_a))
        cr, cw = await asyncio.open_connection(sock=cl_a)
        status, out, err = await run_with_pipes(
            (cr, cw), ExecRequest(argv=[PY, "-c", ARGV_JSON, *WEIRD_ARGS]), b""
        )
        assert status == 0, err
        assert json.loads(out) == WEIRD_ARGS
        await asyncio.wait_for(served, 10)
        await asyncio.wait_for(relay, 10)
        assert agent.live_sessions == 0

    run(main())


def test_the_agents_last_frames_survive_a_client_frame_it_no_longer_reads() -> None:
    """The agent takes nothing more once it ends a session; the client's late CREDIT then
    meets a socket that refuses it (EPIPE). What the agent sends (its last output, its EXIT)
    must still reach the client: the relay once ended both directions at that write error
    ("the connection to the VM was lost", about one session in ten after a crosvm resume)."""
    import socket as socketmod

    from vmsilo.channel.mux import read_frame
    from vmsilo.channel.protocol import FrameType, encode_exit, encode_frame, encode_u32
    from vmsilo.channel.relay import relay_to_agent

    async def main() -> None:
        up_a, up_b = socketmod.socketpair()  # "vsock connection": relay end, agent end
        cl_a, cl_b = socketmod.socketpair()  # "command socket": client end, supervisor end
        up_a.setblocking(False)
        up_b.shutdown(socketmod.SHUT_RD)  # the agent takes no more: writes to it fail (EPIPE)
        cr, cw = await asyncio.open_connection(sock=cl_a)
        cw.write(encode_frame(FrameType.CREDIT, 0, encode_u32(4096)))  # the late frame
        await cw.drain()
        sr, sw = await asyncio.open_connection(sock=cl_b)
        relay = asyncio.create_task(relay_to_agent(sr, sw, up_a))
        await asyncio.sleep(0.2)  # (the relay tries the late frame: it fails)
        last = encode_frame(FrameType.STDOUT, 0, b"last words\n")
        try:  # the relay must still hold the agent's connection, and read what comes
            up_b.sendall(last + encode_frame(FrameType.EXIT, 0, encode_exit(0)))
        except BrokenPipeError:
            pytest.fail("the relay closed the agent's connection at the client's late frame")
        got = []
        while (frame := await asyncio.wait_for(read_frame(cr), 10)) is not None:
            got.append((frame.type, frame.payload))
            if frame.type == FrameType.EXIT:
                break
        assert got[0] == (FrameType.STDOUT, b"last words\n")
        assert [t for t, _ in got] == [FrameType.STDOUT, FrameType.EXIT]
        up_b.close()  # the agent is done: the relay ends, the client sees the end
        await asyncio.wait_for(relay, 10)
        assert await asyncio.wait_for(cr.read(), 10) == b""
        cw.close()

    run(main())
