"""Driving the VMM process: start it, ask the guest to power off, read why it exited.

Two implementations behind one interface: QEMU (QMP ``system_powerdown``) and crosvm (control
socket ``powerbtn``, and its distinct exit codes for reset, crash, guest panic and watchdog).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from dataclasses import dataclass

from vmsilo.plan.model import Plan, VmPlan
from vmsilo.runcmd import describe_status

CROSVM_EXITS = {
    0: "stopped",
    32: "reset",
    33: "crash",
    34: "guest panic",
    35: "invalid arguments",
    36: "watchdog reset",
}


@dataclass(frozen=True)
class VmmExit:
    code: int  # returncode (negative: signal)
    reason: str
    clean: bool  # guest powered off or stopped on request
    restart: bool = False  # crosvm reset: boot again with a fresh ephemeral disk


class Vmm:
    """A running VMM child; subclasses know how to ask it to power off."""

    name = "vmm"

    def __init__(self, plan: Plan, vm: VmPlan, argv: list[str]) -> None:
        self.plan = plan
        self.vm = vm
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        return self.proc.pid

    async def wait(self) -> VmmExit:
        assert self.proc is not None
        code = await self.proc.wait()
        return self.classify(code)

    def classify(self, code: int) -> VmmExit:
        if code == 0:
            return VmmExit(0, "guest powered off", clean=True)
        return VmmExit(code, f"{self.name} {describe_status(code)}", clean=False)

    async def request_poweroff(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)


class QemuVmm(Vmm):
    name = "qemu"

    async def request_poweroff(self) -> None:
        """QMP ``system_powerdown``: the ACPI power button, handled by the guest init."""
        reader, writer = await asyncio.open_unix_connection(self.vm.paths.qmp)
        try:
            await reader.readline()  # greeting
            for command in ("qmp_capabilities", "system_powerdown"):
                writer.write(json.dumps({"execute": command}).encode() + b"\n")
                await writer.drain()
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    reply = json.loads(line)
                    if "return" in reply or "error" in reply:
                        break
        finally:
            writer.close()


class CrosvmVmm(Vmm):
    name = "crosvm"

    def classify(self, code: int) -> VmmExit:
        if code == 0:
            return VmmExit(0, "stopped", clean=True)
        if code in CROSVM_EXITS:
            return VmmExit(code, f"crosvm: {CROSVM_EXITS[code]}", clean=False, restart=code == 32)
        return VmmExit(code, f"crosvm {describe_status(code)}", clean=False)

    async def control(self, command: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            self.plan.crosvm.binary,
            command,
            self.vm.paths.crosvm_control,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()

    async def request_poweroff(self) -> None:
        await self.control("powerbtn")
