"""Starting, waiting for and stopping VMs with the embedded supervisor (no systemd).

Used by ``vmsilo start/stop``, ``vm-start``/``vm-stop`` and ``vm-run``'s autostart when systemd
does not manage the VMs. Concurrency is settled by locks, never by sleeping and retrying:

* ``R/<vm>.spawn.lock`` serialises spawners: the first takes it, spawns the supervisor and
  holds it until the supervisor reports its command socket is bound; the others wake up when
  it is released, find the socket live and just connect. Ten concurrent ``vm-run``s on a
  stopped VM therefore start exactly one VM.
* ``R/<vm>.lock`` is held by the supervisor for its whole life; ``stop`` sends SIGTERM (the
  graceful stop) or SIGQUIT (kill the VMM now, :data:`vmsilo.supervisor.state.KILL_SIGNAL`)
  and then blocks on that lock until the kernel hands it over, i.e. until the supervisor has
  exited.

Only root may do either here (the supervisor creates taps, binds sockets in the runtime
directory, signals root's processes): others get one line saying so, never a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from vmsilo.errors import VMInUseError, VMNotRunningError, VmsiloError, VMStartError
from vmsilo.lifecycle.base import App
from vmsilo.lifecycle.progress import StartProgress
from vmsilo.lifecycle.spawn import StartWatch, spawn_supervisor
from vmsilo.plan.model import Plan, VmPlan


def needs_root(action: str, vm: VmPlan, plan: Plan, tool: str) -> VmsiloError:
    """The one-line refusal for a user who may not do ``action`` with the embedded supervisor."""
    return VmsiloError(
        f"{action} VM {vm.name} needs root here",
        f"sudo {tool} {vm.name}, or `vmsilo install` so systemd/polkit let {plan.user.name} do it",
    )


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def netvm_in_use(vm: VmPlan, clients: list[str]) -> VMInUseError:
    """The refusal to stop a netvm whose clients run (without ``--with-clients``)."""
    return VMInUseError(
        f"VM {vm.name} is the netvm of running VMs: {', '.join(clients)}",
        f"stop them first, or use --with-clients to stop them and {vm.name}",
    )


class _Alarm(Exception):
    pass


def wait_unlocked_for(path: str, seconds: int) -> bool:
    """Block on the lock for at most ``seconds`` (SIGALRM interrupts the flock)."""
    from vmsilo.supervisor.state import wait_unlocked

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


class EmbeddedApp(App):
    """This process spawns and signals the per-VM supervisors itself."""

    def _start_netvm(self, plan: Plan) -> Callable[[str], None]:
        """What a supervisor spawned from here runs to start its netvm first."""

        def start_netvm(name: str) -> None:
            self.start(plan, plan.vms[name], wait=True)

        return start_netvm

    def start_for_client(
        self, plan: Plan, vm: VmPlan, *, progress: StartProgress | None = None
    ) -> StartWatch | None:
        """Make sure a supervisor serves ``vm``'s command socket (spawning one if needed);
        returns as soon as the socket is bound, the supervisor holding the client's session
        until the guest is ready."""
        if self.command_socket_live(vm):
            return None
        if os.geteuid() != 0:
            raise VmsiloError(
                f"VM {vm.name} is not running and only root can start it here",
                f"run `sudo vm-start {vm.name}`, or install the systemd units with"
                " `vmsilo install`",
            )
        with _flock(vm.paths.spawn_lock):
            if self.command_socket_live(vm):
                return None
            if self.is_running(vm):
                # a supervisor is shutting down (socket closed, lock still held): let it finish
                wait_unlocked_for(vm.paths.lock, vm.stop_timeout + 15)
            return spawn_supervisor(
                str(self.config_path), vm, plan, self._start_netvm(plan), progress
            )

    def start(
        self,
        plan: Plan,
        vm: VmPlan,
        *,
        wait: bool = True,
        progress: StartProgress | None = None,
    ) -> None:
        try:
            watch = self.start_for_client(plan, vm, progress=progress if wait else None)
        finally:
            if progress is not None and not wait:
                progress.done()
        try:
            if wait:
                import asyncio

                try:
                    asyncio.run(wait_ready_async(vm))
                except (VMNotRunningError, VMStartError):
                    # the supervisor's own last words say best why (the socket may be gone)
                    reason = watch.failure() if watch is not None else None
                    if reason is None:
                        raise
                    raise VMStartError(f"VM {vm.name} failed to start: {reason}") from None
        finally:
            if progress is not None:
                progress.done()
            if watch is not None:
                watch.close()

    def stop(
        self, plan: Plan, vm: VmPlan, *, with_clients: bool = False, kill: bool = False
    ) -> bool:
        clients = self.running_clients(plan, vm)
        if clients and not with_clients:
            raise netvm_in_use(vm, clients)
        for client in clients:
            self.stop(plan, plan.vms[client], with_clients=True, kill=kill)
        if not self.is_running(vm):
            return False
        from vmsilo.supervisor.state import read_state

        state = read_state(vm.paths.state_file)
        pid = state.supervisor_pid if state else None
        if pid is None:
            raise VmsiloError(f"VM {vm.name}: supervisor pid unknown", f"see {vm.paths.state_file}")
        from vmsilo.supervisor.state import KILL_SIGNAL

        try:
            os.kill(pid, KILL_SIGNAL if kill else signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise needs_root("stopping", vm, plan, "vm-stop") from None
        if not wait_unlocked_for(vm.paths.lock, vm.stop_timeout + 15):
            raise VmsiloError(
                f"VM {vm.name} did not stop within {vm.stop_timeout + 15} s",
                f"see {vm.paths.supervisor_log}",
            )
        return True


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
