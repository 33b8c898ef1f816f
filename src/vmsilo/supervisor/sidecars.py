"""Sidecar daemons a VM needs next to its VMM: virtiofsd per share, the sound device.

The supervisor binds every sidecar's listening socket itself and hands the fd to the daemon, so
the VMM can never race a sidecar that is not listening yet (the classic virtiofsd start race).
"""

from __future__ import annotations

import asyncio
import contextlib

from vmsilo.errors import VmsiloError
from vmsilo.plan.model import Plan, VmPlan


class Sidecars:
    """The running sidecars of one VM, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, plan: Plan, vm: VmPlan) -> None:
        if vm.shares:
            raise VmsiloError(
                f"VM {vm.name} has shares ({', '.join(s.tag for s in vm.shares)}), but this"
                " vmsilo cannot start virtiofsd yet",
                "set sharedHome = false and remove sharedDirectories for now",
            )

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), timeout=5)
        self.procs.clear()
