"""The crosvm Backend: argv from :mod:`vmsilo.backends.crosvm`, control through its socket.

crosvm is asked to power off with ``crosvm powerbtn <control socket>`` and tells why it ended
in its exit code (SPEC §4 "Stop": 32 reset → boot again with a fresh ephemeral disk, 33
crash, 34 guest panic, 36 watchdog).
"""

from __future__ import annotations

from vmsilo.backends import features
from vmsilo.backends.base import Backend, HostFacts
from vmsilo.backends.crosvm import control_argv, crosvm_argv
from vmsilo.backends.vmm import Vmm, VmmExit
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


class CrosvmVmm(Vmm):
    name = "crosvm"

    def classify(self, code: int) -> VmmExit:
        if code == 0:
            # the guest powered off, or someone ran `crosvm stop` on the control socket
            return VmmExit(0, "guest powered off (or crosvm stop)", clean=True)
        if code in CROSVM_EXITS:
            return VmmExit(code, f"crosvm: {CROSVM_EXITS[code]}", clean=False, restart=code == 32)
        return VmmExit(code, f"crosvm {describe_status(code)}", clean=False)

    async def control(self, command: str) -> int:
        import asyncio

        proc = await asyncio.create_subprocess_exec(
            *control_argv(self.plan, self.vm, command),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()

    async def request_poweroff(self) -> None:
        await self.control("powerbtn")


class CrosvmBackend(Backend):
    name = "crosvm"
    features = features.CROSVM
    package = "crosvm"
    install_hint = "install crosvm, or set crosvm.binary"
    needs_kvm = True
    needs_vsock = True
    without_kvm = "crosvm VMs cannot start"
    without_vsock = "missing; crosvm VMs need vsock"

    def binary(self, plan: Plan) -> str:
        return plan.crosvm.binary

    def argv(self, plan: Plan, vm: VmPlan, facts: HostFacts) -> list[str]:
        return crosvm_argv(plan, vm, extra_params=facts.kernel_params)

    def vmm(self, plan: Plan, vm: VmPlan, argv: list[str]) -> Vmm:
        return CrosvmVmm(plan, vm, argv)


CROSVM = CrosvmBackend()
