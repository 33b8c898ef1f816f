"""Sidecar daemons a VM needs next to its VMM: one virtiofsd per share.

The supervisor binds every sidecar's listening socket itself, before the VMM starts, and hands
the fd to the daemon (``--fd=N``), so the VMM can never race a sidecar that is not listening
yet (the classic virtiofsd start race): the socket accepts connections from the moment it is
bound, whatever the daemon is doing. The daemons are started right after the VMM, which
meanwhile waits in its vhost-user handshake; starting them first would only put their start-up
on the path to the VMM.

:meth:`Sidecars.start` waits for each daemon to say it is serving (its "Waiting for vhost-user
socket connection" log line, which both flavors print before blocking in accept) or to exit.
That wait is not for the socket — it is so that a daemon that dies on a bad option, a missing
directory or a sandbox failure fails the start with its own error message instead of
surfacing as an opaque VMM connection error.

virtiofsd serves exactly one VMM connection and exits when it closes. A VMM restart under the
same supervisor (crosvm's reset → reboot) therefore needs a fresh daemon: a daemon that exits
cleanly after having served is respawned on the same listening socket. One that fails is not;
the supervisor's copy of its socket is then closed, so a VMM connecting afterwards gets
ECONNREFUSED at once rather than waiting on a socket nobody will ever accept on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from vmsilo.errors import VmsiloError
from vmsilo.host import virtiofsd
from vmsilo.host.preflight import share_setting
from vmsilo.host.sockets import bind_listening
from vmsilo.host.virtiofsd import VirtiofsdBinary
from vmsilo.plan.model import Plan, SharePlan, VmPlan
from vmsilo.runcmd import describe_status
from vmsilo.supervisor.daemon import SocketDaemon

#: How long a daemon may take to announce itself before the start goes on without the
#: announcement (a future virtiofsd that logs differently must not block VMs for ever; the
#: socket is listening either way, so going on is safe).
ANNOUNCE_TIMEOUT = 10.0


class ShareDaemon(SocketDaemon):
    """One share's virtiofsd: its listening socket, the current process and its stderr."""

    def __init__(
        self,
        vm: str,
        share: SharePlan,
        binary: VirtiofsdBinary,
        sock: socket.socket | None,
        on_failure: Callable[[str], None] | None,
        owner: virtiofsd.Owner,
    ) -> None:
        #: the listening socket: bound by the supervisor before the VMM started, or by start()
        super().__init__(sock)
        self.socket_path = share.socket
        self.vm = vm
        #: the config's user: the account guest ids become in the share (SPEC §11.4)
        self.owner = owner
        #: told why the daemon died once the VM was running (the guest's mount is broken now)
        self.on_failure = on_failure
        self.share = share
        self.binary = binary
        self.announced: asyncio.Event = asyncio.Event()
        self.drained: asyncio.Event = asyncio.Event()  # the current daemon's stderr hit EOF
        self.tail: collections.deque[str] = collections.deque(maxlen=8)
        self.failure: str | None = None
        self.spawns = 0
        self.serving = False  # wait_serving() succeeded: later deaths are reported by _watch

    @property
    def label(self) -> str:
        return f"virtiofsd for share {self.share.tag} of VM {self.vm}"

    def argv(self) -> list[str]:
        assert self.sock is not None
        return virtiofsd.launch_argv(self.binary, self.share, self.sock.fileno(), self.owner)

    async def start(self) -> None:
        if self.sock is None:
            self.sock = bind_listening(self.share.socket)
        await self._spawn()
        self.watcher = asyncio.ensure_future(self._watch())

    async def _spawn(self) -> None:
        assert self.sock is not None
        self.announced = asyncio.Event()
        self.drained = asyncio.Event()
        self.tail.clear()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(self.sock.fileno(),),
                start_new_session=True,
            )
        except OSError as e:
            raise VmsiloError(f"cannot start {self.label}: {e}", virtiofsd.INSTALL_HINT) from e
        self.spawns += 1

    async def _pump_stderr(self) -> None:
        """Relay the daemon's log to ours (prefixed) and notice its announcement."""
        assert self.proc is not None and self.proc.stderr is not None
        try:
            while line := await self.proc.stderr.readline():
                text = line.decode(errors="replace").rstrip()
                self.tail.append(text)
                print(f"virtiofsd[{self.vm}/{self.share.tag}]: {text}", file=sys.stderr)
                if virtiofsd.READY_MARK in line:
                    self.announced.set()
        finally:
            self.drained.set()

    async def wait_serving(self, timeout: float | None = None) -> None:
        """Return once the daemon announced itself; raise if it exited first."""
        assert self.proc is not None
        timeout = ANNOUNCE_TIMEOUT if timeout is None else timeout
        proc = self.proc
        exited = asyncio.ensure_future(proc.wait())
        announced = asyncio.ensure_future(self.announced.wait())
        try:
            await asyncio.wait(
                {exited, announced}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            announced.cancel()
            if not exited.done():
                exited.cancel()
        if proc.returncode is not None:
            # the error message is the daemon's last words: let the relay read them first
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), timeout=2)
            raise VmsiloError(self._died_message(proc.returncode), self._hint())
        self.serving = True
        if not self.announced.is_set():
            print(
                f"vmsilo supervisor: {self.label} did not announce itself within {timeout:.0f} s;"
                " going on (its socket is listening)",
                file=sys.stderr,
            )

    def _died_message(self, code: int) -> str:
        said = "; ".join(t for t in self.tail if t) or "no output"
        return (
            f"{self.label} ({self.binary.path}, {self.binary.flavor} flavor) exited before the VM"
            f" started: {describe_status(code)}: {said}"
        )

    def _hint(self) -> str:
        return (
            f"check that {self.share.host_path} is a directory the daemon can share (the user"
            f" {self.owner[0]} must be able to reach it); run"
            f" `{' '.join(virtiofsd.daemon_argv(self.binary, self.share, 3, self.owner))}` by"
            " hand to see more"
        )

    async def _watch(self) -> None:
        """For the daemon's whole life: relay its log; respawn it after a served connection."""
        while True:
            proc = self.proc
            assert proc is not None
            await asyncio.gather(self._pump_stderr(), proc.wait())
            if self.stopping:
                return
            code = proc.returncode
            assert code is not None
            if code == 0 and self.announced.is_set():
                # it served a VMM that went away (a reset): be ready for the next one
                await self._spawn()
                continue
            self.failure = self._died_message(code).replace(
                "exited before the VM started", "exited"
            )
            if self.serving:  # before that, wait_serving() reports it as the start's error
                print(f"vmsilo supervisor: {self.failure}", file=sys.stderr)
                if self.on_failure is not None:
                    self.on_failure(self.failure)
            self.close_socket()  # a VMM connecting now fails at once instead of hanging
            return


