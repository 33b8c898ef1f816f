"""Starting, waiting for and stopping VMs from the outside (embedded mode).

Used by ``vmsilo start/stop``, ``vm-start``/``vm-stop`` and ``vm-run``'s autostart when systemd
does not manage the VMs. Concurrency is settled by locks, never by sleeping and retrying:

* ``R/<vm>.spawn.lock`` serialises spawners: the first takes it, spawns the supervisor and
  holds it until the supervisor reports its command socket is bound; the others wake up when
  it is released, find the socket live and just connect. Ten concurrent ``vm-run``s on a
  stopped VM therefore start exactly one VM.
* ``R/<vm>.lock`` is held by the supervisor for its whole life; ``stop`` sends SIGTERM and then
  blocks on that lock until the kernel hands it over, i.e. until the supervisor has exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from vmsilo.errors import VMInUseError, VMNotRunningError, VmsiloError, VMStartError
from vmsilo.host.sockets import socket_live
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.supervisor.state import is_locked, read_state, wait_unlocked


def is_running(vm: VmPlan) -> bool:
    return is_locked(vm.paths.lock)


def command_socket_live(vm: VmPlan) -> bool:
    """True if something accepts connections on the VM's command socket."""
    return socket_live(vm.paths.command_socket)


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class StartWatch:
    """The read end of a freshly spawned supervisor's milestone pipe.

    After ``bound`` the spawner connects like any client; if that connection is refused or
    dropped because the start failed, :meth:`failure` reads the supervisor's last words
    (``failed <message>``) — it blocks only until the supervisor reports or exits.
    """

    def __init__(self, pipe: IO[bytes], vm: VmPlan) -> None:
        self.pipe = pipe
        self.vm = vm

    def failure(self) -> str | None:
        with self.pipe:
            for raw in self.pipe:
                line = raw.decode(errors="replace").strip()
                if line == "ready":
                    return None
                if line.startswith("failed "):
                    return line[7:]
        return None

    def close(self) -> None:
        self.pipe.close()


def spawn_supervisor(config_path: str, vm: VmPlan, plan: Plan) -> StartWatch:
    """Fork the supervisor from this process (which already planned the config); return
    once its command socket is bound."""
    from vmsilo.supervisor.launch import fork_supervisor

    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    path = os.path.abspath(config_path)
    with open(path) as f:
        text = f.read()
    try:
        os.set_inheritable(write_fd, True)
        fork_supervisor(path, text, plan, vm, write_fd, vm.paths.supervisor_log)
    finally:
        os.close(write_fd)
    pipe = os.fdopen(read_fd, "rb")
    for raw in pipe:
        line = raw.decode(errors="replace").strip()
        if line == "bound":
            return StartWatch(pipe, vm)
        if line.startswith("failed "):
            pipe.close()
            raise VMStartError(f"VM {vm.name} failed to start: {line[7:]}")
    pipe.close()
    raise VMStartError(
        f"VM {vm.name}: the supervisor exited before it was ready",
        f"see {vm.paths.supervisor_log}",
    )


def ensure_supervisor(config_path: str, vm: VmPlan, plan: Plan) -> StartWatch | None:
    """Make sure a supervisor serves ``vm``'s command socket (spawning one if needed).

    Returns the :class:`StartWatch` when this call spawned it."""
    if command_socket_live(vm):
        return None
    if os.geteuid() != 0:
        raise VmsiloError(
            f"VM {vm.name} is not running and only root can start it here",
            f"run `sudo vm-start {vm.name}`, or install the systemd units with `vmsilo install`",
        )
    with _flock(vm.paths.spawn_lock):
        if command_socket_live(vm):
            return None
        if is_running(vm):
            # a supervisor is shutting down (socket closed, lock still held): let it finish
            _wait_unlocked_for(vm.paths.lock, vm.stop_timeout + 15)
        return spawn_supervisor(config_path, vm, plan)


async def wait_ready_async(vm: VmPlan) -> None:
    """Ask the supervisor to answer once the guest is ready (or tell us why it failed)."""
    # imported here: vm-run's autostart path through this module must stay light
    import asyncio

    from vmsilo.channel.mux import StreamLink
    from vmsilo.channel.protocol import (
        FrameType,
        ProtocolError,
        decode_error,
        decode_json,
        encode_json,
    )

    try:
        reader, writer = await asyncio.open_unix_connection(vm.paths.command_socket)
    except OSError as e:
        raise VMNotRunningError(f"VM {vm.name} is not running ({e.strerror})") from None
    link = StreamLink(reader, writer)
    try:
        await link.send(FrameType.OPEN, encode_json({"control": "wait-ready"}))
        frame = await link.recv()
    finally:
        await link.aclose()
    if frame is None:
        raise VMStartError(f"VM {vm.name} stopped while starting", f"see {vm.paths.console_log}")
    if frame.type == FrameType.ERROR:
        err = decode_error(frame.payload)
        try:
            message = str(decode_json(frame.payload).get("message", err))
        except ProtocolError:
            message = str(err)
        raise VMStartError(f"VM {vm.name}: {message}", getattr(err, "hint", None))
    if frame.type != FrameType.EXIT:
        raise VMStartError(f"VM {vm.name}: unexpected answer from the supervisor")


def start_vm(config_path: str, plan: Plan, vm: VmPlan, wait: bool = True) -> None:
    watch = ensure_supervisor(config_path, vm, plan)
    try:
        if wait:
            import asyncio

            try:
                asyncio.run(wait_ready_async(vm))
            except (VMNotRunningError, VMStartError):
                # the supervisor's own last words say best why (the socket may be gone already)
                reason = watch.failure() if watch is not None else None
                if reason is None:
                    raise
                raise VMStartError(f"VM {vm.name} failed to start: {reason}") from None
    finally:
        if watch is not None:
            watch.close()


def running_clients(plan: Plan, vm: VmPlan) -> list[str]:
    return [c for c in vm.netvm_clients if c in plan.vms and is_running(plan.vms[c])]


class _Alarm(Exception):
    pass


def _wait_unlocked_for(path: str, seconds: int) -> bool:
    """Block on the lock for at most ``seconds`` (SIGALRM interrupts the flock)."""

    def on_alarm(_signum: int, _frame: object) -> None:
        raise _Alarm

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, seconds))
    try:
        wait_unlocked(path)
        return True
    except _Alarm:
        return False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def stop_vm(plan: Plan, vm: VmPlan, force: bool = False) -> bool:
    """Stop ``vm`` gracefully; False if it was not running. Refuses a netvm in use."""
    clients = running_clients(plan, vm)
    if clients and not force:
        raise VMInUseError(
            f"VM {vm.name} is the netvm of running VMs: {', '.join(clients)}",
            f"stop them first, or use --force to stop them and {vm.name}",
        )
    for client in clients:
        stop_vm(plan, plan.vms[client], force=True)
    if not is_running(vm):
        return False
    state = read_state(vm.paths.state_file)
    pid = state.supervisor_pid if state else None
    if pid is None:
        raise VmsiloError(f"VM {vm.name}: supervisor pid unknown", f"see {vm.paths.state_file}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_unlocked_for(vm.paths.lock, vm.stop_timeout + 15):
        raise VmsiloError(
            f"VM {vm.name} did not stop within {vm.stop_timeout + 15} s",
            f"see {vm.paths.supervisor_log}",
        )
    return True
