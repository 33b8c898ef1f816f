"""One exec session in the guest agent: run exactly the requested argv and relay its stdio.

The program runs without a shell (``CMD ARG…`` byte for byte), in a new session and process
group so that forwarded signals and the hang-up on client disconnect reach everything it
started. Its stdout and stderr stay separate (one pty for both with ``tty``). Output is sent
only within the client's flow-control credit; stdin is accepted only within the window the
agent granted, and credit goes back once the program has taken the bytes, so a fast client
cannot make the agent buffer unboundedly and a slow client slows only its own program.

Exit status: the program's; 127 if it was not found, 126 if it could not be executed, 128+N if
killed by signal N. ``detach`` replies as soon as the program started (stdio on /dev/null) and
the agent keeps counting it as a session until it exits.

Standard library only: this module runs in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import pwd
import signal
import struct
import subprocess
import termios
from dataclasses import dataclass
from typing import Any, Protocol

from vmsilo.channel.mux import Link, error_code
from vmsilo.channel.pipes import PipeReader, PipeWriter, open_pipe_reader, open_pipe_writer
from vmsilo.channel.protocol import (
    CHUNK,
    FRAME_COST,
    WINDOW,
    ExecRequest,
    Frame,
    FrameType,
    ProtocolError,
    decode_signal,
    decode_u32,
    decode_winsize,
    encode_error,
    encode_exit,
    encode_u32,
    status_from_returncode,
)

log = logging.getLogger(__name__)

USER_PATH = b"/usr/local/bin:/usr/bin:/bin"
#: Seconds a hung-up program may keep writing (into the void) before its pipes are closed.
HANGUP_GRACE = 5.0
ROOT_PATH = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SessionTracker(Protocol):
    """What an exec session needs from the agent: live-session accounting."""

    def session_started(self) -> None: ...

    def session_ended(self) -> None: ...


@dataclass(frozen=True)
class Identity:
    """Who a program runs as, and the base environment that goes with it."""

    uid: int
    gid: int
    name: str
    home: str
    shell: str
    groups: tuple[int, ...]


class UnknownUserError(Exception):
    pass


def resolve_user(name: str | None, default_uid: int, default_gid: int) -> Identity:
    """Map a request's user (None = the guest user, "root", or another name) to ids."""
    if name is None:
        uid, gid = default_uid, default_gid
        try:
            pw: pwd.struct_passwd | None = pwd.getpwuid(uid)
        except KeyError:
            pw = None
    else:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            if name != "root":
                raise UnknownUserError(f"no such user in the guest: {name}") from None
            pw = None
        uid, gid = (pw.pw_uid, pw.pw_gid) if pw is not None else (0, 0)
    if pw is not None:
        uname, home, shell = pw.pw_name, pw.pw_dir, pw.pw_shell
        try:
            groups = tuple(os.getgrouplist(uname, gid))
        except OSError:
            groups = (gid,)
    else:
        uname = "root" if uid == 0 else str(uid)
        home = "/root" if uid == 0 else "/"
        shell, groups = "/bin/sh", (gid,)
    return Identity(uid, gid, uname, home or "/", shell or "/bin/sh", groups)


def build_env(
    ident: Identity, request: ExecRequest, session: dict[bytes, bytes] | None = None
) -> dict[bytes, bytes]:
    """A clean environment for the user, the session's additions (the VM user's desktop), then
    the request's K=V additions (which win)."""
    env: dict[bytes, bytes] = {
        b"PATH": ROOT_PATH if ident.uid == 0 else USER_PATH,
        b"HOME": os.fsencode(ident.home),
        b"USER": os.fsencode(ident.name),
        b"LOGNAME": os.fsencode(ident.name),
        b"SHELL": os.fsencode(ident.shell),
        b"LANG": b"C.UTF-8",
    }
    if request.tty:
        env[b"TERM"] = os.fsencode(request.term or "xterm-256color")
    env.update(session or {})
    for entry in request.env_bytes():
        key, _, value = entry.partition(b"=")
        env[key] = value
    return env


