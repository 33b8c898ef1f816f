"""Frame transports: one session per stream, or many sessions multiplexed on one stream.

Both the guest agent and the host supervisor need the same two shapes of transport:

* :class:`StreamLink` — a whole stream is one session (vm-run ↔ command socket, vsock
  connection per session). The session id on the wire is ignored.
* :class:`ChannelMux` — many sessions share one byte stream (the ``org.vmsilo.channel``
  virtio-serial port, for hosts without vsock). A single reader task dispatches each frame to
  its :class:`MuxSession`'s queue *without ever blocking*, so one session whose consumer is slow
  cannot stall the others. Each session holds the peer to its credit window: data frames
  (stdin, stdout, stderr) may cost at most :data:`~vmsilo.channel.protocol.WINDOW` plus the
  credit this side has sent, and the whole queue at most
  :data:`~vmsilo.channel.protocol.QUEUE_LIMIT` cost units; a peer exceeding either broke flow
  control, and only that session fails (SPEC §11.2: nothing is buffered beyond the window).

Both implement the :class:`Link` protocol the agent's session code and the relay use:
``recv()`` returns the next frame or ``None`` once the peer is gone, ``send()`` never raises for
a vanished peer (the loss shows up as ``None`` from ``recv()``), ``close()`` forgets the session.

Standard library only: this module runs in the guest too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from vmsilo.channel.protocol import (
    DATA_TYPES,
    HEADER_SIZE,
    QUEUE_LIMIT,
    TERMINAL_TYPES,
    WINDOW,
    ChannelError,
    Frame,
    FrameType,
    ProtocolError,
    ProtocolVersionError,
    decode_header,
    encode_error,
    encode_frame,
    validate_frame,
)

log = logging.getLogger(__name__)


class Link(Protocol):
    """One session's frame pipe, whatever carries it."""

    async def recv(self) -> Frame | None:
        """Next frame; None when the peer went away; ProtocolError on a malformed frame."""
        ...

    async def send(self, ftype: int, payload: bytes = b"") -> None:
        """Send one frame; silently dropped if the peer is gone."""
        ...

    def close(self) -> None:
        """Stop using this session (no frame is sent)."""
        ...


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame (not validated); None on a clean EOF between frames.

    A truncated frame raises ChannelError: the stream itself is broken.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ChannelError("channel closed in the middle of a frame header") from None
    version, ftype, length, session = decode_header(header)
    payload = b""
    if length:
        try:
            payload = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ChannelError("channel closed in the middle of a frame") from None
    return Frame(ftype, session, payload, version)


def error_code(exc: BaseException) -> str:
    """The ERROR frame ``code`` for an exception: "version" lets the peer hint at rebuilding."""
    return "version" if isinstance(exc, ProtocolVersionError) else "protocol"


