"""The per-VM supervisor (``vmsilo service vm VM``): one process owns one running VM.

Under the VM's lock, :mod:`vmsilo.supervisor.prelaunch` first does everything up to a running
VMM without an event loop (command socket, preflight, netvm, the VMM's sockets, taps, shared
home, ephemeral disk, the VMM). :class:`Supervisor` then takes that launch over whole, serves
the bound sockets, starts the shares' virtiofsd daemons (the VMM is already waiting on their
sockets), waits for the guest's ``hello`` on ``org.vmsilo.ready`` (READY=1 for systemd),
relays every ``vm-run`` connection to the guest agent, and on SIGTERM stops the guest with the
power button, then the VMM after ``stopTimeout`` (on SIGQUIT, ``vmsilo stop --kill``, it kills
the VMM at once). Whatever way it ends — guest poweroff, stop,
VMM crash, start failure — the same cleanup runs and the exit reason is kept in the state file
for ``vmsilo status``.

The rooms it drives: :mod:`.readiness` (the hello and the channel port), :mod:`.sessions`
(the command socket), :mod:`.stopping` (power button, kill, cleanup, final state),
:mod:`.guest_tasks` (netvm routing and hold, the debug tty) and :mod:`.sidecars`.

Everything is event-driven: sockets, child exit and signals wake the loop; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

from vmsilo.backends.registry import backend_for
from vmsilo.backends.vmm import ResumeFailed, Vmm, VmmExit
from vmsilo.channel.mux import Link
from vmsilo.channel.protocol import ChannelError
from vmsilo.errors import VmsiloError
from vmsilo.supervisor import guest_tasks, saved, stopping
from vmsilo.supervisor.console import ConsoleLog, ConsoleRelay
from vmsilo.supervisor.notify import sd_notify
from vmsilo.supervisor.prelaunch import STOP_SIGNALS, Prelaunch, failure_of
from vmsilo.supervisor.readiness import Readiness
from vmsilo.supervisor.sessions import Sessions, refuse_queued
from vmsilo.supervisor.sidecars import Sidecars
from vmsilo.supervisor.sound import SoundDaemon
from vmsilo.supervisor.state import KILL_SIGNAL, now
from vmsilo.supervisor.windows import Bridge, DesktopUnavailable, WindowStreams, open_vsock_link

#: Longest wait for a restored guest's hello before it boots instead (s; at most startTimeout).
RESTORE_TIMEOUT = 20.0


#: How often a restore line is said again until the restored agent's hello answers it (s).
RESTORE_RESEND = 3.0
#: How long fastStart's save waits for the guest to settle (an older agent never answers).
SETTLE_TIMEOUT = 10.0


class Supervisor:
    """Runs a launched VM (see :class:`Prelaunch`, handed over whole) to its end, then cleans
    up after it."""

    def __init__(self, launch: Prelaunch) -> None:
        self.launch = launch
        self.readiness = Readiness(launch.vm.name)
        self.failure: str | None = None
        #: a VMM exit that failed the start (its code is kept for ``status``, e.g. crosvm 33/34)
        self.start_exit: VmmExit | None = None
        self.stop_requested = asyncio.Event()
        #: ``vmsilo stop --kill``: kill the VMM now (no power button, or no more waiting)
        self.kill_now = asyncio.Event()
        self.sessions = Sessions(launch.vm, self.readiness, lambda: self.failure)
        self.servers: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.console = ConsoleRelay(ConsoleLog(launch.vm.paths.console_log))
        self.sidecars = Sidecars(on_failure=self._share_failed)
        self.sound: SoundDaemon | None = None
        #: fastStart with shares: the virtiofsd daemons starting while the guest restores
        self.sidecars_up: asyncio.Task[None] | None = None
        sidecar = backend_for(launch.vm).windows(launch.plan, launch.vm)
        #: the desktop user's side of the VM's windows (SPEC §9.1; None: no Wayland)
        self.bridge = Bridge(sidecar, self._log) if sidecar is not None else None

    def _log(self, message: str) -> None:
        print(f"vmsilo supervisor: VM {self.launch.vm.name}: {message}", file=sys.stderr)

    async def _open_guest_link(self) -> Link:
        """A new host-opened session to the guest agent (vsock connection or mux stream)."""
        hello = self.readiness.hello
        if hello is not None and hello.transport == "vsock":
            return await open_vsock_link(self.launch.vm.id)
        mux = self.readiness.mux
        if mux is None:
            raise ChannelError("the guest's channel port is not connected")
        return mux.open_session()

    async def _start_windows(self) -> None:
        """crosvm upstream: the filter before the guest needs it; QEMU: the control stream
        once the guest is ready (the bridge itself starts at the first window)."""
        bridge = self.bridge
        if bridge is None:
            return
        if bridge.sidecar.at_launch:
            self.spawn(self._bridge_at_launch(bridge))  # beside the boot, not in its way
            return
        self.spawn(self._window_streams(bridge))

    async def _bridge_at_launch(self, bridge: Bridge) -> None:
        try:
            await bridge.ensure()
        except DesktopUnavailable as e:
            self._log(f"windows are unavailable: {e}")

    async def _window_streams(self, bridge: Bridge) -> None:
        await self.readiness.ready.wait()
        await WindowStreams(bridge, self._open_guest_link, self._log).run()

    def _kill_requested(self) -> None:
        self.kill_now.set()
        self.stop_requested.set()

    @property
    def vmm(self) -> Vmm | None:
        return self.launch.vmm

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        launch = self.launch
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(KILL_SIGNAL, self._kill_requested)
        if launch.stop_requested:  # signalled before the loop ran
            self.stop_requested.set()
        if launch.kill_requested:
            self._kill_requested()
        exit_info: VmmExit | None = None
        try:
            if launch.failure is not None:
                self.failure = launch.failure
                self._refuse_queued_clients()
                launch.close_unserved()
            else:
                exit_info = await self._run_launched()
        except Exception as e:
            self.failure = failure_of(e)
        finally:
            await self._shutdown(exit_info)
            for sig in (*STOP_SIGNALS, KILL_SIGNAL):
                loop.remove_signal_handler(sig)
            launch.lock.release()
        return 0 if self.failure is None else 1

    async def _run_launched(self) -> VmmExit | None:
        launch = self.launch
        vm, plan = launch.vm, launch.plan
        # fastStart's first boot: no session before the state is saved (and the shares are in)
        self.readiness.hold_sessions = launch.saved is not None
        await self._take_over_sockets()
        if vm.netvm not in (None, "host"):
            netvm = plan.vms.get(str(vm.netvm))
            if netvm is not None:
                self.spawn(guest_tasks.hold_netvm(netvm))
        if launch.opts.console_on_tty:
            self.console.tty_out = sys.stdout.fileno()
            self.spawn(guest_tasks.pump_tty_input(self.console))
        if launch.vmm is None:  # stopped before the VMM started
            launch.close_unserved()
            return None
        # the VMM is already waiting on the shares' sockets (and the sound daemon's)
        sidecars = self.sidecars.start(plan, vm, launch.share_sockets)
        if launch.saved is not None and vm.shares:
            # hot-plugged once the guest is up (fastStart): the daemons start meanwhile
            self.sidecars_up = self.spawn(sidecars)
        else:
            await sidecars
        if launch.sound is not None and launch.sound_socket is not None:
            self.sound = SoundDaemon(vm.name, launch.sound, launch.sound_socket, self._sound_failed)
            launch.sound_socket = None
            await self.sound.start()
        await self._start_windows()
        if launch.restoring:
            await self._restore()
        while True:
            exit_info = await self._boot()
            if exit_info is None or not exit_info.restart or self.stop_requested.is_set():
                return exit_info
            # crosvm reset: a fresh ephemeral disk, then boot again
            self.readiness.reset()  # the new VMM connects anew (after start_vmm below)
            reset = replace(exit_info, cause="reset")
            launch.set_state("starting", last_exit=stopping.exit_dict(reset), ready_at=None)
            self.console.log.mark_boot()
            launch.start_vmm()

    async def _take_over_sockets(self) -> None:
        """Serve the sockets the prelaunch bound (connections queued on them meanwhile wait)."""
        launch, p = self.launch, self.launch.vm.paths
        handlers = {
            p.console_backend: self.console.on_backend,
            p.ready_socket: self.readiness.on_ready_port,
            p.channel_socket: self.readiness.on_channel_port,
            p.console: self.console.on_attach,
        }
        assert launch.command_sock is not None
        self.servers.append(
            await asyncio.start_unix_server(
                self.sessions.on_client, sock=launch.command_sock, limit=1 << 20
            )
        )
        for path, sock in launch.listeners.items():
            self.servers.append(
                await asyncio.start_unix_server(handlers[path], sock=sock, limit=1 << 20)
            )
        launch.listeners.clear()

    def _refuse_queued_clients(self) -> None:
        sock = self.launch.command_sock
        if sock is None:
            return
        refuse_queued(sock, self.failure)
        if self.launch.owns_command_socket:
            sock.close()

    async def _restore(self) -> None:
        """Load the saved state into the VMM that waits for it (SPEC §10) and have the
        restored agent say hello; if that fails or takes longer than :data:`RESTORE_TIMEOUT`
        (or the VMM exits), boot instead — logged, never a hang. A stop request leaves the
        rest to :meth:`_boot`."""
        launch, readiness = self.launch, self.readiness
        vm, vmm, state = launch.vm, launch.vmm, launch.saved
        assert vmm is not None and state is not None
        timeout = min(float(vm.start_timeout), RESTORE_TIMEOUT)
        started = now()

        async def restore() -> None:
            if not await readiness.wait_for(readiness.ready_port_up):
                raise VmsiloError("the VMM never connected to the ready port")
            # (QEMU creates its QMP socket before it connects to ours: it is there now)
            await asyncio.to_thread(vmm.restore_state, state.state, timeout)
            launch.state.extra["restore_s"] = round(now() - started, 3)
            readiness.on_stale_hello = readiness.send_restored
            said = asyncio.ensure_future(readiness.said_hello.wait())
            try:
                # said again until answered: a VMM may take in host bytes before the restored
                # guest reads its port (crosvm restores after it connected), and a line can
                # be lost then; the agent answers every one it reads (the first hello counts)
                while not said.done():
                    readiness.send_restored()
                    await asyncio.wait({said}, timeout=RESTORE_RESEND)
            finally:
                said.cancel()

        readiness.await_restored = True
        task = self.spawn(restore())
        vmm_exit = self.spawn(vmm.wait())
        stop = self.spawn(self.stop_requested.wait())
        await asyncio.wait(
            {task, vmm_exit, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        vmm_exit.cancel()
        stop.cancel()
        readiness.await_restored = False
        readiness.on_stale_hello = None
        if task.done() and task.exception() is None:
            launch.state.extra["start"] = "restored"
            return
        if stop.done() and not task.done():
            task.cancel()
            return
        if task.done():
            why = str(task.exception())
        elif vmm_exit.done():
            why = vmm_exit.result().reason
        else:
            why = f"not ready within {timeout:g} s"
        task.cancel()
        saved.log(vm, f"restoring the saved state failed ({why}); booting instead")
        vmm.kill()
        await stopping.reap(vmm)
        state.forget()
        launch.state.extra["restore_failed"] = why
        self.readiness.reset()
        self.console.log.mark_boot()
        launch.start_vmm(restore=False)

    async def _save(self) -> None:
        """fastStart's first boot: save the ready guest before any session is served."""
        launch, vm, vmm, state = self.launch, self.launch.vm, self.launch.vmm, self.launch.saved
        assert vmm is not None and state is not None
        launch.spawner.send("step saving the ready state (fastStart)")
        try:
            # a settled guest (its user's desktop up), so that no restore finishes its start
            await asyncio.wait_for(self.readiness.send_settle(), SETTLE_TIMEOUT)
        except TimeoutError:
            saved.log(vm, f"the guest did not settle within {SETTLE_TIMEOUT} s; saving anyway")
        try:
            meta = await saved.save(vm, vmm, state, float(vm.start_timeout))
        except ResumeFailed as e:  # paused for good: better a failed start than a hang
            raise VmsiloError(
                f"VM {vm.name}: saving its ready state left it paused: {e}",
                f"see the supervisor log {vm.paths.supervisor_log}; remove fastStart to boot it"
                " without saving",
            ) from e
        except Exception as e:  # the VM runs on; the next start boots again
            saved.log(vm, f"saving the ready state failed: {e}")
            launch.state.extra["save_failed"] = str(e)
            return
        saved.log(vm, f"ready state saved in {meta['save_s']} s ({state.directory})")
        launch.state.extra["saved"] = meta

    async def _plug_shares(self) -> None:
        """fastStart with shares (SPEC §10): the saved machine has no virtiofs devices (QEMU
        7.2 cannot migrate them), so after every start — boot (after the save) or restore —
        each share's device is hot-plugged on a connection to its virtiofsd, and the agent
        mounts them before the VM is ready. A share that does not mount fails the start."""
        launch, vm, vmm = self.launch, self.launch.vm, self.launch.vmm
        assert vmm is not None
        if self.sidecars_up is not None:
            await self.sidecars_up
        launch.spawner.send("step plugging in the shares")
        connections: list[tuple[str, int]] = []
        socks = []
        try:
            for share in vm.shares:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(sock)
                sock.connect(share.socket)
                connections.append((share.tag, sock.fileno()))
            await asyncio.to_thread(vmm.plug_shares, connections, float(vm.start_timeout))
        finally:
            for sock in socks:  # (QEMU holds its own copies now)
                sock.close()
        try:
            errors = await asyncio.wait_for(self.readiness.send_mount(), vm.start_timeout)
        except TimeoutError:
            errors = ["the guest did not answer the mount request"]
        if errors:
            raise VmsiloError(
                f"VM {vm.name}: shares not mounted: {'; '.join(errors)}",
                f"see the console log {vm.paths.console_log}",
            )

    async def _boot(self) -> VmmExit | None:
        """Wait for the launched VMM's guest to say hello, then until the VM ends."""
        launch, ready = self.launch, self.readiness.said_hello
        vm, vmm = launch.vm, launch.vmm
        assert vmm is not None
        save = launch.saved is not None and not launch.restoring
        vmm_exit = self.spawn(vmm.wait())
        hello = self.spawn(ready.wait())
        stop = self.spawn(self.stop_requested.wait())
        await asyncio.wait(
            {vmm_exit, hello, stop}, timeout=vm.start_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        hello.cancel()
        if vmm_exit.done():
            result: VmmExit = vmm_exit.result()
            if not ready.is_set():
                self.start_exit = result
                raise VmsiloError(
                    f"VM {vm.name}: {result.reason} before the guest was ready",
                    f"see the console log {vm.paths.console_log}",
                )
            return result
        if stop.done():
            return await stopping.stop_vmm(
                launch, vmm, vmm_exit, graceful=ready.is_set(), kill_now=self.kill_now
            )
        if not ready.is_set():
            await stopping.stop_vmm(launch, vmm, vmm_exit, graceful=False)
            raise VmsiloError(
                f"VM {vm.name} was not ready within startTimeout ({vm.start_timeout} s)",
                f"see the console log {vm.paths.console_log}; raise startTimeout if it is slow",
            )
        if save:
            await self._save()
        if launch.saved is not None and vm.shares:
            await self._plug_shares()
        self.readiness.hold_sessions = False
        self.readiness.ready.set()
        if vm.is_netvm:
            # after every start, a restore included: it is a session, so fastStart's state is
            # saved before it and never holds the routing (tests/test_fast_start_netvm.py)
            launch.spawner.send("step configuring the netvm")
            began = now()
            detail = await guest_tasks.configure_netvm(vm)
            launch.state.extra["netvm_setup_s"] = round(now() - began, 3)
            if detail is not None:
                launch.state.detail = detail
        # the end of the previous run stays in `status`; a failed start does not stick
        last = launch.state.last_exit
        if last is not None and last.get("cause") == "start-failure":
            launch.state.last_exit = None
        launch.set_state("running", ready_at=now())
        self.readiness.operational.set()
        sd_notify("READY=1")
        launch.spawner.send("ready")
        launch.spawner.close()
        await asyncio.wait({vmm_exit, stop}, return_when=asyncio.FIRST_COMPLETED)
        if vmm_exit.done():  # the guest (or the VMM) ended by itself
            return stopping.with_cause(vmm_exit.result(), self.readiness.farewell)
        return await stopping.stop_vmm(launch, vmm, vmm_exit, graceful=True, kill_now=self.kill_now)

    async def _shutdown(self, exit_info: VmmExit | None) -> None:
        await stopping.reap(self.vmm)
        if self.failure is None and exit_info is not None and not exit_info.clean:
            self.failure = exit_info.reason
        await self.sessions.fail_waiting()
        for server in self.servers:
            server.close()
        mux = self.readiness.mux
        if mux is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(mux.aclose(), timeout=2)
        tasks = list(self.tasks) + list(self.sessions.clients)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await stopping.clean_up(self.launch)
        await self.sidecars.stop()
        if self.sound is not None:
            await self.sound.stop()
        if self.bridge is not None:
            await self.bridge.stop()
        self.launch.close_unserved()  # e.g. the sound socket of a start that failed first
        self.console.log.close()
        stopping.record_end(self.launch, self.failure, exit_info, self.start_exit)
        self.readiness.finished.set()

    def _sound_failed(self, reason: str) -> None:
        """The sound daemon died: the VM runs on without sound; `vmsilo status` says why."""
        self.launch.state.extra["sound"] = {"available": False, "why": reason}
        self.launch.set_state(self.launch.state.state)

    def _share_failed(self, reason: str) -> None:
        """A share's daemon died while the VM runs: its mount in the guest is broken now.

        The VM keeps running (the user's programs and other shares are fine); `vmsilo status`
        shows why in ``detail`` until the VM is restarted."""
        state = self.launch.state
        state.detail = reason
        self.launch.set_state(state.state)
