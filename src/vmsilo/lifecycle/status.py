"""A VM's state as ``vmsilo status`` shows it, and the plan it was started with.

Derived from what the supervisor leaves behind: whether it holds the lock, its state file (which
outlives it with the last exit) and the plan snapshot taken at start (SPEC §6: "config
changed").
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from vmsilo.errors import VmsiloError
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.supervisor.snapshot import changed_since, plan_from_snapshot, read_snapshot
from vmsilo.supervisor.state import read_state

if TYPE_CHECKING:
    from vmsilo.config.users import UserLookup

_IN_FLIGHT = ("starting", "running", "stopping")


def vm_status(vm: VmPlan, *, running: bool) -> dict[str, Any]:
    """SPEC §6's status fields for ``vm``, whose supervisor runs or not (``running``)."""
    st = read_state(vm.paths.state_file)
    if running and st is not None:
        state = st.state
    elif st is not None and st.state == "failed":
        state = "failed"
    elif st is not None and st.state in _IN_FLIGHT:
        state = "failed"  # the supervisor died without cleaning up
    else:
        state = "stopped"
    uptime = None
    if running and st is not None and st.ready_at is not None:
        uptime = round(time.time() - st.ready_at, 1)
    config_changed = False
    if running:
        snap = read_snapshot(vm.paths.plan_snapshot)
        config_changed = snap is not None and changed_since(snap, vm)
    last_exit = st.last_exit if st is not None else None
    if st is not None and not running and st.state in _IN_FLIGHT:
        last_exit = {"reason": "supervisor exited without cleanup", "at": None}
    return {
        "name": vm.name,
        "state": state,
        "id": vm.id,
        "hypervisor": vm.hypervisor,
        "memory": vm.memory,
        "cpus": vm.cpus,
        "pid": st.vmm_pid if running and st is not None else None,
        "supervisor_pid": st.supervisor_pid if running and st is not None else None,
        "uptime_s": uptime,
        "netvm": vm.netvm,
        "color": vm.color,
        "config_changed": config_changed,
        "last_exit": last_exit,
        "detail": st.detail if running and st is not None else None,
    }


def snapshot_plan(vm: VmPlan, users: UserLookup | None = None) -> tuple[Plan, VmPlan] | None:
    """The plan rebuilt from ``vm``'s start snapshot; None without a usable one."""
    snap = read_snapshot(vm.paths.plan_snapshot)
    if snap is None:
        return None
    try:
        if users is not None:
            return plan_from_snapshot(snap, vm.name, users)
        return plan_from_snapshot(snap, vm.name)
    except (VmsiloError, KeyError):
        return None
