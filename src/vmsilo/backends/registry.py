"""The Backend objects by hypervisor name, and the one call that builds a VM's VMM argv.

:func:`launch_argv` is what both ``vmsilo argv`` / ``render-launcher`` and the supervisor
call, so what the user is shown is what runs: the same argv, with the VMM binary as
configured (the supervisor's preflight only checks that it is found; exec looks it up in the
same PATH), except that ``vmsilo argv`` reads QEMU's accelerator verdict from the cache rather
than running a test boot (``probe=False``).
"""

from __future__ import annotations

from types import MappingProxyType

from vmsilo.backends.base import Backend, HostFacts
from vmsilo.backends.crosvm_backend import CROSVM
from vmsilo.backends.qemu_backend import QEMU
from vmsilo.plan.model import Plan, VmPlan

#: Every backend by name (the doctor lists VMM binaries in this order).
BACKENDS: MappingProxyType[str, Backend] = MappingProxyType({"qemu": QEMU, "crosvm": CROSVM})


def get(name: str) -> Backend:
    """The backend called ``name`` (a ``hypervisor`` value of the config)."""
    return BACKENDS[name]


def backend_for(vm: VmPlan) -> Backend:
    """The backend ``vm`` runs under."""
    return BACKENDS[vm.hypervisor]


def launch_argv(
    plan: Plan, vm: VmPlan, *, probe: bool, backend: Backend | None = None
) -> list[str]:
    """The VMM argv of ``vm`` under ``backend`` (default: its own), host facts read once.

    ``probe``: may run QEMU's KVM test boot (the supervisor); else the cached verdict."""
    return launch(plan, vm, probe=probe, backend=backend)[0]


def launch(
    plan: Plan, vm: VmPlan, *, probe: bool, backend: Backend | None = None
) -> tuple[list[str], HostFacts]:
    """:func:`launch_argv` and the host facts it was built from (the supervisor records what
    they say about sound, and runs the sound daemon they call for)."""
    chosen = backend or backend_for(vm)
    facts = chosen.host_facts(plan, vm, probe=probe)
    return chosen.argv(plan, vm, facts), facts
