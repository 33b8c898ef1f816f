"""Ending a VM (SPEC §4 "Stop"): the power button, then ``stopTimeout``, then kill; after
any end, the cleanup and the exit reason kept in the state file for ``vmsilo status``."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

from vmsilo.backends.vmm import Vmm, VmmExit, wait_process
from vmsilo.supervisor.cleanup import cleanup_vm
from vmsilo.supervisor.notify import sd_notify
from vmsilo.supervisor.prelaunch import Prelaunch
from vmsilo.supervisor.state import now

#: How long the backend's power-button request itself may take.
POWERBTN_TIMEOUT = 5


async def stop_vmm(
    launch: Prelaunch, vmm: Vmm, vmm_exit: asyncio.Task[Any], graceful: bool
) -> VmmExit:
    """Power button (unless not ``graceful``), wait ``stopTimeout``, then kill."""
    launch.set_state("stopping")
    if graceful:
        try:
            await asyncio.wait_for(vmm.request_poweroff(), timeout=POWERBTN_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as e:
            print(f"vmsilo supervisor: power button failed: {e}", file=sys.stderr)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(vmm_exit), timeout=launch.vm.stop_timeout)
    if not vmm_exit.done():
        vmm.kill()
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
        last: dict[str, Any] = {"reason": failure, "at": now()}
        code_from = exit_info or start_exit
        if code_from is not None:
            last["code"] = code_from.code
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
    return {"reason": info.reason, "code": info.code, "clean": info.clean, "at": now()}
