"""Undoing a VM's launch: what a supervisor removes after any kind of exit (and what
``vmsilo service cleanup`` removes after a supervisor that could not).

Cleanup goes by the VM's plan, and after a config edit that plan may name what another running
VM holds (a start refused for that reason is cleaned up too, and so is systemd's
``ExecStopPost`` after it): whatever another running VM holds is left to it
(:mod:`vmsilo.supervisor.identities`).
"""

from __future__ import annotations

from vmsilo.host.disks import remove_file
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.supervisor.identities import held_by_others
from vmsilo.supervisor.state import is_locked


def runtime_sockets(vm: VmPlan) -> list[str]:
    p = vm.paths
    return [
        p.console,
        p.console_backend,
        p.ready_socket,
        p.channel_socket,
        p.crosvm_control,
        p.qmp,
        p.sound_socket,
        *(s.socket for s in vm.shares),
    ]


def peer_bridges_in_use(plan: Plan, vm: VmPlan) -> list[str]:
    """Link bridges this VM shares with a peer that is still running (keep those)."""
    keep = []
    for i in vm.interfaces:
        if i.bridge is None or i.injected_for is None or i.injected_for == "host":
            continue
        peer = plan.vms.get(i.injected_for)
        if peer is not None and is_locked(peer.paths.lock):
            keep.append(i.bridge)
    return keep


def cleanup_vm(plan: Plan, vm: VmPlan, *, remove_command_socket: bool) -> list[str]:
    """Undo everything a launch created; safe to run twice and after any kind of exit.

    Returns the problems met (cleanup carries on past each one)."""
    problems: list[str] = []
    held = held_by_others(plan, vm)
    paths = [vm.paths.ephemeral_disk, *runtime_sockets(vm)]
    paths += [vm.paths.command_socket] if remove_command_socket else []
    for path in [*paths, vm.paths.plan_snapshot]:
        if ("path", path) not in held and ("disk", path) not in held:
            remove_file(path)
    if not vm.interfaces:
        return problems
    from vmsilo.host.input_filter import input_table_name, teardown_input_filter
    from vmsilo.host.nat import table_name, teardown_host_nat
    from vmsilo.host.network import teardown_interfaces

    keep = {value for kind, value in held if kind == "interface"}
    try:
        teardown_interfaces(vm, keep=[*peer_bridges_in_use(plan, vm), *keep])
        if ("nft table", table_name(vm)) not in held:
            teardown_host_nat(vm)
        if ("nft table", input_table_name(vm.id)) not in held:
            teardown_input_filter(vm)
    except Exception as e:  # cleanup must go on; report what failed
        problems.append(f"network teardown: {e}")
    return problems


def cleanup_after_exit(plan: Plan, vm: VmPlan, *, remove_command_socket: bool) -> list[str] | None:
    """``vmsilo service cleanup`` (systemd's ExecStopPost): undo the launch of a supervisor
    that is gone, and record a supervisor that died mid-flight as failed.

    None while a supervisor still holds the VM's lock (it cleans up itself); else the problems
    met."""
    from vmsilo.supervisor.state import mark_abandoned

    if is_locked(vm.paths.lock):
        return None
    problems = cleanup_vm(plan, vm, remove_command_socket=remove_command_socket)
    mark_abandoned(vm.paths.state_file)
    return problems
