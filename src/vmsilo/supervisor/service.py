"""The per-VM supervisor (``vmsilo service vm VM``): one process owns one running VM.

Under the VM's lock, :mod:`vmsilo.supervisor.prelaunch` first does everything up to a running
VMM without an event loop (command socket, preflight, netvm, the VMM's sockets, taps, shared
home, ephemeral disk, the VMM). :class:`Supervisor` then takes the bound sockets over, starts
the shares' virtiofsd daemons (the VMM is already waiting on their sockets), waits for the
guest's ``hello`` on ``org.vmsilo.ready`` (READY=1 for systemd), relays every ``vm-run``
connection to the guest agent, and on SIGTERM stops the guest with the power button, then the
VMM after ``stopTimeout``. Whatever way it ends — guest poweroff, stop, VMM crash, start
failure — the same cleanup runs and the exit reason is kept in the state file for
``vmsilo status``.

Everything is event-driven: sockets, child exit and signals wake the loop; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable
from typing import Any

from vmsilo.channel.mux import ChannelMux, StreamLink
from vmsilo.channel.protocol import (
    PROTOCOL_VERSION,
    VERSION_HINT,
    FrameType,
    ProtocolError,
    ReadyHello,
    encode_error,
    encode_frame,
    encode_json,
    parse_ready,
)
from vmsilo.channel.relay import relay_opened, relay_vsock_opened
from vmsilo.errors import VmsiloError
from vmsilo.plan.model import VmPlan
from vmsilo.supervisor.cleanup import cleanup_vm
from vmsilo.supervisor.console import ConsoleLog, ConsoleRelay
from vmsilo.supervisor.notify import sd_notify
from vmsilo.supervisor.prelaunch import STOP_SIGNALS, Prelaunch, failure_of
from vmsilo.supervisor.sidecars import Sidecars
from vmsilo.supervisor.state import now
from vmsilo.supervisor.vmm import Vmm, VmmExit, wait_process

CONTROL_WAIT_READY = "wait-ready"


class Supervisor:
    """Runs a launched VM (see :class:`Prelaunch`) to its end, then cleans up after it."""

    def __init__(self, launch: Prelaunch) -> None:
        self.launch = launch
        self.plan = launch.plan
        self.vm = launch.vm
        self.opts = launch.opts
        self.lock = launch.lock
        self.spawner = launch.spawner
        self.state = launch.state
        self.set_state = launch.set_state
        self.owns_command_socket = launch.owns_command_socket
        self.ready = asyncio.Event()  # the guest agent said hello: sessions may flow
        #: the VMM's end of the channel port is accepted (the VMM connects to both the ready
        #: and the channel socket; their accepts may run in either order, and a hello on a
        #: channel transport means "ready" only once the channel is there to carry sessions)
        self.channel_up = asyncio.Event()
        self.operational = asyncio.Event()  # and the start is complete (netvm routing too)
        self.finished = asyncio.Event()
        self.failure: str | None = None
        #: a VMM exit that failed the start (its code is kept for ``status``, e.g. crosvm 33/34)
        self.start_exit: VmmExit | None = None
        self.stop_requested = asyncio.Event()
        self.hello: ReadyHello | None = None
        self.mux: ChannelMux | None = None
        self.servers: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.clients: set[asyncio.Task[Any]] = set()
        #: clients still waiting for readiness: on a failed start each gets the reason first
        self.waiting_clients: set[asyncio.Task[Any]] = set()
        self.console = ConsoleRelay(ConsoleLog(self.vm.paths.console_log))
        self.sidecars = Sidecars(on_failure=self._share_failed)

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
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop_requested.set)
        if self.launch.stop_requested:  # signalled before the loop ran
            self.stop_requested.set()
        exit_info: VmmExit | None = None
        try:
            if self.launch.failure is not None:
                self.failure = self.launch.failure
                self._refuse_queued_clients()
                self.launch.close_unserved()
            else:
                exit_info = await self._run_launched()
        except Exception as e:
            self.failure = failure_of(e)
        finally:
            await self._shutdown(exit_info)
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            self.lock.release()
        return 0 if self.failure is None else 1

    async def _run_launched(self) -> VmmExit | None:
        vm, launch = self.vm, self.launch
        await self._take_over_sockets()
        if vm.netvm not in (None, "host"):
            netvm = self.plan.vms.get(str(vm.netvm))
            if netvm is not None:
                self.spawn(self._hold_netvm(netvm))
        if self.opts.console_on_tty:
            self.console.tty_out = sys.stdout.fileno()
            self.spawn(self._pump_tty_input())
        if launch.vmm is None:  # stopped before the VMM started
            launch.close_unserved()
            return None
        # the VMM is already waiting on the shares' sockets
        await self.sidecars.start(self.plan, vm, launch.share_sockets)
        while True:
            exit_info = await self._boot()
            if exit_info is None or not exit_info.restart or self.stop_requested.is_set():
                return exit_info
            # crosvm reset: a fresh ephemeral disk, then boot again
            self.ready.clear()
            self.channel_up.clear()  # the new VMM connects anew (after start_vmm below)
            self.hello = None
            self.set_state("starting", last_exit=_exit_dict(exit_info), ready_at=None)
            launch.start_vmm()

    async def _take_over_sockets(self) -> None:
        """Serve the sockets the prelaunch bound (connections queued on them meanwhile wait)."""
        launch, p = self.launch, self.vm.paths
        handlers = {
            p.console_backend: self.console.on_backend,
            p.ready_socket: self._on_ready_port,
            p.channel_socket: self._on_channel_port,
            p.console: self.console.on_attach,
        }
        assert launch.command_sock is not None
        self.servers.append(
            await asyncio.start_unix_server(
                self._on_client, sock=launch.command_sock, limit=1 << 20
            )
        )
        for path, sock in launch.listeners.items():
            self.servers.append(
                await asyncio.start_unix_server(handlers[path], sock=sock, limit=1 << 20)
            )
        launch.listeners.clear()

    def _refuse_queued_clients(self) -> None:
        """Answer the connections queued on a command socket whose launch failed before the
        loop ran: each gets the reason (as the clients served later do)."""
        sock = self.launch.command_sock
        if sock is None:
            return
        error = encode_frame(
            FrameType.ERROR,
            0,  # a command-socket connection is one session
            encode_error("start", self.failure or ""),
        )
        sock.setblocking(False)
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # none queued any more
                break
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.sendall(error)
        if self.owns_command_socket:
            sock.close()

    async def _boot(self) -> VmmExit | None:
        """Wait for the launched VMM's guest to say hello, then until the VM ends."""
        vm, vmm = self.vm, self.launch.vmm
        assert vmm is not None
        vmm_exit = self.spawn(vmm.wait())
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
                    await wait_process(self.vmm.proc)
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

    async def _on_ready_port(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                try:
                    hello = parse_ready(line)
                except ValueError:
                    continue
                # (an agent of another protocol version is "ready" at once: clients are told)
                channel = hello.compatible() and hello.transport == "channel"
                if channel and not await self._wait_for(self.channel_up):
                    return
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
        self.channel_up.set()
        await self.mux.run()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
        client = StreamLink(reader, writer)
        try:
            await self._serve_client(client)
        except asyncio.CancelledError:
            pass  # a cancelled client task must end normally: asyncio logs cancelled callbacks
        except (ConnectionError, OSError) as e:
            # usually the client went away; logged, since the client sees only a closed socket
            print(f"vmsilo supervisor: a command-socket session ended: {e!r}", file=sys.stderr)
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
                encode_error(
                    "version",
                    f"guest agent speaks protocol {hello.version}, host"
                    f" {PROTOCOL_VERSION} ({VERSION_HINT})",
                    hello.version,
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

    def _share_failed(self, reason: str) -> None:
        """A share's daemon died while the VM runs: its mount in the guest is broken now.

        The VM keeps running (the user's programs and other shares are fine); `vmsilo status`
        shows why in ``detail`` until the VM is restarted."""
        self.state.detail = reason
        self.set_state(self.state.state)

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
            encode_error(code, message),
        )
