"""A VM's launch up to its running VMM, done before the supervisor's event loop exists.

A cold ``vm-run`` waits for exactly this path, so it is synchronous and imports neither asyncio
nor the channel code; those load afterwards, in :mod:`vmsilo.supervisor.service`, while the
guest boots. Under the VM's lock it writes the state file and the plan snapshot, refuses to
take identities a running VM holds (:mod:`.identities`), runs the preflight checks, binds the
command socket (``bound`` to the spawner), starts the netvm, binds every socket the VMM
connects to, closes the host's input from the VM's links, creates taps, host NAT and the shared
home, binds the share sockets (and the sound daemon's), creates a fresh ephemeral disk and
starts the VMM.

Every socket is listening before the VMM starts, so the VMM's connections (and vm-run's) wait
in their backlog until the supervisor's loop accepts them; the virtiofsd daemons the supervisor
starts next find the VMM already waiting on their sockets. Nobody races a server that is not
up yet, and nobody retries.

A failure is recorded in ``failure``, never raised: the supervisor's single cleanup path then
undoes whatever was done. SIGTERM, SIGINT and SIGHUP (and SIGQUIT, the kill-now request) are
remembered meanwhile (the supervisor stops the VM as soon as its loop runs) and keep the VMM
from being started at all.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from vmsilo.backends.base import SoundSidecar
from vmsilo.backends.registry import backend_for, launch
from vmsilo.backends.vmm import Vmm
from vmsilo.errors import VmsiloError
from vmsilo.host.disks import create_ephemeral_disk, remove_file
from vmsilo.host.sockets import bind_listening
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.supervisor.identities import refuse_shared_identities
from vmsilo.supervisor.notify import SpawnerPipe, sd_notify
from vmsilo.supervisor.snapshot import write_snapshot
from vmsilo.supervisor.state import KILL_SIGNAL, VmLock, VmState, now, read_state, write_state

if TYPE_CHECKING:
    from vmsilo.supervisor.saved import SavedState

#: Signals that stop a VM (the supervisor's loop takes them over from the prelaunch).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class ServiceOptions:
    config_path: str
    config_text: str
    listen_fd: int | None = None  # the command socket, from systemd (LISTEN_FDS)
    spawner_fd: int | None = None  # milestone pipe of an embedded spawner
    console_on_tty: bool = False  # vm-start-debug: console on our terminal
    #: start the VM's netvm and wait until it is ready (embedded mode; systemd orders units)
    start_netvm: Callable[[str], None] | None = None


def failure_of(exc: Exception) -> str:
    """What a failed start or run reports: a VmsiloError's own words; anything else is a bug,
    reported as an internal error and logged with its traceback (cleanup still runs)."""
    if isinstance(exc, VmsiloError):
        return str(exc)
    message = f"internal error: {type(exc).__name__}: {exc}"
    print(f"vmsilo supervisor: {message}", file=sys.stderr)
    traceback.print_exc()
    return message


class Prelaunch:
    """One VM's launch state up to the VMM; the supervisor takes it over afterwards."""

    def __init__(self, plan: Plan, vm: VmPlan, options: ServiceOptions) -> None:
        self.plan = plan
        self.vm = vm
        self.opts = options
        self.lock = VmLock(vm.paths.lock)
        self.spawner = SpawnerPipe(options.spawner_fd)
        self.state = VmState(state="starting", supervisor_pid=os.getpid(), hypervisor=vm.hypervisor)
        self.failure: str | None = None
        self.stop_requested = False
        self.kill_requested = False  # KILL_SIGNAL: no power button once the loop runs
        self.owns_command_socket = options.listen_fd is None
        self.command_sock: socket.socket | None = None
        #: listening sockets the VMM connects to, by path
        self.listeners: dict[str, socket.socket] = {}
        #: the shares' listening sockets, by tag (their virtiofsd starts after the VMM)
        self.share_sockets: dict[str, socket.socket] = {}
        #: the sound daemon the VMM needs (crosvm upstream) and its listening socket
        self.sound: SoundSidecar | None = None
        self.sound_socket: socket.socket | None = None
        self.vmm: Vmm | None = None
        #: fastStart: the VM's saved state under the current key (None: no fastStart)
        self.saved: SavedState | None = None
        #: whether the VMM started waits for that saved state instead of booting
        self.restoring = False

    def set_state(self, state: str, **changes: Any) -> None:
        self.state.state = state  # type: ignore[assignment]
        for key, value in changes.items():
            setattr(self.state, key, value)
        write_state(self.vm.paths.state_file, self.state, group=self.plan.user.gid)
        sd_notify(f"STATUS={state}")

    # ------------------------------------------------------------------ the launch

    def run(self) -> None:
        """Take the VM's lock (raises if another supervisor has it), then launch."""
        self.lock.acquire(self.vm.name, group=self.plan.user.gid)
        previous = read_state(self.vm.paths.state_file)
        if previous is not None:
            self.state.last_exit = previous.last_exit
        self._remember_stop_signals()
        try:
            self._launch()
        except Exception as e:
            self.failure = failure_of(e)

    def _launch(self) -> None:
        vm = self.vm
        self.set_state("starting", started_at=now(), ready_at=None, vmm_pid=None, detail=None)
        snap = write_snapshot(
            vm.paths.plan_snapshot,
            self.opts.config_path,
            self.opts.config_text,
            vm,
            group=self.plan.user.gid,
        )
        self.state.config_hash = snap.config_hash
        # after our own snapshot is written (two racing starts see each other) and before
        # anything of the host is touched: a config edit must not hand us a running VM's
        # CID, taps, bridge, /31 or nft tables (SPEC §11.6)
        refuse_shared_identities(self.plan, vm)
        self.spawner.send("step checking the host")
        backend_for(vm).preflight(self.plan, vm)
        self._bind_command_socket()
        self.spawner.send("bound")
        if vm.netvm not in (None, "host") and self.opts.start_netvm is not None:
            self.spawner.send(f"step starting its netvm {vm.netvm}")
            self.opts.start_netvm(str(vm.netvm))
        p = vm.paths
        for path in (p.console_backend, p.ready_socket, p.channel_socket):
            self.listeners[path] = bind_listening(path)
        self.listeners[p.console] = bind_listening(p.console, owner=self._user_ids())
        self._prepare_network()
        self._prepare_home()
        for share in vm.shares:
            self.share_sockets[share.tag] = bind_listening(share.socket)
        if not self.stop_requested:
            self.start_vmm()

    def start_vmm(self, *, restore: bool = True) -> Vmm:
        """A fresh ephemeral disk and a new VMM process (also for a crosvm reset's reboot).

        fastStart (SPEC §10): with a complete saved state under the current key (and
        ``restore``), the VMM loads it (QEMU waits for it with ``-incoming``, crosvm reads it
        with ``--restore``) and the disk is a fresh copy of the
        saved one (:attr:`restoring`; the supervisor loads it); otherwise the guest boots
        and the supervisor saves it once ready (:attr:`saved`, with :attr:`restoring` false)."""
        vm = self.vm
        for path in (vm.paths.qmp, vm.paths.crosvm_control):
            remove_file(path)
        backend = backend_for(vm)
        slow = backend.probe_step(self.plan, vm)
        if slow is not None:
            self.spawner.send(f"step {slow}")
        # the very call `vmsilo argv` makes (there with the accelerator verdict cached)
        argv, facts = launch(self.plan, vm, probe=True, backend=backend)
        self.restoring = False
        self.saved = None
        if vm.fast_start and backend.saves_state:
            from vmsilo.supervisor import saved

            self.saved = saved.SavedState(
                saved.saved_root(self.plan.state_dir, vm.name),
                saved.state_key(self.plan, vm, backend, facts),
            )
            if restore and self.saved.complete():
                try:
                    saved.restore_disk(vm, self.saved)
                    self.restoring = True
                except OSError as e:
                    saved.log(vm, f"cannot copy the saved disk ({e}); booting instead")
            if self.restoring:
                facts = replace(facts, restore_from=str(self.saved.state))
                argv = backend.argv(self.plan, vm, facts)
        if vm.root_overlay == "raw" and not self.restoring:
            create_ephemeral_disk(vm.paths.ephemeral_disk, vm.root_overlay_size)
        fds: tuple[int, int] | None = None
        if self.saved is not None and facts.runas is not None and vm.root_overlay == "raw":
            # saving inactivates the disk and `cont` activates it again, reopening it: QEMU,
            # dropped to the user, gets it from descriptors we open (the file stays root's)
            disk = vm.paths.ephemeral_disk
            fds = (
                os.open(disk, os.O_RDWR | os.O_CLOEXEC),
                os.open(disk, os.O_RDONLY | os.O_CLOEXEC),
            )
            facts = replace(facts, ephemeral_fds=fds)
            argv = backend.argv(self.plan, vm, facts)
        self._prepare_sound(backend.sound_sidecar(self.plan, vm, facts))
        self.state.extra["sound"] = {"available": facts.sound.available, "why": facts.sound.why}
        if facts.sound.why is not None:
            print(f"vmsilo supervisor: VM {vm.name}: sound: {facts.sound.why}", file=sys.stderr)
        self.vmm = backend.vmm(self.plan, vm, argv)
        self.spawner.send(f"step starting {backend.name}")
        try:
            self.vmm.pass_fds = fds or ()
            pid = self.vmm.start()
        finally:
            for fd in fds or ():
                os.close(fd)
        self.state.extra["vmm_started_at"] = now()
        if vm.fast_start:
            self.state.extra["start"] = "restoring" if self.restoring else "booted"
        self.set_state("starting", vmm_pid=pid)
        self.spawner.send(
            "step restoring the saved state" if self.restoring else "step booting the guest"
        )
        return self.vmm

    # ------------------------------------------------------------------ steps

    def _user_ids(self) -> tuple[int, int]:
        return self.plan.user.uid, self.plan.user.gid

    def _bind_command_socket(self) -> None:
        if self.opts.listen_fd is not None:
            self.command_sock = socket.socket(fileno=self.opts.listen_fd)
        else:
            self.command_sock = bind_listening(self.vm.paths.command_socket, owner=self._user_ids())

    def _prepare_network(self) -> None:
        vm = self.vm
        if not vm.interfaces:
            return
        self.spawner.send("step setting up the network")
        from vmsilo.host.input_filter import setup_input_filter
        from vmsilo.host.nat import setup_host_nat
        from vmsilo.host.network import attach_to_bridge, setup_interfaces

        setup_input_filter(vm)  # before a tap exists: the host is closed to it from the start
        setup_interfaces(vm)
        setup_host_nat(self.plan, vm)
        # re-join a running peer's tap to a link bridge we just (re)created
        for i in vm.interfaces:
            if i.bridge is None or i.injected_for in (None, "host"):
                continue
            peer = self.plan.vms.get(str(i.injected_for))
            if peer is None:
                continue
            for pi in peer.interfaces:
                if pi.bridge == i.bridge and pi.injected_for == vm.name:
                    attach_to_bridge(pi.tap, i.bridge)

    def _prepare_sound(self, sidecar: SoundSidecar | None) -> None:
        """Bind the sound daemon's socket before the VMM connects to it (the daemon starts
        after the VMM, like virtiofsd). A crosvm reset's reboot keeps the first one: the
        daemon serves one VMM after another on the same socket."""
        if sidecar is None or self.sound_socket is not None:
            return
        self.sound = sidecar
        self.sound_socket = bind_listening(sidecar.socket)

    def _prepare_home(self) -> None:
        for share in self.vm.shares:
            if share.tag != "home":
                continue
            home = Path(share.host_path)
            if not home.exists():
                home.mkdir(parents=True, mode=0o700)
                os.chown(home, *self._user_ids())

    def _remember_stop_signals(self) -> None:
        """Until the supervisor's loop takes the stop signals over, only remember them."""

        def remember(signum: int, _frame: FrameType | None) -> None:
            self.stop_requested = True
            if signum == KILL_SIGNAL:
                self.kill_requested = True

        for sig in (*STOP_SIGNALS, KILL_SIGNAL):
            signal.signal(sig, remember)

    def close_unserved(self) -> None:
        """Close the sockets nobody took over (a launch that failed or was stopped early)."""
        for sock in (*self.listeners.values(), *self.share_sockets.values()):
            sock.close()
        self.listeners.clear()
        self.share_sockets.clear()
        if self.sound_socket is not None:
            self.sound_socket.close()
            self.sound_socket = None
