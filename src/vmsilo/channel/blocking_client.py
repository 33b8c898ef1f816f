"""vm-run's session without asyncio or threads: :func:`run_blocking_session`.

The same session as :func:`vmsilo.channel.client.run_session` — the same frames, flow control,
window enforcement, escape filtering, signal forwarding and messages — driven by one
``poll()`` loop in the calling thread. It exists for start-up time: a whole ``vm-run VM true``
on a running VM is mostly Python's start and one round trip to the guest, and importing
asyncio (with the ssl, logging and concurrent.futures modules it pulls in) and starting the
client's reader and writer threads cost about as much again as everything else ``vm-run``
does. Terminal sessions (``-t``: raw mode, window size changes) and every other caller (the
supervisor's own sessions, tests, benchmarks) keep using the asyncio client.

The caller's descriptors stay blocking, as in the asyncio client (stdin and stdout are often a
terminal or pipe shared with the user's shell, and flipping ``O_NONBLOCK`` on them would break
the shell after vm-run exits): stdin is read only when ``poll`` says it is readable, and output
is written with blocking writes. While a slow consumer holds such a write, no more frames are
read — the guest is held to its credit window exactly as before, since credit goes back only
after the bytes were written — and yet signals are still forwarded (the handler sends the
frame itself unless a frame is half-sent) and ``timeout`` still ends the session (an interval
timer whose handler interrupts the write).

Standard library only (this package is copied into the guest, which never uses this module).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
from collections import deque

from vmsilo.channel.protocol import (
    CHUNK,
    FORWARDED_SIGNALS,
    FRAME_COST,
    HEADER,
    HEADER_SIZE,
    WINDOW,
    ChannelError,
    Frame,
    FrameType,
    ProtocolError,
    ProtocolVersionError,
    decode_error,
    decode_exit,
    decode_u32,
    encode_frame,
    encode_signal,
    encode_u32,
    validate_frame,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType as StackFrame

    from vmsilo.channel.protocol import ExecRequest

    #: One output stream's filter (bytes in, bytes out; it may hold back an incomplete
    #: character).
    OutputFilter = Callable[[bytes], bytes]

#: Status returned when our own stdout was closed under us (like a shell's SIGPIPE death).
SIGPIPE_STATUS = 128 + signal.SIGPIPE

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
#: Bytes asked of the socket per read (a whole frame is at most 64 KiB).
_RECV = 256 * 1024


class SessionTimeout(Exception):
    """``timeout`` seconds passed before the session ended; it was hung up."""


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the blocking descriptor ``fd``."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            # Someone else made the descriptor non-blocking: wait for it, still no polling.
            select.select([], [fd], [])
            continue
        view = view[n:]


def connect(path: str) -> socket.socket:
    """A blocking connection to the command socket ``path``; ChannelError if nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise ChannelError(f"cannot connect to {path}: {e.strerror or e}") from None
    return sock


class _Output:
    """One output descriptor: written in place; after a failure its output is dropped."""

    def __init__(self, fd: int, out_filter: OutputFilter | None) -> None:
        self.fd = fd
        self.filter = out_filter
        self.failed = False

    def write(self, data: bytes) -> bool:
        """Write ``data``; False if the reader went away (EPIPE: the session ends as SIGPIPE)."""
        if self.failed or not data:
            return True
        try:
            write_all(self.fd, data)
        except OSError as e:
            self.failed = True
            return e.errno != errno.EPIPE
        return True


