"""The vmsilo guest agent: serves command sessions from the host.

The guest init forks a child that calls :func:`main` with::

    --ready-port org.vmsilo.ready --channel-port org.vmsilo.channel --vsock-port 5000
    --user UID:GID [--auto-shutdown-after S]

Transport: the ``org.vmsilo.channel`` virtio-serial port when the host provided one (it does
exactly when it has no vsock), on which the host multiplexes all sessions (:class:`ChannelMux`);
otherwise vsock (one connection per session, only from the host, CID 2) when ``--vsock-port``
is given, ``AF_VSOCK`` works and ``/dev/vsock`` exists. Tests on a host without vsock pass
``--vsock-path PATH`` instead: the same one-connection-per-session service on a Unix socket
(see ``VSOCK_EMULATION_ENV`` in :mod:`vmsilo.channel.relay`, the host side of that stand-in).

Readiness: once the transport is listening, the agent writes one line
(:func:`vmsilo.channel.protocol.encode_ready`, e.g.
``{"hello":"vmsilo-agent","version":1,"transport":"channel","pid":42}``) on the
``org.vmsilo.ready`` virtio-console port; the supervisor parses it with
:func:`vmsilo.channel.protocol.parse_ready`. On a virtio-serial channel the line is sent again
whenever the host side reconnects.

Return value of :func:`main`: 0 means "power off" (``--auto-shutdown-after`` expired with no
session; the agent first says so on the ready port,
:func:`vmsilo.channel.protocol.encode_farewell`, so that ``vmsilo status`` can tell an
auto-shutdown from another poweroff); non-zero means the agent failed (the init may restart
it). With ``--channel-path`` to a Unix socket (tests on the host) the agent returns 1 when that
socket closes.

No sleeps or polling: sessions, idle timeouts and host reconnects are all events (asyncio
timers; SIGIO from virtio_console when the host end of a port opens).

Standard library only: this module runs in the guest on Debian's python3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
import warnings
from pathlib import Path

from vmsilo.channel.mux import ChannelMux, Link, MuxSession, StreamLink, error_code
from vmsilo.channel.pipes import open_fd_streams
from vmsilo.channel.protocol import (
    ExecRequest,
    FrameType,
    ProtocolError,
    ServiceRequest,
    accept_vsock_peer,
    decode_open,
    encode_error,
)
from vmsilo.contracts.ports import CHANNEL_PORT, READY_PORT
from vmsilo.guest.agent_exec import ExecSession
from vmsilo.guest.ports import find_ready_console, find_virtio_port
from vmsilo.guest.ready_port import RESTORE, host_connected, send_farewell, send_ready
from vmsilo.guest.wayland import WaylandBridge
from vmsilo.guest.wayland import session_env as wayland_env

log = logging.getLogger("vmsilo.agent")

__all__ = ["Agent", "accept_vsock_peer", "main", "parse_user"]


def parse_user(text: str) -> tuple[int, int]:
    """``UID:GID`` → (uid, gid)."""
    uid_s, sep, gid_s = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected UID:GID, got {text!r}")
    try:
        uid, gid = int(uid_s), int(gid_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UID:GID, got {text!r}") from None
    if uid < 0 or gid < 0:
        raise argparse.ArgumentTypeError("ids must not be negative")
    return uid, gid


class Agent:
    """Session accounting and the idle power-off timer, shared by every transport."""

    def __init__(self, uid: int, gid: int, auto_shutdown_after: float | None = None) -> None:
        self.uid = uid
        self.gid = gid
        self.auto_shutdown_after = auto_shutdown_after
        #: windows through waypipe (SPEC §9.1), when the host asked for them
        self.wayland: WaylandBridge | None = None
        #: what the default user's sessions get on top of the clean environment
        self.user_env: dict[bytes, bytes] = {}
        #: set once the user's desktop (the waypipe server) is up, or failed; sessions of the
        #: user wait for it (see :func:`start_wayland`)
        self.desktop_up = asyncio.Event()
        self.desktop_up.set()
        #: Live sessions: connected exec sessions plus detached programs still running.
        self.live_sessions = 0
        self.shutdown = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._arm_idle_timer()

    def session_started(self) -> None:
        self.live_sessions += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def session_ended(self) -> None:
        self.live_sessions -= 1
        if self.live_sessions == 0:
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self.auto_shutdown_after is None or self.live_sessions:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self.auto_shutdown_after, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.live_sessions == 0:
            log.info("no sessions for %s s: shutting down", self.auto_shutdown_after)
            self.shutdown.set()

    async def handle_link(self, link: Link) -> None:
        """Serve one session (mux session or vsock connection) until its program is gone.

        Service sessions (the host's Wayland streams) do not count as sessions: a window
        belongs to a program whose own session keeps the VM awake."""
        try:
            request = await _read_open(link)
            if isinstance(request, ServiceRequest):
                await self._serve_service(link, request)
                return
            if request is None:
                return
            self.session_started()
            try:
                await ExecSession(
                    link,
                    self,
                    default_uid=self.uid,
                    default_gid=self.gid,
                    request=request,
                    user_env=self.user_env,
                    desktop_up=self.desktop_up,
                ).run()
            finally:
                self.session_ended()
        except Exception:
            log.exception("session failed")
        finally:
            link.close()

    async def _serve_service(self, link: Link, request: ServiceRequest) -> None:
        if self.wayland is None:
            await link.send(
                FrameType.ERROR,
                encode_error("service", "this guest shows no windows (no vmsilo.waypipe=1)"),
            )
            return
        await self.wayland.serve(link, request)

    async def handle_mux_session(self, session: MuxSession) -> None:
        await self.handle_link(session)


async def _read_open(link: Link) -> ExecRequest | ServiceRequest | None:
    """A session's OPEN frame, parsed; None (after telling the peer) when there is none."""
    try:
        frame = await link.recv()
        if frame is None:
            return None
        if frame.type != FrameType.OPEN:
            raise ProtocolError("a session must start with an OPEN frame")
        return decode_open(frame.payload)
    except ProtocolError as e:
        await link.send(FrameType.ERROR, encode_error(error_code(e), str(e)))
        return None


#: Tasks that must not be garbage-collected while they run.
_background: set[asyncio.Task[None]] = set()


# --------------------------------------------------------------------------- vsock


def vsock_usable() -> bool:
    """AF_VSOCK works and the guest has a vsock device."""
    if not hasattr(socket, "AF_VSOCK") or not os.path.exists("/dev/vsock"):
        return False
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


async def serve_vsock(agent: Agent, port: int) -> asyncio.Server:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(64)
    sock.setblocking(False)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_vsock_connection(agent, reader, writer)

    return await asyncio.start_server(on_connect, sock=sock)


async def serve_vsock_emulated(agent: Agent, path: Path) -> asyncio.Server:
    """Tests only: serve vsock-style sessions on the Unix socket ``path`` (no AF_VSOCK here).

    The socket stands in for the VM's vsock device, which only the host can reach, so there is
    no peer CID to check: whoever may open ``path`` (0600, the fake VMM's owner) is the host. A
    socket left behind by a VMM that was killed is replaced, as a rebooted guest would listen
    anew.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await agent.handle_link(StreamLink(reader, writer))

    server = await asyncio.start_unix_server(on_connect, path=str(path))
    os.chmod(path, 0o600)
    return server


async def serve_vsock_connection(
    agent: Agent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One accepted vsock connection = one session, if the peer is the host's supervisor
    (CID 2, a privileged source port); anything else is closed before a byte is read."""
    peer = writer.get_extra_info("peername")
    ok = isinstance(peer, tuple) and len(peer) == 2 and all(isinstance(v, int) for v in peer)
    cid, port = peer if ok else (-1, -1)
    if not accept_vsock_peer(cid, port):
        log.warning("refused vsock connection from CID %s port %s", cid, port)
        writer.close()
        return
    await agent.handle_link(StreamLink(reader, writer))


# --------------------------------------------------------------------------- virtio-serial


async def _wait_host_connected(fd: int, sigio: asyncio.Event) -> None:
    """Wait, without polling, until the host end of the virtio port at ``fd`` is open.

    virtio_console sends SIGIO to the port's async owner when the host connects (after
    ``F_SETOWN`` + ``O_ASYNC``); the SIGIO handler is installed once by the caller.
    """
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC)
    try:
        while True:
            sigio.clear()
            if host_connected(fd):
                return
            log.info("waiting for the host to open the channel")
            await sigio.wait()
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_ASYNC)


