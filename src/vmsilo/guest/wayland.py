"""The guest's end of windows on the host desktop under QEMU (SPEC §9.1): waypipe over the channel.

A ``waypipe --no-gpu server`` runs as the VM user and gives its programs a Wayland display
(``$XDG_RUNTIME_DIR/wayland-0``). For every program that connects, waypipe opens a connection
to the agent's bridge socket; the agent cannot open a channel stream itself (the host opens
every stream, SPEC §11.1), so it hands the connection a *ticket*, announces the ticket on the
control stream the host opened after hello, and waits for the host to open a stream for that
ticket. The stream then carries the connection's bytes both ways under the channel's credit
(:func:`vmsilo.channel.splice.splice`); waypipe passes no fds across its own connection, so
bytes are all there is.

The server is up before the agent says hello: its command is ``cat`` on a pipe the agent holds,
so one byte echoed back means waypipe created the display socket and started its command; and
the agent's exit closes the pipe, which ends ``cat`` and waypipe with it (no orphan).

Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd

from vmsilo.channel.mux import Link
from vmsilo.channel.protocol import (
    FRAME_COST,
    SERVICE_WAYLAND_CONTROL,
    TERMINAL_TYPES,
    WINDOW,
    FrameType,
    ProtocolError,
    ServiceRequest,
    decode_u32,
    encode_error,
)
from vmsilo.channel.splice import splice

log = logging.getLogger("vmsilo.agent.wayland")

WAYPIPE = "/usr/bin/waypipe"
#: The holder waypipe runs as its command (see the module docstring).
HOLDER = "/bin/cat"
#: The display name the VM user's programs get (in their ``XDG_RUNTIME_DIR``).
DISPLAY = "wayland-0"
#: Where waypipe's per-program connections reach the agent.
BRIDGE_SOCKET = "/run/vmsilo/waypipe.socket"
#: How long a program's connection waits for the host to open its stream.
OPEN_TIMEOUT = 15.0
#: Program connections waiting for their stream at once; more are refused.
MAX_PENDING = 32
#: How long waypipe may take to come up before the agent says ready without it.
START_TIMEOUT = 20.0


def runtime_dir(uid: int) -> str:
    """The VM user's ``XDG_RUNTIME_DIR`` (as on the host)."""
    return f"/run/user/{uid}"


def session_env(uid: int) -> dict[bytes, bytes]:
    """What the VM user's programs need to open windows: the display, and the toolkits told to
    use it (GTK prefers Wayland by itself; Qt 5, Firefox ESR, SDL and Electron need asking)."""
    return {
        b"XDG_RUNTIME_DIR": runtime_dir(uid).encode(),
        b"WAYLAND_DISPLAY": DISPLAY.encode(),
        b"XDG_SESSION_TYPE": b"wayland",
        b"QT_QPA_PLATFORM": b"wayland;xcb",
        b"MOZ_ENABLE_WAYLAND": b"1",
        b"SDL_VIDEODRIVER": b"wayland",
        b"ELECTRON_OZONE_PLATFORM_HINT": b"wayland",
    }