def credential_changes(ident: Identity) -> dict[str, Any]:
    """The ``subprocess`` arguments that give a program ``ident``'s credentials.

    Python starts a program with ``vfork`` only when it changes no credentials, and a full
    ``fork`` of the agent costs several times more (page tables copied, every page the agent
    writes afterwards faulted in again), which shows under emulation. So when the agent (root)
    runs a root program it first takes root's supplementary groups itself, once, and then
    passes nothing; other users get the full change.
    """
    if os.geteuid() != 0:
        return {}  # tests on the host: no switching
    groups = list(ident.groups)
    if ident.uid == 0 and ident.gid == os.getgid():
        if sorted(os.getgroups()) != sorted(set(groups)):
            os.setgroups(groups)
        return {}
    if ident.uid == 0:
        return {"group": ident.gid, "extra_groups": groups}
    return {"user": ident.uid, "group": ident.gid, "extra_groups": groups}


def _set_controlling_tty() -> None:
    """preexec_fn for pty sessions: runs after setsid(); make stdin (the slave) our ctty."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    if rows > 0 and cols > 0:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class SpawnError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_STDIN_EOF = object()


class ExecSession:
    """Serve one session on ``link`` from its OPEN frame to the program's exit."""

    def __init__(
        self,
        link: Link,
        tracker: SessionTracker,
        *,
        default_uid: int,
        default_gid: int,
        request: ExecRequest | None = None,
        user_env: dict[bytes, bytes] | None = None,
        desktop_up: asyncio.Event | None = None,
    ) -> None:
        self.link = link
        #: the OPEN request when the caller already read it (else run() reads it)
        self.given = request
        #: added to the default user's environment (the Wayland session, SPEC §9.1)
        self.user_env = user_env or {}
        #: set once that session's display is up (a program of the user waits for it)
        self.desktop_up = desktop_up
        self.tracker = tracker
        self.default_uid = default_uid
        self.default_gid = default_gid
        self.proc: asyncio.subprocess.Process | None = None
        self.request: ExecRequest | None = None
        self.outputs: list[tuple[PipeReader, FrameType]] = []
        self.stdin: PipeWriter | None = None
        self.pty_master: int | None = None
        # Credits we may still spend on output frames; granted by the client.
        self.credit = WINDOW
        self._credit_event = asyncio.Event()
        # Stdin cost received but not yet written to the program (must stay within WINDOW).
        self.stdin_unacked = 0
        self.stdin_eof = False
        self._stdin_queue: asyncio.Queue[object] = asyncio.Queue()
        self._credit_to_return = 0
        # Set once the client is gone: output is drained and dropped.
        self.discard = False

    # ------------------------------------------------------------------ entry

    async def run(self) -> None:
        request = self.given or await self._read_open()
        if request is None:
            return
        self.request = request
        try:
            await self._spawn(request)
        except SpawnError as e:
            await self.link.send(FrameType.EXIT, encode_exit(e.status, e.message))
            return
        except UnknownUserError as e:
            await self.link.send(FrameType.ERROR, encode_error("user", str(e)))
            return
        assert self.proc is not None
        if request.detach:
            self._track_detached(self.proc)
            await self.link.send(FrameType.EXIT, encode_exit(0))
            return
        await self._serve(self.proc)

    async def _read_open(self) -> ExecRequest | None:
        try:
            frame = await self.link.recv()
            if frame is None:
                return None
            if frame.type != FrameType.OPEN:
                raise ProtocolError("a session must start with an OPEN frame")
            return ExecRequest.decode(frame.payload)
        except ProtocolError as e:
            await self.link.send(FrameType.ERROR, encode_error(error_code(e), str(e)))
            return None

    # ------------------------------------------------------------------ spawn

    async def _spawn(self, req: ExecRequest) -> None:
        ident = resolve_user(req.user, self.default_uid, self.default_gid)
        if ident.uid == self.default_uid and self.desktop_up is not None:
            await self.desktop_up.wait()  # only right after boot: the display is coming up
        desktop = self.user_env if ident.uid == self.default_uid else None
        env = build_env(ident, req, desktop)
        cwd = req.cwd_bytes()
        if cwd is None:
            cwd = os.fsencode(ident.home) if os.path.isdir(ident.home) else b"/"
        argv = req.argv_bytes()
        kwargs = credential_changes(ident)
        child_fds: list[int] = []
        parent: list[int] = []
        try:
            if req.detach:
                stdio: dict[str, Any] = {
                    "stdin": subprocess.DEVNULL,
                    "stdout": subprocess.DEVNULL,
                    "stderr": subprocess.DEVNULL,
                }
            elif req.tty:
                master, slave = os.openpty()
                os.set_inheritable(master, False)
                child_fds.append(slave)
                self.pty_master = master
                set_winsize(slave, req.rows, req.cols)
                stdio = {"stdin": slave, "stdout": slave, "stderr": slave}
                kwargs["preexec_fn"] = _set_controlling_tty
            else:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                child_fds += [in_r, out_w, err_w]
                parent += [in_w, out_r, err_r]
                stdio = {"stdin": in_r, "stdout": out_w, "stderr": err_w}
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    argv[0], *argv[1:], env=env, cwd=cwd, start_new_session=True, **stdio, **kwargs
                )
            except FileNotFoundError as e:
                if e.filename is not None and os.fsencode(e.filename) == cwd:
                    raise SpawnError(
                        126, f"cannot change to directory {os.fsdecode(cwd)}"
                    ) from None
                raise SpawnError(127, f"{os.fsdecode(argv[0])}: command not found") from None
            except PermissionError:
                raise SpawnError(126, f"{os.fsdecode(argv[0])}: Permission denied") from None
            except OSError as e:
                raise SpawnError(126, f"{os.fsdecode(argv[0])}: {e.strerror or e}") from None
            except (ValueError, subprocess.SubprocessError) as e:
                raise SpawnError(126, f"{os.fsdecode(argv[0])}: {e}") from None
        except BaseException:
            for fd in parent:
                os.close(fd)
            if self.pty_master is not None:
                os.close(self.pty_master)
                self.pty_master = None
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        if req.detach:
            return
        if req.tty:
            assert self.pty_master is not None
            master = self.pty_master
            self.outputs = [(await open_pipe_reader(os.dup(master)), FrameType.STDOUT)]
            self.stdin = await open_pipe_writer(os.dup(master))
        else:
            self.stdin = await open_pipe_writer(parent[0])
            self.outputs = [
                (await open_pipe_reader(parent[1]), FrameType.STDOUT),
                (await open_pipe_reader(parent[2]), FrameType.STDERR),
            ]

    def _track_detached(self, proc: asyncio.subprocess.Process) -> None:
        """A detached program counts as a session until it exits."""
        self.tracker.session_started()

        async def reap() -> None:
            try:
                await proc.wait()
            finally:
                self.tracker.session_ended()

        task = asyncio.get_running_loop().create_task(reap())
        _background.add(task)
        task.add_done_callback(_background.discard)

    # ------------------------------------------------------------------ serve

    async def _serve(self, proc: asyncio.subprocess.Process) -> None:
        receiver = asyncio.create_task(self._receive())
        stdin_task = asyncio.create_task(self._stdin_writer())
        pumps = [asyncio.create_task(self._pump(r, t)) for r, t in self.outputs]

        async def finished() -> int:
            rc = await proc.wait()
            await asyncio.gather(*pumps)
            return rc

        done_task = asyncio.create_task(finished())
        try:
            await asyncio.wait({done_task, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if done_task.done():
                rc = done_task.result()
                await self.link.send(FrameType.EXIT, encode_exit(status_from_returncode(rc)))
                return
            problem = receiver.result()
            if problem is not None:
                await self.link.send(
                    FrameType.ERROR, encode_error(error_code(problem), str(problem))
                )
            # The client is gone (or broke the protocol): hang up the program like a terminal
            # would. Its output is drained and discarded for a grace period so that it can
            # react to SIGHUP (a shell reporting "Hangup" on a closed stderr would die of
            # SIGPIPE instead); then its pipes are closed so a program ignoring SIGHUP does
            # not write into the void forever. It counts as a session until it exits.
            self.discard = True
            self._credit_event.set()
            kill_group(proc.pid, signal.SIGHUP)
            try:
                await asyncio.wait_for(asyncio.shield(done_task), HANGUP_GRACE)
            except TimeoutError:
                self._close_stdio()
                await proc.wait()
        finally:
            for t in (receiver, stdin_task, done_task, *pumps):
                t.cancel()
            for t in (receiver, stdin_task, done_task, *pumps):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self._close_stdio()

    def _close_stdio(self) -> None:
        for reader, _ in self.outputs:
            reader.close()
        if self.stdin is not None:
            self.stdin.abort()
        if self.pty_master is not None:
            with contextlib.suppress(OSError):
                os.close(self.pty_master)
            self.pty_master = None

    async def _pump(self, reader: PipeReader, ftype: FrameType) -> None:
        """Relay one output pipe within the client's credit, until EOF."""
        while await reader.wait():
            if self.discard:
                reader.take(len(reader.buffer))
                continue
            while self.credit <= FRAME_COST and not self.discard:
                self._credit_event.clear()
                await self._credit_event.wait()
            if not reader.buffer or self.discard:
                continue
            chunk = reader.take(min(CHUNK, self.credit - FRAME_COST))
            self.credit -= len(chunk) + FRAME_COST
            await self.link.send(ftype, chunk)

    async def _receive(self) -> ProtocolError | None:
        """Handle client frames; returns when the client is gone (None) or misbehaved."""
        while True:
            try:
                frame = await self.link.recv()
                if frame is None or frame.type in (FrameType.RESET, FrameType.ERROR):
                    return None
                self._handle(frame)
            except ProtocolError as e:
                return e

    def _handle(self, frame: Frame) -> None:
        t = frame.type
        if t == FrameType.STDIN:
            if self.stdin_eof:
                raise ProtocolError("stdin data after EOF")
            self.stdin_unacked += frame.cost
            if self.stdin_unacked > WINDOW:
                raise ProtocolError("client exceeded its stdin flow-control window")
            self._stdin_queue.put_nowait(frame)
        elif t == FrameType.STDIN_EOF:
            if not self.stdin_eof:
                self.stdin_eof = True
                self._stdin_queue.put_nowait(_STDIN_EOF)
        elif t == FrameType.CREDIT:
            self.credit += decode_u32(frame.payload)
            if self.credit > WINDOW:
                raise ProtocolError("client returned more credit than it was given")
            self._credit_event.set()
        elif t == FrameType.SIGNAL:
            signum = decode_signal(frame.payload)
            assert self.proc is not None
            kill_group(self.proc.pid, signum)
        elif t == FrameType.WINSIZE:
            rows, cols = decode_winsize(frame.payload)
            if self.pty_master is not None:
                with contextlib.suppress(OSError):
                    set_winsize(self.pty_master, rows, cols)
        else:
            raise ProtocolError(f"unexpected frame type {t} in a running session")

    async def _stdin_writer(self) -> None:
        """Feed the program's stdin in order; give credit back once the bytes are taken."""
        while True:
            item = await self._stdin_queue.get()
            if item is _STDIN_EOF:
                await self._flush_credit()
                # A pty has no half-close: EOF on the terminal would need an EOF character,
                # which could surprise an interactive program; ignore it there.
                if self.request is not None and not self.request.tty and self.stdin is not None:
                    self.stdin.close()
                continue
            assert isinstance(item, Frame)
            if self.stdin is not None and not self.stdin.closed:
                try:
                    await self.stdin.write(item.payload)
                except (BrokenPipeError, ConnectionError, OSError) as e:
                    # The program closed its stdin: drop the rest, but keep returning credit
                    # so the client does not stall.
                    if not isinstance(e, BrokenPipeError) and getattr(e, "errno", None) not in (
                        errno.EPIPE,
                        errno.EIO,
                        None,
                    ):
                        log.debug("stdin write failed: %s", e)
            self.stdin_unacked -= item.cost
            self._credit_to_return += item.cost
            if self._credit_to_return >= WINDOW // 4 or self._stdin_queue.empty():
                await self._flush_credit()

    async def _flush_credit(self) -> None:
        if self._credit_to_return:
            n, self._credit_to_return = self._credit_to_return, 0
            await self.link.send(FrameType.CREDIT, encode_u32(n))


_background: set[asyncio.Task[None]] = set()
