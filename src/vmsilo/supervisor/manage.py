"""Start or stop a VM the way this host runs it (SPEC §5).

Through systemd when ``vmsilo install`` put the VM's units in place for this config, else with
the embedded supervisor. The commands that start or stop a VM on request (``vm-start``,
``vm-stop``, ``vmsilo start/stop``) all go through here, so none of them can run an embedded
supervisor beside the one systemd would start. (``vm-run``'s autostart makes the same choice in
:func:`vmsilo.cli.vm_run.autostart`, which also keeps the embedded spawner's start watch.)
"""

from __future__ import annotations

from pathlib import Path

from vmsilo.plan.model import Plan, VmPlan
from vmsilo.supervisor import control, systemd_control


def start(config_path: str | Path, plan: Plan, vm: VmPlan, *, wait: bool = True) -> None:
    """Start ``vm``; with ``wait``, return once the guest is ready."""
    if systemd_control.units_installed(vm, config_path):
        systemd_control.start_vm(vm, wait=wait)  # systemctl waits for READY=1
    else:
        control.start_vm(str(config_path), plan, vm, wait=wait)


def stop(config_path: str | Path, plan: Plan, vm: VmPlan, *, force: bool = False) -> bool:
    """Stop ``vm`` gracefully (its netvm clients first with ``force``); False if it was not
    running."""
    if systemd_control.units_installed(vm, config_path):
        return systemd_control.stop_vm(plan, vm, force=force)
    return control.stop_vm(plan, vm, force=force)