async def _open_channel(
    path: Path, sigio: asyncio.Event | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    st = os.stat(path)
    if stat.S_ISSOCK(st.st_mode):
        return await asyncio.open_unix_connection(str(path))
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if sigio is not None and stat.S_ISCHR(st.st_mode):
            await _wait_host_connected(fd, sigio)
        return await open_fd_streams(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


async def serve_channel(agent: Agent, channel: Path, ready: Path | None, *, reconnect: bool) -> int:
    """Serve the mux on ``channel`` until shutdown (0) or, without ``reconnect``, EOF (1)."""
    sigio: asyncio.Event | None = None
    if reconnect:
        sigio = asyncio.Event()

        def on_sigio() -> None:
            sigio.set()
            RESTORE.on_sigio()

        asyncio.get_running_loop().add_signal_handler(signal.SIGIO, on_sigio)
    while True:
        reader, writer = await _open_channel(channel, sigio)
        mux = ChannelMux(reader, writer, on_open=agent.handle_mux_session, name="agent-mux")
        task = mux.start()
        if ready is not None:
            await send_ready(ready, "channel")
        stop = asyncio.create_task(agent.shutdown.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            await send_farewell(ready, agent)
            await mux.aclose()
            return 0
        stop.cancel()
        await mux.aclose()
        if not reconnect:
            log.warning("channel %s closed", channel)
            return 1
        log.warning("channel %s closed by the host; waiting for it to reconnect", channel)


# --------------------------------------------------------------------------- main


def start_wayland(agent: Agent) -> None:
    """Bring up the VM user's Wayland display beside hello, not before it: waypipe's start
    (its libraries, under emulation ~0.6 s) stays off the boot's path. A session of the VM
    user that starts meanwhile waits for it (:attr:`Agent.desktop_up`), so a program run at
    once still finds its display. A failure costs windows, never the VM: it is logged."""
    bridge = WaylandBridge(agent.uid, agent.gid)
    agent.wayland = bridge
    agent.user_env = wayland_env(agent.uid)

    async def start() -> None:
        try:
            await bridge.start()
        except (TimeoutError, OSError) as e:
            log.error("windows are unavailable: cannot start the waypipe server: %s", e)
            await bridge.close()
            agent.wayland = None
            agent.user_env.clear()  # (sessions hold this dict)
        finally:
            agent.desktop_up.set()

    agent.desktop_up.clear()
    task = asyncio.ensure_future(start())
    _background.add(task)
    task.add_done_callback(_background.discard)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmsilo-agent", description="vmsilo guest agent")
    p.add_argument("--ready-port", default=READY_PORT, help="virtio-console port for hello")
    p.add_argument("--channel-port", default=CHANNEL_PORT, help="virtio-serial mux port")
    p.add_argument("--vsock-port", type=int, help="serve on this vsock port when vsock works")
    p.add_argument("--user", type=parse_user, help="UID:GID of the default guest user")
    p.add_argument("--auto-shutdown-after", type=float, metavar="S", help="idle power-off")
    p.add_argument("--channel-path", type=Path, help="(tests) channel file or Unix socket")
    p.add_argument("--ready-path", type=Path, help="(tests) ready file or Unix socket")
    p.add_argument(
        "--vsock-path", type=Path, help="(tests) serve vsock-style sessions on this Unix socket"
    )
    p.add_argument(
        "--waypipe", action="store_true", help="serve windows through waypipe (SPEC §9.1)"
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _use_pidfd_child_watcher() -> None:
    """Reap children through pidfds instead of a waiter thread per child (Python 3.11's
    default): one thread fewer to create for every command, which shows under emulation."""
    watcher_cls = getattr(asyncio, "PidfdChildWatcher", None)
    if watcher_cls is None or not hasattr(os, "pidfd_open"):
        return
    try:
        watcher = watcher_cls()
        watcher.attach_loop(asyncio.get_running_loop())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.get_event_loop_policy().set_child_watcher(watcher)
    except (OSError, NotImplementedError, RuntimeError):
        pass


async def serve(args: argparse.Namespace) -> int:
    _use_pidfd_child_watcher()
    uid, gid = args.user if args.user is not None else (os.getuid(), os.getgid())
    agent = Agent(uid, gid, args.auto_shutdown_after)
    agent.start()
    if args.waypipe:
        start_wayland(agent)
    RESTORE.settled = agent.desktop_up
    ready: Path | None = args.ready_path
    if ready is None and args.ready_port:
        ready = find_virtio_port(args.ready_port) or find_ready_console()
        if ready is None:
            log.error("virtio port %s not found: readiness cannot be announced", args.ready_port)
        else:
            log.info("readiness port %s is %s", args.ready_port, ready)

    # The host gives the guest a channel port only when it has no vsock: if the port exists,
    # it is the transport (the vsock driver may be loaded with no device behind it).
    channel: Path | None = args.channel_path
    if channel is None and args.channel_port and args.vsock_path is None:
        channel = find_virtio_port(args.channel_port)
    server: asyncio.Server | None = None
    if args.vsock_path is not None:
        server = await serve_vsock_emulated(agent, args.vsock_path)
    elif channel is None and args.vsock_port is not None and vsock_usable():
        server = await serve_vsock(agent, args.vsock_port)
    if server is not None:
        async with server:
            if ready is not None:
                await send_ready(ready, "vsock")
            await agent.shutdown.wait()
            await send_farewell(ready, agent)
        return 0
    if channel is None:
        log.error("virtio port %s not found and vsock unusable", args.channel_port)
        return 1
    reconnect = args.channel_path is None
    return await serve_channel(agent, channel, ready, reconnect=reconnect)


#: The signals vm-run forwards to a session's programs.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _caught(_signum: int, _frame: object) -> None:
    """Stands in for an inherited SIG_IGN: the agent still ignores the signal."""


def catch_ignored_signals() -> None:
    """An ignored signal stays ignored across ``exec``, so a parent that ignored SIGINT or
    SIGQUIT (e.g. a shell's background job) would pass that on to every program the agent
    runs, and a forwarded Ctrl-C would never end them. A caught signal is reset to its default
    by ``exec``: catch those signals instead (doing nothing), so the programs start with the
    defaults."""
    for signum in FORWARDED:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, _caught)


def main(argv: list[str] | None = None) -> int:
    """Agent entry point; see the module docstring for options and the return value."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="vmsilo-agent: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # Called in a forked child of the init: make sure no blocked signal is inherited by the
    # programs we run (forwarded SIGINT/TERM/HUP/QUIT must reach them) or hides SIGIO from us.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    catch_ignored_signals()
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