class StreamLink:
    """A stream that carries exactly one session (session id 0 on the wire)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session_id: int = 0,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.session_id = session_id
        self._lock = asyncio.Lock()
        self._dead = False
        self._failed = False

    async def recv(self) -> Frame | None:
        if self._failed:
            return None
        try:
            frame = await read_frame(self.reader)
        except (ConnectionError, ChannelError):
            frame = None
        if frame is None:
            return None
        try:
            validate_frame(frame)
        except ProtocolError:
            # One session per stream: a malformed frame ends the stream's session, and since we
            # cannot trust what follows, nothing more is read from it.
            self._failed = True
            raise
        return frame

    async def send(self, ftype: int, payload: bytes = b"") -> None:
        if self._dead:
            return
        data = encode_frame(ftype, self.session_id, payload)
        async with self._lock:
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                self._dead = True

    def close(self) -> None:
        self._dead = True
        with contextlib.suppress(Exception):
            self.writer.close()

    async def linger(self, timeout: float = 2.0) -> None:
        """End the stream politely: half-close, then read (and drop) until the peer closes
        too, for at most ``timeout`` s. A peer that still writes a last frame (a CREDIT, a
        STDIN_EOF) after our final one must not find the socket closed: its write would fail,
        and an asyncio peer then loses the frames it had not read yet — the EXIT among them."""
        with contextlib.suppress(Exception):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass

    async def aclose(self) -> None:
        """close() and wait until the transport is gone."""
        self.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class MuxSession:
    """One session on a :class:`ChannelMux`; a :class:`Link`."""

    def __init__(self, mux: ChannelMux, session_id: int) -> None:
        self.mux = mux
        self.id = session_id
        self._queue: deque[Frame] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._error: ProtocolError | None = None
        self._failed = False
        self._eof = False
        self._closed = False
        #: data cost the peer may still send: the window plus the credit we returned, minus
        #: what it sent (its own count can only be lower: our credit reaches it later)
        self._allowance = WINDOW

    @property
    def queued_cost(self) -> int:
        """Cost units currently buffered for this session (bounded by QUEUE_LIMIT)."""
        return self._queued

    def _feed(self, frame: Frame) -> None:
        """Called by the mux reader: queue without blocking, or fail the session."""
        if self._failed or self._eof:
            return
        if frame.type in DATA_TYPES:
            if frame.cost > self._allowance:
                self._fail(
                    ProtocolError(f"session {self.id}: peer sent data beyond its credit window")
                )
                return
            self._allowance -= frame.cost
        if self._queued + frame.cost > QUEUE_LIMIT:
            self._fail(ProtocolError(f"session {self.id}: peer exceeded its flow-control window"))
            return
        self._queue.append(frame)
        self._queued += frame.cost
        self._wakeup.set()

    def _fail(self, exc: ProtocolError) -> None:
        if self._failed or self._eof:
            return
        self._failed = True
        self._error = exc
        self._queue.clear()
        self._queued = 0
        self._wakeup.set()

    def _link_lost(self) -> None:
        self._eof = True
        self._wakeup.set()

    async def recv(self) -> Frame | None:
        while True:
            if self._error is not None:
                exc, self._error = self._error, None
                raise exc
            if self._queue:
                frame = self._queue.popleft()
                self._queued -= frame.cost
                return frame
            if self._eof or self._failed or self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    async def send(self, ftype: int, payload: bytes = b"") -> None:
        if self._closed:
            return
        if ftype == FrameType.CREDIT and len(payload) == 4:
            # counted before it is written: the peer cannot have it any earlier
            self._allowance += int.from_bytes(payload, "big")
        await self.mux.send_frame(ftype, self.id, payload)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wakeup.set()
            self.mux._forget(self)


SessionHandler = Callable[[MuxSession], Awaitable[None]]


class ChannelMux:
    """Many sessions over one asyncio stream pair (both ends of the virtio-serial port).

    The host side calls :meth:`open_session` to start a session (it sends the OPEN frame
    itself); the guest side passes ``on_open``, which is run as a task for every frame that
    names an unknown session and is an OPEN. Call :meth:`start` (or await :meth:`run`) to start
    reading. When the stream ends, every session's ``recv()`` returns None.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_open: SessionHandler | None = None,
        name: str = "mux",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_open = on_open
        self.name = name
        self._sessions: dict[int, MuxSession] = {}
        self._next_id = 1
        self._wlock = asyncio.Lock()
        self._dead = False
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        #: Why the mux stopped (None while running or after a clean EOF).
        self.error: BaseException | None = None

    # -- lifecycle

    def start(self) -> asyncio.Task[None]:
        """Run the reader in a task (idempotent) and return it."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)
        return self._task

    async def run(self) -> None:
        """Read and dispatch frames until the stream ends."""
        try:
            while True:
                frame = await read_frame(self.reader)
                if frame is None:
                    break
                await self._dispatch(frame)
        except (ChannelError, ConnectionError, OSError) as e:
            self.error = e
            log.warning("%s: channel failed: %s", self.name, e)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._dead = True
        for session in list(self._sessions.values()):
            session._link_lost()
        self._sessions.clear()
        self.closed.set()

    async def aclose(self) -> None:
        """Stop reading, end every session and close the writer."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._shutdown()
        with contextlib.suppress(Exception):
            self.writer.close()
        for task in list(self._handlers):
            task.cancel()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # -- sessions

    def open_session(self) -> MuxSession:
        """Allocate a fresh session id (host side); ids are not reused while the mux lives."""
        if self._dead:
            raise ChannelError("the channel to the guest is closed")
        while self._next_id in self._sessions or self._next_id == 0:
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        sid = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        session = MuxSession(self, sid)
        self._sessions[sid] = session
        return session

    def _forget(self, session: MuxSession) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    async def send_frame(self, ftype: int, sid: int, payload: bytes = b"") -> None:
        """Write one frame on the shared stream; serialised so frames never interleave."""
        if self._dead:
            return
        data = encode_frame(ftype, sid, payload)
        async with self._wlock:
            if self._dead:
                return
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, RuntimeError, OSError) as e:
                log.warning("%s: write failed: %s", self.name, e)
                self._dead = True

    async def _dispatch(self, frame: Frame) -> None:
        session = self._sessions.get(frame.session)
        try:
            validate_frame(frame)
        except ProtocolError as e:
            if session is not None:
                session._fail(e)
            elif self.on_open is not None and frame.type not in TERMINAL_TYPES:
                # An unknown session opened with a bad frame (e.g. a client of another protocol
                # version): answer so that the client can say why, and forget it.
                await self.send_frame(
                    FrameType.ERROR, frame.session, encode_error(error_code(e), str(e))
                )
            return
        if session is not None:
            session._feed(frame)
            return
        if self.on_open is None or frame.type != FrameType.OPEN or frame.session == 0:
            return  # late frame of a finished session: drop
        session = MuxSession(self, frame.session)
        self._sessions[frame.session] = session
        session._feed(frame)
        task = asyncio.get_running_loop().create_task(self._run_handler(session))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _run_handler(self, session: MuxSession) -> None:
        assert self.on_open is not None
        try:
            await self.on_open(session)
        except Exception:
            log.exception("%s: session %d handler failed", self.name, session.id)
        finally:
            session.close()
