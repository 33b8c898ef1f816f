"""The host client library behind ``vm-run``: one session over the VM's command socket.

:func:`run_session` connects, sends the :class:`~vmsilo.channel.protocol.ExecRequest`, relays
the caller's stdin/stdout/stderr file descriptors, forwards signals (and the window size with
``tty``) and returns the exit status vm-run should exit with. Any failure of the channel itself
raises :class:`~vmsilo.channel.protocol.ChannelError` (vm-run: exit 255 with its message and
hint; :class:`~vmsilo.channel.protocol.ProtocolVersionError` carries "rebuild the image").

The caller's descriptors are used with blocking I/O in daemon threads, never switched to
non-blocking mode: stdin and stdout are often a terminal or pipe shared with the user's shell,
and flipping O_NONBLOCK on them would break the shell after vm-run exits. The threads hand data
to the event loop one chunk at a time, so the client itself never buffers more than a chunk of
stdin plus the flow-control window of output. Credit for output goes back to the agent only
after the bytes were written, which is what makes a slow consumer slow down the guest program.

The window is enforced, not just offered (SPEC §11.2): output costing more than the window plus
the credit returned so far is a protocol error that ends the session, so a guest flooding a slow
stdout cannot grow vm-run's memory. Guest text that reaches the terminal — output without
``-t``, each stream through its own escape filter, and the EXIT/ERROR messages always — is
filtered of terminal controls.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import signal
import termios
import threading
import tty as ttymod
from collections.abc import Callable
from typing import Any

from vmsilo.channel.blocking_client import SIGPIPE_STATUS as SIGPIPE_STATUS
from vmsilo.channel.blocking_client import write_all as _write_all
from vmsilo.channel.escapes import printable
from vmsilo.channel.mux import StreamLink
from vmsilo.channel.protocol import (
    CHUNK,
    FORWARDED_SIGNALS,
    FRAME_COST,
    WINDOW,
    ChannelError,
    ExecRequest,
    FrameType,
    ProtocolError,
    ProtocolVersionError,
    decode_error,
    decode_exit,
    decode_u32,
    encode_signal,
    encode_u32,
    encode_winsize,
)

Target = str | os.PathLike[str] | tuple[asyncio.StreamReader, asyncio.StreamWriter]
#: One output stream's filter (bytes in, bytes out; it may hold back an incomplete character).
OutputFilter = Callable[[bytes], bytes]


class _ThreadReader:
    """Reads a blocking fd in a daemon thread, one chunk per :meth:`read` call."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        self.loop = loop
        self._requests: queue.SimpleQueue[asyncio.Future[bytes] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"stdin-{fd}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fut = self._requests.get()
            if fut is None:
                return
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                # EIO: the terminal hung up. Anything else: treat like EOF too, the program
                # gets EOF on its stdin rather than the whole session failing.
                data = b""
            if not _post(self.loop, _set_result, fut, data) or not data:
                return

    async def read(self) -> bytes:
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self._requests.put(fut)
        return await fut

    def stop(self) -> None:
        self._requests.put(None)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> bool:
    """Hand a result to the loop from a thread; False once the loop is gone (session over)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


#: How long output received before a channel failure may take to reach its reader.
FAILURE_FLUSH_S = 2.0


class _ThreadWriter:
    """Writes to a blocking fd in a daemon thread; reports each completed chunk to the loop."""

    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop,
        on_written: Callable[[int], None],
        on_error: Callable[[OSError], None],
    ) -> None:
        self.fd = fd
        self.loop = loop
        self.on_written = on_written
        self.on_error = on_error
        self.pending = 0
        #: bytes handed to the thread and not yet written (vm-run's output buffer)
        self.backlog = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._failed = False
        self._queue: queue.SimpleQueue[tuple[bytes, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"out-{fd}", daemon=True)
        self._thread.start()

    def submit(self, data: bytes, cost: int) -> None:
        if self._failed:
            self.on_written(cost)
            return
        self.pending += 1
        self.backlog += len(data)
        self._idle.clear()
        self._queue.put((data, cost))

    def _run(self) -> None:
        failed = False
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, cost = item
            if not failed:
                try:
                    _write_all(self.fd, data)
                except OSError as e:
                    failed = True
                    _post(self.loop, self._fail, e)
            if not _post(self.loop, self._done, len(data), cost):
                return

    def _fail(self, exc: OSError) -> None:
        self._failed = True
        self.on_error(exc)

    def _done(self, size: int, cost: int) -> None:
        self.pending -= 1
        self.backlog -= size
        if self.pending == 0:
            self._idle.set()
        self.on_written(cost)

    async def flush(self) -> None:
        await self._idle.wait()

    def stop(self) -> None:
        self._queue.put(None)


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``; (0, 0) if unknown."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 0, 0
    return size.lines, size.columns


#: Bound on the lines read back from the line discipline before raw mode.
_TYPEAHEAD_READS = 64


def enter_raw_mode(fd: int, saved: list[Any]) -> bytes:
    """Put the terminal ``fd`` in raw mode; return what was typed ahead in cooked mode.

    In canonical mode the line discipline stores an EOF character (Ctrl-D, or the one ``script``
    sends when its input ends) as a NUL byte marking the end of a line; switching to raw mode
    hands that NUL to the reader as data. So EOF is first made an ordinary character (nothing
    arriving from now on is turned into a NUL), the complete lines already queued are read in
    canonical mode, where such an EOF reads as an empty read, and given back with each EOF as
    the terminal's EOF character (the guest's pty then sees the Ctrl-D the user typed); only
    then is the terminal put in raw mode. Partial lines stay queued and are read raw.
    """
    import select

    veof = saved[6][termios.VEOF]
    eof_char = veof if isinstance(veof, bytes) else bytes([veof])
    typed = b""
    if saved[3] & termios.ICANON:
        quiet = [*saved[:6], list(saved[6])]
        quiet[6][termios.VEOF] = b"\0" if isinstance(veof, bytes) else 0  # _POSIX_VDISABLE
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        for _ in range(_TYPEAHEAD_READS):
            if not select.select([fd], [], [], 0)[0]:
                break
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:  # an EOF; a hung-up terminal reads as one for ever
                typed += eof_char
                break
            typed += data
    ttymod.setraw(fd, termios.TCSANOW)
    return typed


class _Session:
    def __init__(
        self,
        link: StreamLink,
        request: ExecRequest,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
        forward_signals: bool,
        tty_fd: int | None,
        new_output_filter: Callable[[], OutputFilter] | None,
        prog: str = "vm-run",
        on_output: Callable[[], None] | None = None,
        sink: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.prog = prog
        self.sink = sink
        self.on_output = on_output
        self.link = link
        self.request = request
        self.stdin_fd = stdin
        self.stdout_fd = stdout
        self.stderr_fd = stderr
        self.forward_signals = forward_signals
        self.tty_fd = tty_fd
        # Only output that goes to a terminal is filtered; a pipe or file gets the exact bytes.
        # One filter per stream: a character held back by one must not be completed by the
        # other's bytes (both streams are often the same terminal).
        self.filters: dict[int, OutputFilter] = {}
        if new_output_filter is not None:
            for ftype, fd in ((FrameType.STDOUT, stdout), (FrameType.STDERR, stderr)):
                if fd is not None and os.isatty(fd):
                    self.filters[ftype] = new_output_filter()
        self.loop = asyncio.get_running_loop()
        self.credit = WINDOW  # ours, for stdin
        #: output cost the agent may send: the window plus every credit we returned
        self._granted = WINDOW
        self._received = 0  # output cost received
        #: the most output bytes ever waiting for a writer thread (never above the window)
        self.peak_backlog = 0
        self._credit_event = asyncio.Event()
        self._to_return = 0  # output credit to give back
        self._return_event = asyncio.Event()
        self._broken_pipe = asyncio.Event()
        self.writers: dict[int, _ThreadWriter | None] = {}
        self.reader: _ThreadReader | None = None
        self._signals: list[int] = []
        self._saved_tty: list[Any] | None = None
        #: complete lines typed before raw mode (see enter_raw_mode), sent before the rest
        self._typeahead = b""

    async def run(self) -> int:
        req = self.request
        if req.tty and self.tty_fd is not None and (req.rows == 0 or req.cols == 0):
            rows, cols = terminal_size(self.tty_fd)
            req = req.replace(rows=rows, cols=cols)
        await self.link.send(FrameType.OPEN, req.encode())
        if req.detach:
            return await self._receive_loop()
        tasks: list[asyncio.Task[Any]] = []
        try:
            self._start_writers()
            self._install_signals()
            self._enter_raw_mode()
            if self.stdin_fd is not None:
                self.reader = _ThreadReader(self.stdin_fd, self.loop)
                tasks.append(asyncio.create_task(self._stdin_pump()))
            else:
                await self.link.send(FrameType.STDIN_EOF)
            tasks.append(asyncio.create_task(self._credit_returner()))
            receive = asyncio.create_task(self._receive_loop())
            broken = asyncio.create_task(self._broken_pipe.wait())
            tasks += [receive, broken]
            await asyncio.wait({receive, broken}, return_when=asyncio.FIRST_COMPLETED)
            if receive.done():
                return receive.result()
            return SIGPIPE_STATUS
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self._leave_raw_mode()
            self._remove_signals()
            if self.reader is not None:
                self.reader.stop()
            for w in self.writers.values():
                if w is not None:
                    w.stop()

    # -- output

    def _start_writers(self) -> None:
        for fd in {self.stdout_fd, self.stderr_fd}:
            if fd is not None:
                self.writers[fd] = _ThreadWriter(fd, self.loop, self._written, self._write_error)

    def _written(self, cost: int) -> None:
        self._to_return += cost
        self._return_event.set()

    def _write_error(self, exc: OSError) -> None:
        if exc.errno == errno.EPIPE:
            self._broken_pipe.set()

    async def _credit_returner(self) -> None:
        while True:
            await self._return_event.wait()
            self._return_event.clear()
            if self._to_return:
                n, self._to_return = self._to_return, 0
                self._granted += n  # before sending: the agent cannot use it any earlier
                await self.link.send(FrameType.CREDIT, encode_u32(n))

    def _deliver(self, ftype: int, fd: int | None, data: bytes, cost: int) -> None:
        self._received += cost
        if self._received > self._granted:
            # the guest ignores flow control: buffering it would grow without bound
            raise ProtocolError("the VM sent output beyond its credit window")
        if self.sink is not None:
            self.sink(ftype, data)
            self._written(cost)
            return
        writer = self.writers.get(fd) if fd is not None else None
        if writer is None:
            self._written(cost)  # discarded output still frees its credit
            return
        out_filter = self.filters.get(ftype)
        if out_filter is not None:
            data = out_filter(data)
        writer.submit(data, cost)
        self.peak_backlog = max(self.peak_backlog, writer.backlog)

    def _flush_filters(self) -> None:
        """The end of the output: what a filter still holds back (an incomplete character)."""
        for ftype, out_filter in self.filters.items():
            flush = getattr(out_filter, "flush", None)
            fd = self.stdout_fd if ftype == FrameType.STDOUT else self.stderr_fd
            writer = self.writers.get(fd) if fd is not None else None
            rest = flush() if flush is not None else b""
            if rest and writer is not None:
                writer.submit(rest, 0)

    async def _flush(self) -> None:
        for w in self.writers.values():
            if w is not None:
                await w.flush()

    async def _message(self, text: str) -> None:
        fd = self.stderr_fd
        if fd is None:
            return
        writer = self.writers.get(fd)
        data = f"{self.prog}: {printable(text)}\n".encode(errors="replace")
        if writer is not None:
            writer.submit(data, 0)
            await writer.flush()
        else:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_write_all, fd, data)

    async def _receive_loop(self) -> int:
        try:
            return await self._receive_frames()
        except ProtocolVersionError:
            raise  # with its "rebuild the image" hint
        except ProtocolError as e:
            # a malformed frame or broken flow control: this session ends (vm-run: 255)
            raise ChannelError(f"malformed frame from the VM: {e}") from None

    async def _flush_before_failing(self) -> None:
        """Let output that arrived before a failure reach its fd — for a moment only: a reader
        that stopped reading must not turn the failure into a hang."""
        self._flush_filters()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush(), FAILURE_FLUSH_S)

    async def _receive_frames(self) -> int:
        while True:
            frame = await self.link.recv()
            if frame is None:
                # what arrived before the loss is the program's output: it reaches the user
                await self._flush_before_failing()
                raise ChannelError("the connection to the VM was lost")
            t = frame.type
            if self.on_output is not None and t in _OUTPUT_OR_END:
                self.on_output()
                self.on_output = None
            if t == FrameType.STDOUT:
                self._deliver(t, self.stdout_fd, frame.payload, frame.cost)
            elif t == FrameType.STDERR:
                self._deliver(t, self.stderr_fd, frame.payload, frame.cost)
            elif t == FrameType.CREDIT:
                self.credit += decode_u32(frame.payload)
                self._credit_event.set()
            elif t == FrameType.EXIT:
                status, message = decode_exit(frame.payload)
                self._flush_filters()
                await self._flush()
                if message:
                    await self._message(message)
                return status
            elif t == FrameType.ERROR:
                await self._flush_before_failing()
                raise decode_error(frame.payload)
            else:
                raise ProtocolError(f"unexpected frame type {t} from the VM")

    # -- input

    async def _stdin_pump(self) -> None:
        assert self.reader is not None
        data, self._typeahead = self._typeahead, b""
        while True:
            if not data:
                data = await self.reader.read()
            if not data:
                await self.link.send(FrameType.STDIN_EOF)
                return
            view = memoryview(data)
            while view:
                while self.credit <= FRAME_COST:
                    self._credit_event.clear()
                    await self._credit_event.wait()
                n = min(len(view), CHUNK, self.credit - FRAME_COST)
                self.credit -= n + FRAME_COST
                await self.link.send(FrameType.STDIN, bytes(view[:n]))
                view = view[n:]
            data = b""

    # -- signals and terminal

    def _install_signals(self) -> None:
        if not self.forward_signals:
            return
        for signum in sorted(FORWARDED_SIGNALS):
            self.loop.add_signal_handler(signum, self._on_signal, signum)
            self._signals.append(signum)
        if self.request.tty and self.tty_fd is not None:
            self.loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
            self._signals.append(signal.SIGWINCH)

    def _remove_signals(self) -> None:
        for signum in self._signals:
            self.loop.remove_signal_handler(signum)
        self._signals.clear()

    def _on_signal(self, signum: int) -> None:
        self._spawn(self.link.send(FrameType.SIGNAL, encode_signal(signum)))

    def _on_winch(self) -> None:
        assert self.tty_fd is not None
        rows, cols = terminal_size(self.tty_fd)
        self._spawn(self.link.send(FrameType.WINSIZE, encode_winsize(rows, cols)))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        _background.add(task)
        task.add_done_callback(_background.discard)

    def _enter_raw_mode(self) -> None:
        fd = self.tty_fd
        if not self.request.tty or fd is None or not os.isatty(fd):
            return
        try:
            self._saved_tty = termios.tcgetattr(fd)
            typeahead = enter_raw_mode(fd, self._saved_tty)
        except termios.error:
            self._saved_tty = None
            return
        if fd == self.stdin_fd:
            self._typeahead = typeahead

    def _leave_raw_mode(self) -> None:
        if self._saved_tty is not None and self.tty_fd is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.tty_fd, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None


_background: set[asyncio.Task[None]] = set()
#: Frames after which the program's output, or a message about its end, may be written.
_OUTPUT_OR_END = frozenset({FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT, FrameType.ERROR})


async def connect(target: Target) -> StreamLink:
    """Open a session connection: to the command socket path, or over given streams."""
    if isinstance(target, tuple):
        return StreamLink(*target)
    path = os.fspath(target)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as e:
        raise ChannelError(f"cannot connect to {path}: {e.strerror or e}") from None
    return StreamLink(reader, writer)


async def run_session(
    target: Target,
    request: ExecRequest,
    stdin: int | None = 0,
    stdout: int | None = 1,
    stderr: int | None = 2,
    *,
    forward_signals: bool = True,
    tty_fd: int | None = None,
    new_output_filter: Callable[[], OutputFilter] | None = None,
    prog: str = "vm-run",
    on_output: Callable[[], None] | None = None,
    sink: Callable[[int, bytes], None] | None = None,
) -> int:
    """Run ``request`` in the VM behind ``target``; return the exit status for vm-run.

    ``target``: the VM's command socket path, or an already connected (reader, writer).
    ``stdin``/``stdout``/``stderr``: blocking file descriptors (None: no input — the program
    sees EOF — or discard that output). They are not closed.
    ``forward_signals``: install SIGINT/TERM/HUP/QUIT handlers on the running loop (main
    thread only) that forward to the guest process group; removed again on return.
    ``tty_fd``: with ``request.tty``, the local terminal: put in raw mode for the session
    (restored on return), its size sent (unless the request carries one) and SIGWINCH
    forwarded.
    ``new_output_filter``: makes one filter per output stream (stdout, stderr) that goes to a
    terminal, applied before writing (vm-run's EscapeFilter when it runs without ``-t``; a
    filter's ``flush()``, if it has one, gives what it held back at the end); output to pipes
    and files is exact. EXIT and ERROR messages are always made printable.
    ``prog``: the tool named in the messages written to ``stderr`` (the agent's, e.g. "not
    found").
    ``on_output``: called once, before the first output or message is written (vm-run's
    start status line is erased then).
    ``sink``: instead of writing output to ``stdout``/``stderr``, hand each chunk to
    ``sink(FrameType.STDOUT or STDERR, data)`` on the loop (the supervisor's own sessions:
    it caps and filters what it logs); it must not block.

    Returns the program's exit status (126/127 when it could not be executed / found, 128+N
    when killed by signal N; 0 once started with ``detach``; 141 if our stdout broke).
    Raises ChannelError (ProtocolVersionError on a version mismatch) for channel failures and
    ValueError for a request that cannot be sent. Cancelling it (e.g. a timeout) disconnects,
    which hangs up the guest program.
    """
    request.validate()
    link = await connect(target)
    try:
        return await _Session(
            link,
            request,
            stdin,
            stdout,
            stderr,
            forward_signals,
            tty_fd,
            new_output_filter,
            prog,
            on_output,
            sink,
        ).run()
    finally:
        await link.aclose()