def make_runtime_dir(uid: int, gid: int) -> str:
    """Create the user's runtime directory (0700, the user's), as a login manager would."""
    path = runtime_dir(uid)
    os.makedirs("/run/user", mode=0o755, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    return path


OVERCOMMIT = "/proc/sys/vm/overcommit_memory"


def allow_overcommit(path: str = OVERCOMMIT) -> None:
    """Let waypipe mirror a program's whole shm pool: it maps a copy as large as the pool, and
    programs reserve pools far larger than they touch (foot's scrollback pool exceeds a small
    VM's RAM). Under the kernel's default heuristic such a mapping fails in a 512 MiB guest
    ("Failed to allocate mirror") and the window dies; only touched pages cost memory."""
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("cannot allow memory overcommit (%s): large windows may fail", e)


class _Pending:
    """A program's connection waiting for its stream, and the end of its relay."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.claimed = asyncio.Event()
        self.done = asyncio.Event()


class WaylandBridge:
    """The waypipe server and the tickets of its connections (see the module docstring)."""

    def __init__(self, uid: int, gid: int, bridge_socket: str = BRIDGE_SOCKET) -> None:
        self.uid = uid
        self.gid = gid
        self.bridge_socket = bridge_socket
        self.server: asyncio.Server | None = None
        self.waypipe: asyncio.subprocess.Process | None = None
        self.control: Link | None = None
        self.credit = WINDOW
        self.credit_event = asyncio.Event()
        self.pending: dict[int, _Pending] = {}
        self.next_ticket = 1

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Bind the bridge socket, then start waypipe as the user and wait until it serves."""
        allow_overcommit()
        await self.listen()
        await self._start_waypipe()

    async def listen(self) -> None:
        """Serve the bridge socket (the user's only: waypipe runs as the user)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.bridge_socket)
        self.server = await asyncio.start_unix_server(self._on_connection, path=self.bridge_socket)
        os.chown(self.bridge_socket, self.uid, self.gid)
        os.chmod(self.bridge_socket, 0o600)

    async def _start_waypipe(self) -> None:
        run = make_runtime_dir(self.uid, self.gid)
        try:
            home = pwd.getpwuid(self.uid).pw_dir
        except KeyError:
            home = "/"
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": home,
            "XDG_RUNTIME_DIR": run,
            "LANG": "C.UTF-8",
        }
        argv = [WAYPIPE, "--no-gpu", "--socket", self.bridge_socket, "--display", DISPLAY]
        self.waypipe = await asyncio.create_subprocess_exec(
            *argv,
            "server",
            "--",
            HOLDER,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            start_new_session=True,
        )
        assert self.waypipe.stdin is not None and self.waypipe.stdout is not None
        self.waypipe.stdin.write(b"\n")
        await self.waypipe.stdin.drain()
        line = await asyncio.wait_for(self.waypipe.stdout.readline(), START_TIMEOUT)
        if line != b"\n":
            raise OSError(f"waypipe server did not start (exit status {self.waypipe.returncode})")
        log.info("waypipe server up: %s/%s", run, DISPLAY)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        proc = self.waypipe
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)

    # ------------------------------------------------------------------ host streams

    async def serve(self, link: Link, request: ServiceRequest) -> None:
        """One host-opened service session: the control stream or a ticket's stream."""
        if request.service == SERVICE_WAYLAND_CONTROL:
            await self._serve_control(link)
            return
        pending = self.pending.get(request.ticket)
        if pending is None or pending.claimed.is_set():
            await link.send(
                FrameType.ERROR, encode_error("ticket", f"no connection waits as {request.ticket}")
            )
            return
        pending.claimed.set()
        try:
            await splice(
                link,
                pending.reader,
                pending.writer,
                send_type=FrameType.STDOUT,
                recv_type=FrameType.STDIN,
                end_type=FrameType.EXIT,
            )
        finally:
            pending.done.set()

    async def _serve_control(self, link: Link) -> None:
        """Hold the control stream: tickets go out on it, credit for them comes back."""
        if self.control is not None:
            self.control.close()  # a new supervisor (restart) replaces the old stream
        self.control = link
        self.credit = WINDOW
        try:
            while True:
                frame = await link.recv()
                if frame is None or frame.type in TERMINAL_TYPES:
                    return
                if frame.type != FrameType.CREDIT:
                    raise ProtocolError(f"unexpected frame type {frame.type} on the control stream")
                self.credit = min(WINDOW, self.credit + decode_u32(frame.payload))
                self.credit_event.set()
        except ProtocolError as e:
            log.warning("wayland control stream: %s", e)
        finally:
            if self.control is link:
                self.control = None

    async def _announce(self, ticket: int) -> bool:
        """Ask the host for a stream for ``ticket``; False when no host listens."""
        line = json.dumps({"open": ticket}).encode() + b"\n"
        cost = len(line) + FRAME_COST
        while self.control is not None and self.credit < cost:
            self.credit_event.clear()
            await asyncio.wait_for(self.credit_event.wait(), OPEN_TIMEOUT)
        control = self.control
        if control is None:
            return False
        self.credit -= cost
        await control.send(FrameType.STDOUT, line)
        return True

    # ------------------------------------------------------------------ guest connections

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self.pending) >= MAX_PENDING:
            log.warning("too many Wayland connections wait for the host: refusing one")
            writer.close()
            return
        ticket = self.next_ticket
        self.next_ticket = self.next_ticket % 0xFFFFFFFF + 1
        pending = _Pending(reader, writer)
        self.pending[ticket] = pending
        try:
            if not await self._announce(ticket):
                log.warning("a program opened a window, but the host has no Wayland for this VM")
                return
            try:
                await asyncio.wait_for(pending.claimed.wait(), OPEN_TIMEOUT)
            except TimeoutError:
                log.warning("the host did not open a Wayland stream in %s s", OPEN_TIMEOUT)
                return
            await pending.done.wait()
        except (TimeoutError, ConnectionError, OSError) as e:
            log.warning("Wayland connection %d: %s", ticket, e)
        finally:
            del self.pending[ticket]
            if not pending.claimed.is_set():
                with contextlib.suppress(Exception):
                    writer.close()
