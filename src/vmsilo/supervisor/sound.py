"""The vhost-user sound daemon next to a crosvm VMM (upstream flavor; SPEC §9.2).

Run like virtiofsd (:mod:`.sidecars`): the supervisor bound ``R/<vm>-sound.socket`` before the
VMM started and hands the daemon that listening fd (``--socket-fd``), so the VMM, which may
already wait in its vhost-user handshake, never races the daemon. vhost-device-sound serves
one VMM connection after another on that fd, so a crosvm reset needs no respawn.

The daemon runs as the desktop user (it talks to that user's PipeWire; it needs no privilege:
guest memory comes to it as fds over the socket). Sound is never worth a VM: when the daemon
dies, the supervisor closes its copy of the socket (a VMM connecting later fails at once
instead of hanging), says why in ``status`` and lets the VM run on.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Callable

from vmsilo.backends.base import SoundSidecar
from vmsilo.errors import VmsiloError
from vmsilo.host.sound import SOUND_DEVICE_HINT
from vmsilo.runcmd import describe_status
from vmsilo.supervisor.daemon import SocketDaemon


class SoundDaemon(SocketDaemon):
    """One VM's sound daemon: its process, its log relayed to ours, its end reported."""

    def __init__(
        self,
        vm: str,
        sidecar: SoundSidecar,
        sock: socket.socket,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(sock)
        self.vm = vm
        self.sidecar = sidecar
        self.socket_path = sidecar.socket
        self.on_failure = on_failure
        self.failure: str | None = None
        self.last_line = ""

    @property
    def label(self) -> str:
        return f"sound daemon {self.sidecar.binary} of VM {self.vm}"

    async def start(self) -> None:
        assert self.sock is not None
        fd = self.sock.fileno()
        env = {**os.environ, **dict(self.sidecar.env)}
        drop = os.geteuid() == 0 and self.sidecar.uid != 0  # to the desktop user
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.sidecar.argv(fd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(fd,),
                start_new_session=True,
                env=env,
                user=self.sidecar.uid if drop else None,
                group=self.sidecar.gid if drop else None,
                extra_groups=[] if drop else None,
            )
        except OSError as e:
            raise VmsiloError(f"cannot start the {self.label}: {e}", SOUND_DEVICE_HINT) from e
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self.last_line = text
            print(f"sound[{self.vm}]: {text}", file=sys.stderr)
        code = await proc.wait()
        if self.stopping:
            return
        said = f": {self.last_line}" if self.last_line else ""
        self.failure = f"{self.label} exited ({describe_status(code)}){said}; sound is off"
        print(f"vmsilo supervisor: {self.failure}", file=sys.stderr)
        self.close_socket()
        if self.on_failure is not None:
            self.on_failure(self.failure)
