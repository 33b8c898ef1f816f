"""Start or stop a VM the way this host runs it (SPEC §5).

Through systemd when ``vmsilo install`` put the VM's units in place for this config, else with
the embedded supervisor. Every command that starts or stops a VM (``vm-start``, ``vm-stop``,
``vmsilo start/stop``, ``vm-run``'s autostart) goes through here, so none of them can run an
embedded supervisor beside the one systemd would start.
"""

from __future__ import annotations

from pathlib import Path

from vmsilo.plan.model import Plan, VmPlan
from vmsilo.supervisor import control, systemd_control
from vmsilo.supervisor.control import StartWatch


def start(config_path: str | Path, plan: Plan, vm: VmPlan, *, wait: bool = True) -> None:
    """Start ``vm``; with ``wait``, return once the guest is ready."""
    if systemd_control.units_installed(vm, config_path):
        systemd_control.start_vm(vm, wait=wait)  # systemctl waits for READY=1
    else:
        control.start_vm(str(config_path), plan, vm, wait=wait)


def start_for_client(config_path: str | Path, plan: Plan, vm: VmPlan) -> StartWatch | None:
    """Start ``vm`` for a client about to connect to its command socket (``vm-run``).

    Through systemd: returns once the guest is ready (the socket unit may be stopped as well,
    so there may be nothing to connect to before that; polkit lets the configured user).
    Embedded: returns as soon as the supervisor's command socket is bound, with the spawner's
    start watch; the supervisor holds the client's session until the guest is ready."""
    if systemd_control.units_installed(vm, config_path):
        systemd_control.start_vm(vm, wait=True)
        return None
    return control.ensure_supervisor(str(config_path), vm, plan)


def stop(config_path: str | Path, plan: Plan, vm: VmPlan, *, force: bool = False) -> bool:
    """Stop ``vm`` gracefully (its netvm clients first with ``force``); False if it was not
    running."""
    if systemd_control.units_installed(vm, config_path):
        return systemd_control.stop_vm(plan, vm, force=force)
    return control.stop_vm(plan, vm, force=force)