class Sidecars:
    """The running sidecars of one VM, stopped in reverse order of start."""

    def __init__(
        self,
        locate: Callable[[], VirtiofsdBinary] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.locate = locate or virtiofsd.locate
        #: called with the reason when a daemon dies after the start
        self.on_failure = on_failure
        self.daemons: list[ShareDaemon] = []

    @property
    def procs(self) -> list[asyncio.subprocess.Process]:
        return [d.proc for d in self.daemons if d.proc is not None]

    async def start(
        self, plan: Plan, vm: VmPlan, sockets: Mapping[str, socket.socket] | None = None
    ) -> None:
        """Start every share's virtiofsd and wait until each one serves.

        ``sockets``: the shares' listening sockets by tag, already bound (the supervisor binds
        them before the VMM starts, so the VMM may already be waiting on them); a share
        missing there gets its socket bound here."""
        if not vm.shares:
            return
        for share in vm.shares:
            if not Path(share.host_path).is_dir():
                raise VmsiloError(
                    f"VM {vm.name}: share {share.tag}: host directory {share.host_path} does not"
                    " exist",
                    f"create it, or fix {share_setting(share)}",
                )
        binary = await asyncio.to_thread(self.locate)
        for share in vm.shares:
            daemon = ShareDaemon(
                vm.name,
                share,
                binary,
                (sockets or {}).get(share.tag),
                self.on_failure,
                (plan.user.uid, plan.user.gid),
            )
            self.daemons.append(daemon)
            await daemon.start()
        # all daemons are already starting in parallel; waiting in order keeps errors stable
        for daemon in self.daemons:
            await daemon.wait_serving()

    @property
    def failure(self) -> str | None:
        """Why a sidecar died after the start (None while all are fine)."""
        return next((d.failure for d in self.daemons if d.failure), None)

    async def stop(self) -> None:
        for daemon in reversed(self.daemons):
            await daemon.stop()
        self.daemons.clear()