class _Session:
    def __init__(
        self,
        sock: socket.socket,
        request: ExecRequest,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
        forward_signals: bool,
        new_output_filter: Callable[[], OutputFilter] | None,
        prog: str,
        on_output: Callable[[], None] | None,
    ) -> None:
        self.sock = sock
        self.request = request
        self.stdin_fd = stdin
        self.stderr_fd = stderr
        self.forward_signals = forward_signals
        self.prog = prog
        self.on_output = on_output
        # Only output that goes to a terminal is filtered, one filter per stream (see client.py).
        self.outputs: dict[int, _Output | None] = {}
        for ftype, fd in ((FrameType.STDOUT, stdout), (FrameType.STDERR, stderr)):
            if fd is None or request.detach:
                self.outputs[ftype] = None  # discarded (with --detach nothing is written)
                continue
            use = new_output_filter() if new_output_filter and os.isatty(fd) else None
            self.outputs[ftype] = _Output(fd, use)
        self.credit = WINDOW  # ours, for stdin
        #: output cost the agent may send: the window plus every credit we returned
        self._granted = WINDOW
        self._received = 0
        self._to_return = 0
        self._stdin_open = stdin is not None and not request.detach
        self._stdin_data = b""
        self._inbuf = bytearray()
        self._outbox: deque[bytes] = deque()
        self._sending = False
        self._dead = False
        self._saved_handlers: dict[int, object] = {}

    # -- sending (from the loop and from signal handlers)

    def _send(self, ftype: int, payload: bytes = b"") -> None:
        self._outbox.append(encode_frame(ftype, 0, payload))
        self._pump_out()

    def _pump_out(self) -> None:
        """Send queued frames unless a send is already under way further up the stack (a signal
        handler interrupting it queues its frame, which that send then delivers)."""
        while self._outbox and not self._sending:
            self._sending = True
            try:
                while self._outbox:
                    data = self._outbox.popleft()
                    if self._dead:
                        continue
                    try:
                        self.sock.sendall(data)
                    except OSError:
                        self._dead = True  # the loss shows when reading
            finally:
                self._sending = False

    def _on_signal(self, signum: int, _frame: StackFrame | None) -> None:
        self._send(FrameType.SIGNAL, encode_signal(signum))

    def _install_signals(self) -> None:
        if not self.forward_signals or self.request.detach:
            return
        for signum in sorted(FORWARDED_SIGNALS):
            self._saved_handlers[signum] = signal.signal(signum, self._on_signal)

    def _remove_signals(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._saved_handlers.clear()

    # -- the loop

    def run(self) -> int:
        self._send(FrameType.OPEN, self.request.encode())
        self._install_signals()
        try:
            if not self._stdin_open and not self.request.detach:
                self._send(FrameType.STDIN_EOF)
            try:
                return self._loop()
            except ProtocolVersionError:
                raise  # with its "rebuild the image" hint
            except ProtocolError as e:
                raise ChannelError(f"malformed frame from the VM: {e}") from None
        finally:
            self._remove_signals()

    def _loop(self) -> int:
        poller = select.poll()
        sock_fd = self.sock.fileno()
        poller.register(sock_fd, _READ)
        polling_stdin = False
        while True:
            self._send_stdin()
            want_stdin = self._stdin_open and not self._stdin_data
            if want_stdin != polling_stdin and self.stdin_fd is not None:
                if want_stdin:
                    poller.register(self.stdin_fd, _READ)
                else:
                    poller.unregister(self.stdin_fd)
                polling_stdin = want_stdin
            if self._to_return:
                n, self._to_return = self._to_return, 0
                self._granted += n  # before sending: the agent cannot use it any earlier
                self._send(FrameType.CREDIT, encode_u32(n))
            for fd, _events in poller.poll():
                if fd == sock_fd:
                    status = self._read_socket()
                    if status is not None:
                        return status
                elif fd == self.stdin_fd and polling_stdin:
                    self._read_stdin()

    def _read_stdin(self) -> None:
        assert self.stdin_fd is not None
        try:
            data = os.read(self.stdin_fd, 65536)
        except OSError:
            # EIO: the terminal hung up; anything else too: the program gets EOF on its
            # stdin rather than the whole session failing.
            data = b""
        if data:
            self._stdin_data = data
        else:
            self._stdin_open = False
            self._send(FrameType.STDIN_EOF)

    def _send_stdin(self) -> None:
        view = memoryview(self._stdin_data)
        while view and self.credit > FRAME_COST:
            n = min(len(view), CHUNK, self.credit - FRAME_COST)
            self.credit -= n + FRAME_COST
            self._send(FrameType.STDIN, bytes(view[:n]))
            view = view[n:]
        self._stdin_data = bytes(view)

    def _read_socket(self) -> int | None:
        """Handle every whole frame that has arrived; the exit status once the session ended."""
        try:
            data = self.sock.recv(_RECV)
        except OSError:
            data = b""
        if not data:  # between frames or in the middle of one: either way the link is gone
            raise ChannelError("the connection to the VM was lost")
        buf = self._inbuf
        buf += data
        while len(buf) >= HEADER_SIZE:
            version, ftype, length, session = HEADER.unpack_from(buf)
            end = HEADER_SIZE + length
            if len(buf) < end:
                break
            frame = Frame(ftype, session, bytes(buf[HEADER_SIZE:end]), version)
            del buf[:end]
            validate_frame(frame)
            status = self._handle(frame)
            if status is not None:
                return status
        return None

    def _handle(self, frame: Frame) -> int | None:
        t = frame.type
        if self.on_output is not None and t in _OUTPUT_OR_END:
            self.on_output()
            self.on_output = None
        if t in (FrameType.STDOUT, FrameType.STDERR):
            return self._deliver(t, frame.payload, frame.cost)
        if t == FrameType.CREDIT:
            self.credit += decode_u32(frame.payload)
            return None
        if t == FrameType.EXIT:
            status, message = decode_exit(frame.payload)
            for out in self.outputs.values():
                flush = getattr(out.filter, "flush", None) if out is not None else None
                if out is not None and flush is not None:
                    out.write(flush())
            if message:
                self._message(message)
            return status
        if t == FrameType.ERROR:
            raise decode_error(frame.payload)
        raise ProtocolError(f"unexpected frame type {t} from the VM")

    def _deliver(self, ftype: int, data: bytes, cost: int) -> int | None:
        self._received += cost
        if self._received > self._granted:
            # the guest ignores flow control: buffering it would grow without bound
            raise ProtocolError("the VM sent output beyond its credit window")
        out = self.outputs.get(ftype)
        if out is not None:
            if out.filter is not None:
                data = out.filter(data)
            if not out.write(data):
                return SIGPIPE_STATUS
        self._to_return += cost  # written (or discarded): its credit goes back
        return None

    def _message(self, text: str) -> None:
        """``prog: text`` on stderr (the agent's own words, e.g. "not found")."""
        from vmsilo.channel.escapes import printable

        data = f"{self.prog}: {printable(text)}\n".encode(errors="replace")
        out = self.outputs.get(FrameType.STDERR)
        if out is not None:
            out.write(data)
        elif self.stderr_fd is not None:
            try:  # noqa: SIM105 (contextlib is not imported for this alone)
                write_all(self.stderr_fd, data)
            except OSError:
                pass


#: Frames after which the program's output, or a message about its end, may be written.
_OUTPUT_OR_END = frozenset({FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT, FrameType.ERROR})


def run_blocking_session(
    target: str | socket.socket,
    request: ExecRequest,
    stdin: int | None = 0,
    stdout: int | None = 1,
    stderr: int | None = 2,
    *,
    forward_signals: bool = True,
    new_output_filter: Callable[[], OutputFilter] | None = None,
    prog: str = "vm-run",
    on_output: Callable[[], None] | None = None,
    timeout: float | None = None,
) -> int:
    """Run ``request`` (not a terminal session) in the VM behind ``target``; return the exit
    status for vm-run.

    ``target``: the command socket's path, or a socket already connected to it (it is closed
    on return either way). The other arguments mean what they mean for
    :func:`vmsilo.channel.client.run_session`; ``forward_signals`` installs handlers for
    SIGINT/TERM/HUP/QUIT (main thread only), restored on return. ``timeout``: seconds after
    which the session is hung up (which hangs up the guest program) and
    :class:`SessionTimeout` is raised; it uses SIGALRM and the real-time interval timer.

    Raises ChannelError (ProtocolVersionError on a version mismatch) for channel failures and
    ValueError for a request that cannot be sent.
    """
    if request.tty:
        raise ValueError("terminal sessions need vmsilo.channel.client.run_session")
    request.validate()
    saved_alarm: object = None
    armed = [False]
    if timeout is not None:

        def expire(_signum: int, _frame: StackFrame | None) -> None:
            if armed[0]:
                armed[0] = False
                raise SessionTimeout

        saved_alarm = signal.signal(signal.SIGALRM, expire)
        armed[0] = True
        signal.setitimer(signal.ITIMER_REAL, timeout)
    sock = target if isinstance(target, socket.socket) else None
    try:
        if sock is None:
            assert isinstance(target, str)
            sock = connect(target)
        return _Session(
            sock,
            request,
            stdin,
            stdout,
            stderr,
            forward_signals,
            new_output_filter,
            prog,
            on_output,
        ).run()
    finally:
        if timeout is not None:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, saved_alarm)  # type: ignore[arg-type]
        if sock is not None:
            sock.close()
