"""The host's end of a VM's windows (SPEC §9.1): the desktop user's bridge process, and under
QEMU the channel streams that carry the guest's Wayland connections to it.

The bridge (:mod:`vmsilo.wayland.bridge`: the filter and, for QEMU, ``waypipe client``) runs as
the configured user in a process group of its own. QEMU: it starts at the VM's first window
(nothing runs for a VM that never opens one) and is started again after it died; crosvm
upstream: at launch, since the VMM connects to the filter itself. It is stopped with the VM,
the whole group, so nothing of a VM that died is left behind.

QEMU streams: after hello the supervisor opens the ``wayland-control`` service stream. The
guest writes ``{"open": N}`` lines on it, one per program connection waiting in its waypipe
server; for each the supervisor opens a stream for ticket N (the host opens every stream,
SPEC §11.1) and splices it to a fresh connection to the bridge's waypipe socket. At most
:data:`MAX_STREAMS` at once per VM: a guest asking for more gets its extra tickets reset. When
the compositor's socket is missing, the filter answers each connection with a
``wl_display.error`` naming it, which the guest program prints; when the bridge cannot run at
all (the user has no runtime directory, waypipe is missing) the stream is reset at once and the
program fails with waypipe's error. Either way at once, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from vmsilo.backends.base import WindowsSidecar
from vmsilo.channel.mux import Link, StreamLink
from vmsilo.channel.protocol import (
    MAX_TICKET,
    SERVICE_WAYLAND,
    SERVICE_WAYLAND_CONTROL,
    TERMINAL_TYPES,
    ChannelError,
    FrameType,
    ProtocolError,
    ServiceRequest,
    decode_error,
    decode_json,
    encode_u32,
)
from vmsilo.channel.splice import splice

#: Concurrent window connections per VM.
MAX_STREAMS = 64
#: A control line longer than this is a misbehaving guest.
MAX_LINE = 256
#: How long the bridge may take to say ``ready``.
BRIDGE_START_TIMEOUT = 15.0
#: Connection attempts to waypipe's socket: it binds before it listens, a window of a few
#: syscalls in which a connect is refused; the retries cover that window only.
CONNECT_ATTEMPTS = 5

OpenLink = Callable[[], Awaitable[Link]]


class DesktopUnavailable(Exception):
    """The user's desktop cannot take the VM's windows now (the message says why)."""


class Bridge:
    """The desktop user's bridge process of one VM."""

    def __init__(self, sidecar: WindowsSidecar, log: Callable[[str], None]) -> None:
        self.sidecar = sidecar
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.stopping = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def ensure(self) -> None:
        """Start the bridge unless it runs; DesktopUnavailable when it cannot."""
        async with self.lock:
            if self.running:
                return
            if self.stopping:
                raise DesktopUnavailable("the VM is stopping")
            await self._start()

    async def _start(self) -> None:
        s = self.sidecar
        if not os.path.isdir(s.runtime_dir):
            raise DesktopUnavailable(
                f"no desktop session: {s.runtime_dir} does not exist (is the user logged in?)"
            )
        # a missing compositor is the filter's to say: it answers each connection with a
        # wl_display.error naming the socket, which reaches the guest program through waypipe
        drop = os.geteuid() == 0 and s.uid != 0  # it becomes the user itself (see bridge)
        try:
            proc = await asyncio.create_subprocess_exec(
                *s.argv(sys.executable, drop=drop),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=s.env,
                cwd="/",
                start_new_session=True,
            )
        except OSError as e:
            raise DesktopUnavailable(f"cannot start the Wayland bridge: {e}") from None
        self.proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        self.watcher = asyncio.ensure_future(self._relay_log(proc.stderr))
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), BRIDGE_START_TIMEOUT)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self._kill()
            raise DesktopUnavailable("the Wayland bridge did not start (see the log above)")
        self.log(f"Wayland bridge up (pid {proc.pid}): filter {s.filter_socket}")

    async def _relay_log(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            print(f"wayland[{self.sidecar.vm}]: {text}", file=sys.stderr)

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        # the group: waypipe's per-connection children outlive their parent otherwise
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self.watcher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.watcher, 2)

    async def stop(self) -> None:
        async with self.lock:
            self.stopping = True
            await self._kill()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection to the waypipe client (the bridge started if needed)."""
        await self.ensure()
        path = self.sidecar.waypipe_socket
        assert path is not None
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                return await asyncio.open_unix_connection(path)
            except ConnectionRefusedError:
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")


class WindowStreams:
    """The QEMU path: the control stream, and one spliced stream per guest connection."""

    def __init__(self, bridge: Bridge, open_link: OpenLink, log: Callable[[str], None]) -> None:
        self.bridge = bridge
        self.open_link = open_link
        self.log = log
        self.streams: set[asyncio.Task[None]] = set()
        self.refused_reason: str | None = None
        self.refusing = False  # tickets beyond MAX_STREAMS are being refused (logged once)

    async def run(self) -> None:
        """Hold the control stream until the guest or the VM ends it."""
        try:
            link = await self.open_link()
        except (OSError, ChannelError) as e:
            self.log(f"cannot open the Wayland control stream: {e}")
            return
        try:
            await link.send(FrameType.OPEN, ServiceRequest(SERVICE_WAYLAND_CONTROL).encode())
            await self._read_control(link)
        except ProtocolError as e:
            self.log(f"the guest broke the Wayland control stream: {e}; windows are off")
        finally:
            link.close()
            for task in list(self.streams):
                task.cancel()
            for task in list(self.streams):
                with contextlib.suppress(BaseException):
                    await task

    async def _read_control(self, link: Link) -> None:
        pending = b""
        while True:
            frame = await link.recv()
            if frame is None:
                return
            if frame.type == FrameType.ERROR:
                self.log(f"the guest serves no windows: {decode_error(frame.payload)}")
                return
            if frame.type in TERMINAL_TYPES:
                return
            if frame.type != FrameType.STDOUT:
                raise ProtocolError(f"unexpected frame type {frame.type} on the control stream")
            pending += frame.payload
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:
                raise ProtocolError("control line too long")
            for line in lines:
                self._ticket(_parse_ticket(line))
            await link.send(FrameType.CREDIT, encode_u32(frame.cost))

    def _ticket(self, ticket: int) -> None:
        task = asyncio.ensure_future(self._stream(ticket, refuse=len(self.streams) >= MAX_STREAMS))
        self.streams.add(task)
        task.add_done_callback(self.streams.discard)

    async def _stream(self, ticket: int, *, refuse: bool) -> None:
        try:
            link = await self.open_link()
        except (OSError, ChannelError) as e:
            self.log(f"cannot open a Wayland stream: {e}")
            return
        try:
            await link.send(FrameType.OPEN, ServiceRequest(SERVICE_WAYLAND, ticket).encode())
            if refuse:
                if not self.refusing:  # once per flood: a guest must not fill the log
                    self.log(f"more than {MAX_STREAMS} windows at once: refusing more")
                self.refusing = True
                await link.send(FrameType.RESET)
                return
            self.refusing = False
            try:
                reader, writer = await self.bridge.connect()
            except (DesktopUnavailable, OSError) as e:
                reason = str(e)
                if reason != self.refused_reason:  # once per reason, not per window
                    self.log(f"a program in the VM opened a window, but {reason}")
                    self.refused_reason = reason
                await link.send(FrameType.RESET)
                return
            self.refused_reason = None
            await splice(
                link,
                reader,
                writer,
                send_type=FrameType.STDIN,
                recv_type=FrameType.STDOUT,
                end_type=FrameType.RESET,
            )
        finally:
            link.close()


def _parse_ticket(line: bytes) -> int:
    """A control line's ticket, read with the channel's bounded JSON reading."""
    ticket = decode_json(line).get("open")
    if not isinstance(ticket, int) or isinstance(ticket, bool) or not 0 < ticket <= MAX_TICKET:
        raise ProtocolError("malformed ticket")
    return ticket


async def open_vsock_link(cid: int) -> Link:
    """A fresh session to the agent over vsock (from a privileged port, SPEC §11.1)."""
    from vmsilo.channel.relay import connect_vsock

    reader, writer = await connect_vsock(cid)
    return StreamLink(reader, writer)
