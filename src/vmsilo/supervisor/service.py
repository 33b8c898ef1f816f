"""The per-VM supervisor (``vmsilo service vm VM``): one process owns one running VM.

It does, in order and under the VM's lock: bind the command socket (or take it from systemd),
run the preflight checks, start the netvm, create taps, a fresh ephemeral disk and the shared
home, bind every socket the VMM connects to, start the VMM as its child, wait for the guest's
``hello`` on ``org.vmsilo.ready`` (READY=1 for systemd), relay every ``vm-run`` connection to
the guest agent, and on SIGTERM stop the guest with the power button, then the VMM after
``stopTimeout``. Whatever way it ends — guest poweroff, stop, VMM crash, start failure — the
same cleanup runs and the exit reason is kept in the state file for ``vmsilo status``.

Everything is event-driven: sockets, child exit and signals wake the loop; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmsilo.channel.mux import ChannelMux, StreamLink
from vmsilo.channel.protocol import (
    PROTOCOL_VERSION,
    VERSION_HINT,
    FrameType,
    ProtocolError,
    ReadyHello,
    encode_json,
    parse_ready,
)
from vmsilo.channel.relay import relay_opened, relay_vsock_opened
from vmsilo.errors import VmsiloError
from vmsilo.host.disks import create_ephemeral_disk, remove_file
from vmsilo.host.nat import setup_host_nat, teardown_host_nat
from vmsilo.host.network import setup_interfaces, teardown_interfaces
from vmsilo.host.preflight import preflight
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.supervisor.console import ConsoleLog, ConsoleRelay
from vmsilo.supervisor.notify import SpawnerPipe, sd_notify
from vmsilo.supervisor.sidecars import Sidecars
from vmsilo.supervisor.snapshot import write_snapshot
from vmsilo.supervisor.state import VmLock, VmState, is_locked, now, read_state, write_state
from vmsilo.supervisor.vmm import CrosvmVmm, QemuVmm, Vmm, VmmExit

CONTROL_WAIT_READY = "wait-ready"


@dataclass
class ServiceOptions:
    config_path: str
    config_text: str
    listen_fd: int | None = None  # the command socket, from systemd (LISTEN_FDS)
    spawner_fd: int | None = None  # milestone pipe of an embedded spawner
    console_on_tty: bool = False  # vm-start-debug: console on our terminal
    start_netvm: Callable[[str], Awaitable[None]] | None = None


def runtime_sockets(vm: VmPlan) -> list[str]:
    p = vm.paths
    return [
        p.console,
        p.console_backend,
        p.ready_socket,
        p.channel_socket,
        p.crosvm_control,
        p.qmp,
        p.sound_socket,
        *(s.socket for s in vm.shares),
    ]


def peer_bridges_in_use(plan: Plan, vm: VmPlan) -> list[str]:
    """Link bridges this VM shares with a peer that is still running (keep those)."""
    keep = []
    for i in vm.interfaces:
        if i.bridge is None or i.injected_for is None or i.injected_for == "host":
            continue
        peer = plan.vms.get(i.injected_for)
        if peer is not None and is_locked(peer.paths.lock):
            keep.append(i.bridge)
    return keep


def cleanup_vm(plan: Plan, vm: VmPlan, *, remove_command_socket: bool) -> list[str]:
    """Undo everything a launch created; safe to run twice and after any kind of exit.

    Returns the problems met (cleanup carries on past each one)."""
    problems: list[str] = []
    remove_file(vm.paths.ephemeral_disk)
    for path in runtime_sockets(vm) + ([vm.paths.command_socket] if remove_command_socket else []):
        remove_file(path)
    remove_file(vm.paths.plan_snapshot)
    try:
        teardown_interfaces(vm, keep_bridges=peer_bridges_in_use(plan, vm))
        teardown_host_nat(vm)
    except Exception as e:  # cleanup must go on; report what failed
        problems.append(f"network teardown: {e}")
    return problems


class Supervisor:
    def __init__(self, plan: Plan, vm: VmPlan, options: ServiceOptions) -> None:
        self.plan = plan
        self.vm = vm
        self.opts = options
        self.lock = VmLock(vm.paths.lock)
        self.spawner = SpawnerPipe(options.spawner_fd)
        self.state = VmState(state="starting", supervisor_pid=os.getpid(), hypervisor=vm.hypervisor)
        self.ready = asyncio.Event()  # the guest agent said hello: sessions may flow
        self.operational = asyncio.Event()  # and the start is complete (netvm routing too)
        self.finished = asyncio.Event()
        self.failure: str | None = None
        #: a VMM exit that failed the start (its code is kept for ``status``, e.g. crosvm 33/34)
        self.start_exit: VmmExit | None = None
        self.stop_requested = asyncio.Event()
        self.hello: ReadyHello | None = None
        self.mux: ChannelMux | None = None
        self.vmm: Vmm | None = None
        self.servers: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.clients: set[asyncio.Task[Any]] = set()
        #: clients still waiting for readiness: on a failed start each gets the reason first
        self.waiting_clients: set[asyncio.Task[Any]] = set()
        self.console = ConsoleRelay(ConsoleLog(vm.paths.console_log))
        self.owns_command_socket = options.listen_fd is None
        self.binary = ""
        self.sidecars = Sidecars()

    # ------------------------------------------------------------------ state

    def set_state(self, state: str, **changes: Any) -> None:
        self.state.state = state  # type: ignore[assignment]
        for key, value in changes.items():
            setattr(self.state, key, value)
        write_state(self.vm.paths.state_file, self.state)
        sd_notify(f"STATUS={state}")

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        self.lock.acquire(self.vm.name)
        previous = read_state(self.vm.paths.state_file)
        if previous is not None:
            self.state.last_exit = previous.last_exit
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stop_requested.set)
        exit_info: VmmExit | None = None
        try:
            self.set_state("starting", started_at=now(), ready_at=None, vmm_pid=None, detail=None)
            snap = write_snapshot(
                self.vm.paths.plan_snapshot, self.opts.config_path, self.opts.config_text, self.vm
            )
            self.state.config_hash = snap.config_hash
            self.binary = preflight(self.plan, self.vm)
            await self._serve_command_socket()
            self.spawner.send("bound")
            exit_info = await self._launch_and_wait()
        except VmsiloError as e:
            self.failure = str(e)
        except Exception as e:  # an unexpected bug: still clean up and report it
            self.failure = f"internal error: {type(e).__name__}: {e}"
            print(f"vmsilo supervisor: {self.failure}", file=sys.stderr)
        finally:
            await self._shutdown(exit_info)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.lock.release()
        return 0 if self.failure is None else 1

    async def _launch_and_wait(self) -> VmmExit | None:
        vm = self.vm
        if vm.netvm not in (None, "host"):
            if self.opts.start_netvm is not None:
                await self.opts.start_netvm(str(vm.netvm))
            netvm = self.plan.vms.get(str(vm.netvm))
            if netvm is not None:
                self.spawn(self._hold_netvm(netvm))
        await self._listen(vm.paths.console_backend, self.console.on_backend)
        await self._listen(vm.paths.ready_socket, self._on_ready_port)
        await self._listen(vm.paths.channel_socket, self._on_channel_port)
        await self._listen(vm.paths.console, self.console.on_attach, mode=0o600, owner=True)
        if self.opts.console_on_tty:
            self.console.tty_out = sys.stdout.fileno()
            self.spawn(self._pump_tty_input())
        # pyroute2's synchronous API runs its own event loop: keep it off ours
        await asyncio.to_thread(setup_interfaces, vm)
        await asyncio.to_thread(setup_host_nat, self.plan, vm)
        await asyncio.to_thread(self._attach_peer_taps)
        self._prepare_home()
        await self.sidecars.start(self.plan, vm)
        while True:
            exit_info = await self._boot_once(self.binary)
            if exit_info is None or not exit_info.restart or self.stop_requested.is_set():
                return exit_info
            # crosvm reset: a fresh ephemeral disk, then boot again
            self.ready.clear()
            self.hello = None
            self.set_state("starting", last_exit=_exit_dict(exit_info), ready_at=None)

    async def _boot_once(self, binary: str) -> VmmExit | None:
        vm = self.vm
        if vm.root_overlay == "raw":
            create_ephemeral_disk(vm.paths.ephemeral_disk, vm.root_overlay_size)
        for path in (vm.paths.qmp, vm.paths.crosvm_control):
            remove_file(path)
        argv = self._argv(binary)
        self.vmm = (QemuVmm if vm.hypervisor == "qemu" else CrosvmVmm)(self.plan, vm, argv)
        pid = await self.vmm.start()
        self.state.extra["vmm_started_at"] = now()
        self.set_state("starting", vmm_pid=pid)
        vmm_exit = self.spawn(self.vmm.wait())
        ready = self.spawn(self.ready.wait())
        stop = self.spawn(self.stop_requested.wait())
        await asyncio.wait(
            {vmm_exit, ready, stop}, timeout=vm.start_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        ready.cancel()
        if vmm_exit.done():
            result: VmmExit = vmm_exit.result()
            if not self.ready.is_set():
                self.start_exit = result
                raise VmsiloError(
                    f"VM {vm.name}: {result.reason} before the guest was ready",
                    f"see the console log {vm.paths.console_log}",
                )
            return result
        if stop.done():
            return await self._stop_vmm(vmm_exit, graceful=self.ready.is_set())
        if not self.ready.is_set():
            await self._stop_vmm(vmm_exit, graceful=False)
            raise VmsiloError(
                f"VM {vm.name} was not ready within startTimeout ({vm.start_timeout} s)",
                f"see the console log {vm.paths.console_log}; raise startTimeout if it is slow",
            )
        if self.vm.is_netvm:
            await self._configure_netvm()
        self.set_state("running", ready_at=now())
        self.operational.set()
        sd_notify("READY=1")
        self.spawner.send("ready")
        self.spawner.close()
        await asyncio.wait({vmm_exit, stop}, return_when=asyncio.FIRST_COMPLETED)
        if vmm_exit.done():
            return vmm_exit.result()  # type: ignore[no-any-return]
        return await self._stop_vmm(vmm_exit, graceful=True)

    def _argv(self, binary: str) -> list[str]:
        vm, plan = self.vm, self.plan
        if vm.hypervisor == "qemu":
            from vmsilo.backends.accel import resolve_accel
            from vmsilo.backends.qemu import qemu_argv, vsock_available

            argv = qemu_argv(plan, vm, resolve_accel(plan, vm), vsock=vsock_available())
        else:
            from vmsilo.backends.crosvm import crosvm_argv

            argv = crosvm_argv(plan, vm)
        argv[0] = binary
        return argv

    async def _stop_vmm(self, vmm_exit: asyncio.Task[Any], graceful: bool) -> VmmExit:
        """Power button, then wait ``stopTimeout``, then kill (SPEC §4 "Stop")."""
        assert self.vmm is not None
        self.set_state("stopping")
        if graceful:
            try:
                await asyncio.wait_for(self.vmm.request_poweroff(), timeout=5)
            except (OSError, TimeoutError, ValueError) as e:
                print(f"vmsilo supervisor: power button failed: {e}", file=sys.stderr)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(vmm_exit), timeout=self.vm.stop_timeout)
        if not vmm_exit.done():
            self.vmm.kill()
            result: VmmExit = await vmm_exit
            return VmmExit(
                result.code,
                "killed after stopTimeout" if graceful else "killed (stopped while starting)",
                clean=not graceful,
            )
        result = vmm_exit.result()
        if result.clean:
            return VmmExit(result.code, "stopped", clean=True)
        return result

    async def _shutdown(self, exit_info: VmmExit | None) -> None:
        if self.vmm is not None:
            self.vmm.kill()
            if self.vmm.proc is not None:
                with contextlib.suppress(Exception):
                    await self.vmm.proc.wait()
        if self.failure is None and exit_info is not None and not exit_info.clean:
            self.failure = exit_info.reason
        await self._fail_waiting_clients()
        for server in self.servers:
            server.close()
        if self.mux is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.mux.aclose(), timeout=2)
        for task in list(self.tasks) + list(self.clients):
            task.cancel()
        for task in list(self.tasks) + list(self.clients):
            with contextlib.suppress(BaseException):
                await task
        # in a worker thread: pyroute2's synchronous API runs an event loop of its own
        problems = await asyncio.to_thread(
            cleanup_vm, self.plan, self.vm, remove_command_socket=self.owns_command_socket
        )
        for problem in problems:
            print(f"vmsilo supervisor: cleanup: {problem}", file=sys.stderr)
        await self.sidecars.stop()
        self.console.log.close()
        if self.failure is not None:
            last = {"reason": self.failure, "at": now()}
            code_from = exit_info or self.start_exit
            if code_from is not None:
                last["code"] = code_from.code
            self.set_state("failed", vmm_pid=None, last_exit=last, supervisor_pid=None)
            self.spawner.send(f"failed {self.failure}")
            sd_notify(f"STATUS=failed: {self.failure}")
        else:
            last_exit = _exit_dict(exit_info) if exit_info else None
            self.set_state("stopped", vmm_pid=None, last_exit=last_exit, supervisor_pid=None)
        self.spawner.close()
        self.finished.set()

    # ------------------------------------------------------------------ sockets

    async def _listen(
        self,
        path: str,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        mode: int = 0o600,
        owner: bool = False,
    ) -> None:
        remove_file(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        server = await asyncio.start_unix_server(handler, path=path, limit=1 << 20)
        os.chmod(path, mode)
        if owner:
            os.chown(path, self.plan.user.uid, self.plan.user.gid)
        self.servers.append(server)

    async def _serve_command_socket(self) -> None:
        if self.opts.listen_fd is not None:
            sock = socket.socket(fileno=self.opts.listen_fd)
            server = await asyncio.start_unix_server(self._on_client, sock=sock)
            self.servers.append(server)
            return
        await self._listen(self.vm.paths.command_socket, self._on_client, owner=True)

    async def _on_ready_port(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                try:
                    hello = parse_ready(line)
                except ValueError:
                    continue
                self.hello = hello
                self.ready.set()
        finally:
            writer.close()

    async def _on_channel_port(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.mux is not None:
            await self.mux.aclose()
        self.mux = ChannelMux(reader, writer, name=f"{self.vm.name}-channel")
        await self.mux.run()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
        client = StreamLink(reader, writer)
        try:
            await self._serve_client(client)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # a cancelled client task must end normally: asyncio logs cancelled callbacks
        finally:
            if task is not None:
                self.clients.discard(task)
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _serve_client(self, client: StreamLink) -> None:
        try:
            first = await client.recv()
        except ProtocolError as e:
            await _send_error(client, "protocol", str(e))
            return
        if first is None:
            return
        if first.type != FrameType.OPEN:
            await _send_error(client, "protocol", "a session must start with an OPEN frame")
            return
        control = _control_request(first.payload)
        task = asyncio.current_task()
        if task is not None:
            self.waiting_clients.add(task)
        try:
            if not await self._wait_until_ready():
                await _send_error(client, "start", self.failure or f"VM {self.vm.name} stopped")
                return
        finally:
            self.waiting_clients.discard(task)
        hello = self.hello
        assert hello is not None
        if not hello.compatible():
            await client.send(
                FrameType.ERROR,
                encode_json(
                    {
                        "code": "version",
                        "message": f"guest agent speaks protocol {hello.version}, host"
                        f" {PROTOCOL_VERSION} ({VERSION_HINT})",
                        "version": hello.version,
                    }
                ),
            )
            return
        if control == CONTROL_WAIT_READY:
            if not await self._wait_for(self.operational):
                await _send_error(client, "start", self.failure or f"VM {self.vm.name} stopped")
                return
            await client.send(FrameType.EXIT, encode_json({"status": 0}))
            return
        if hello.transport == "vsock":
            await relay_vsock_opened(client, first, self.vm.id)
            return
        if self.mux is None:
            await _send_error(client, "channel", "the guest's channel port is not connected")
            return
        await relay_opened(client, first, self.mux)

    async def _wait_until_ready(self) -> bool:
        return await self._wait_for(self.ready)

    async def _wait_for(self, event: asyncio.Event) -> bool:
        """Wait for ``event`` unless the supervisor finishes first."""
        if event.is_set():
            return True
        ready = asyncio.ensure_future(event.wait())
        done = asyncio.ensure_future(self.finished.wait())
        try:
            await asyncio.wait({ready, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            done.cancel()
        return event.is_set() and not self.finished.is_set()

    async def _fail_waiting_clients(self) -> None:
        """Wake clients waiting for readiness and let them send the failure (bounded).

        Without this they would be cancelled with the rest, and ``vm-start`` would see a bare
        "stopped while starting" instead of, say, "crosvm: invalid arguments"."""
        self.finished.set()
        waiting = set(self.waiting_clients)
        if waiting:
            await asyncio.wait(waiting, timeout=2)

    # ------------------------------------------------------------------ host bits

    def _attach_peer_taps(self) -> None:
        """Re-join a running peer's tap to a link bridge we just (re)created."""
        from vmsilo.host.network import attach_to_bridge

        for i in self.vm.interfaces:
            if i.bridge is None or i.injected_for in (None, "host"):
                continue
            peer = self.plan.vms.get(str(i.injected_for))
            if peer is None:
                continue
            for pi in peer.interfaces:
                if pi.bridge == i.bridge and pi.injected_for == self.vm.name:
                    attach_to_bridge(pi.tap, i.bridge)

    async def _configure_netvm(self) -> None:
        """Turn on routing in a netvm guest (vmsilo.guest.netvm) before we call it ready.

        A failure is kept in the state file's ``detail`` and logged; the VM keeps running so
        the user can get in and look (`vm-shell`), and `vmsilo status` shows why."""
        from vmsilo.channel.client import run_session
        from vmsilo.channel.protocol import ChannelError, ExecRequest

        vm = self.vm
        argv = ["python3", "-m", "vmsilo.guest.netvm"]
        if any(i.name == "upstream" for i in vm.interfaces):
            argv += ["--upstream", "upstream"]
        for i in vm.interfaces:
            if i.injected_for not in (None, "host"):
                argv += ["--client", i.name]
        try:
            status = await run_session(
                vm.paths.command_socket,
                ExecRequest(argv=argv, user="root"),
                stdin=None,
                stdout=sys.stderr.fileno(),
                stderr=sys.stderr.fileno(),
                forward_signals=False,
            )
            detail = f"exit status {status}"
        except ChannelError as e:
            status, detail = 255, str(e)
        if status != 0:
            message = f"netvm routing setup failed in the guest ({detail})"
            print(f"vmsilo supervisor: {message}", file=sys.stderr)
            self.state.detail = message

    async def _hold_netvm(self, netvm: VmPlan) -> None:
        """Keep one session open in our netvm while we run, so its auto-shutdown waits for us.

        The netvm's agent counts sessions; a client VM's supervisor holding ``sleep infinity``
        there is exactly "a session runs". Closing it (our shutdown cancels this task) hangs
        the program up, and the netvm's idle timer starts once its last client is gone.
        """
        from vmsilo.channel.client import run_session
        from vmsilo.channel.protocol import ChannelError, ExecRequest

        with contextlib.suppress(ChannelError, OSError):
            await run_session(
                netvm.paths.command_socket,
                ExecRequest(argv=["sleep", "infinity"]),
                stdin=None,
                stdout=None,
                stderr=None,
                forward_signals=False,
            )

    def _prepare_home(self) -> None:
        for share in self.vm.shares:
            if share.tag != "home":
                continue
            home = Path(share.host_path)
            if not home.exists():
                home.mkdir(parents=True, mode=0o700)
                os.chown(home, self.plan.user.uid, self.plan.user.gid)

    async def _pump_tty_input(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(sys.stdin.fileno(), "rb", 0)
        )
        while data := await reader.read(4096):
            await self.console.send_input(data)


def _exit_dict(info: VmmExit | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {"reason": info.reason, "code": info.code, "clean": info.clean, "at": now()}


def _control_request(payload: bytes) -> str | None:
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    value = obj.get("control") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


async def _send_error(client: StreamLink, code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await client.send(
            FrameType.ERROR,
            encode_json({"code": code, "message": message, "version": PROTOCOL_VERSION}),
        )
