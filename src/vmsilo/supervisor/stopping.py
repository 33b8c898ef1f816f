"""Ending a VM (SPEC §4 "Stop"): the power button, then ``stopTimeout``, then kill; after
any end, the cleanup and the exit reason kept in the state file for ``vmsilo status``.

The last exit (``last_exit`` in the state file) says why the VM ended, in words (``reason``)
and as one of these ``cause`` words, so that the reasons are told apart:

* ``stop`` — stopped on request (``vmsilo stop``, ``vm-stop``, ``systemctl stop``, SIGTERM):
  the power button, and the guest powered off;
* ``kill`` — killed on request (``vmsilo stop --kill``: the supervisor got
  :data:`~vmsilo.supervisor.state.KILL_SIGNAL`), no power button;
* ``stop-timeout`` — the guest did not power off within ``stopTimeout`` of the power button;
* ``auto-shutdown`` — the guest agent powered the guest off after its idle timeout
  (``autoShutdown``; it says so on the ready port before it does);
* ``guest-poweroff`` — the guest powered off by itself (``poweroff`` in the guest);
* ``crash`` — the VMM exited with an error (its ``code``: crosvm's crash/panic/watchdog codes,
  a signal);
* ``start-failure`` — the start failed (a good start later drops it: it does not stick);
* ``abandoned`` — the supervisor died without cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import replace
from typing import Any

from vmsilo.backends.vmm import Vmm, VmmExit, wait_process
from vmsilo.supervisor.cleanup import cleanup_vm
from vmsilo.supervisor.notify import sd_notify
from vmsilo.supervisor.prelaunch import Prelaunch
from vmsilo.supervisor.state import now

#: How long the backend's power-button request itself may take.
POWERBTN_TIMEOUT = 5


STOPPED = "stopped on request (power button)"
KILLED = "killed on request (stop --kill)"


async def stop_vmm(
    launch: Prelaunch,
    vmm: Vmm,
    vmm_exit: asyncio.Task[Any],
    graceful: bool,
    kill_now: asyncio.Event | None = None,
) -> VmmExit:
    """Power button (unless not ``graceful``), wait ``stopTimeout``, then kill; ``kill_now``
    (set now or while waiting) kills at once."""
    launch.set_state("stopping")
    kill_now = kill_now or asyncio.Event()
    if graceful and not kill_now.is_set():
        try:
            await asyncio.wait_for(vmm.request_poweroff(), timeout=POWERBTN_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as e:
            print(f"vmsilo supervisor: power button failed: {e}", file=sys.stderr)
        killing = asyncio.ensure_future(kill_now.wait())
        try:
            await asyncio.wait(
                {vmm_exit, killing},
                timeout=launch.vm.stop_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            killing.cancel()
    if not vmm_exit.done():
        vmm.kill()
        result: VmmExit = await vmm_exit
        if kill_now.is_set():
            return VmmExit(result.code, KILLED, clean=True, cause="kill")
        if graceful:
            return VmmExit(result.code, "killed after stopTimeout", False, cause="stop-timeout")
        return VmmExit(result.code, "killed (stopped while starting)", True, cause="stop")
    result = vmm_exit.result()
    if result.clean:
        return VmmExit(result.code, STOPPED, clean=True, cause="stop")
    return with_cause(result)


def with_cause(result: VmmExit, farewell: str | None = None) -> VmmExit:
    """A VMM exit nobody asked for, with its cause: an error exit is a crash; a clean one is
    the guest's own poweroff (``farewell``: what the guest agent said it was doing)."""
    if result.cause:
        return result
    if not result.clean:
        return replace(result, cause="crash")
    if farewell is not None:
        return replace(result, reason=farewell, cause="auto-shutdown")
    return replace(result, cause="guest-poweroff")  # the backend's words (QEMU: powered off)


async def reap(vmm: Vmm | None) -> None:
    """Make sure the VMM is gone (a no-op when it already ended)."""
    if vmm is None:
        return
    vmm.kill()
    if vmm.proc is not None:
        with contextlib.suppress(Exception):
            await wait_process(vmm.proc)


async def clean_up(launch: Prelaunch) -> None:
    """Undo the launch: taps, sockets, ephemeral disk… (problems are logged, not raised)."""
    # in a worker thread: pyroute2's synchronous API runs an event loop of its own
    problems = await asyncio.to_thread(
        cleanup_vm, launch.plan, launch.vm, remove_command_socket=launch.owns_command_socket
    )
    for problem in problems:
        print(f"vmsilo supervisor: cleanup: {problem}", file=sys.stderr)


def record_end(
    launch: Prelaunch, failure: str | None, exit_info: VmmExit | None, start_exit: VmmExit | None
) -> None:
    """The final state (``failed`` with the reason, or ``stopped``), told to the spawner."""
    if failure is not None:
        last: dict[str, Any] = {"reason": failure, "clean": False, "at": now()}
        code_from = exit_info or start_exit
        if code_from is not None:
            last["code"] = code_from.code
        if exit_info is not None and exit_info.cause:
            last["cause"] = exit_info.cause
        else:  # a start that failed, or the supervisor's own failure after it
            last["cause"] = "start-failure" if launch.state.ready_at is None else "crash"
        launch.set_state("failed", vmm_pid=None, last_exit=last, supervisor_pid=None)
        launch.spawner.send(f"failed {failure}")
        sd_notify(f"STATUS=failed: {failure}")
    else:
        last_exit = exit_dict(exit_info) if exit_info else None
        launch.set_state("stopped", vmm_pid=None, last_exit=last_exit, supervisor_pid=None)
    launch.spawner.close()


def exit_dict(info: VmmExit | None) -> dict[str, Any] | None:
    if info is None:
        return None
    cause = info.cause or ("crash" if not info.clean else "")
    return {
        "reason": info.reason,
        "cause": cause,
        "code": info.code,
        "clean": info.clean,
        "at": now(),
    }
