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
from vmsilo.plan.serialize import vm_to_json
from vmsilo.supervisor.snapshot import changed_since, plan_from_snapshot, read_snapshot
from vmsilo.supervisor.state import read_state

if TYPE_CHECKING:
    from vmsilo.backends.base import SoundFacts
    from vmsilo.config.users import UserLookup

_IN_FLIGHT = ("starting", "running", "stopping")


#: The status fields a running VM takes from its plan snapshot (the values it runs with),
#: by the snapshot's JSON key.
_FROM_SNAPSHOT = {
    "id": "id",
    "hypervisor": "hypervisor",
    "memory": "memory",
    "cpus": "cpus",
    "netvm": "netvm",
    "color": "color",
}


def sound_text(vm: VmPlan, recorded: dict[str, Any] | None, now: SoundFacts | None) -> str:
    """What ``status`` says of a VM's sound (SPEC §9.2): ``off``, what it has, or why it is
    unavailable — as found at its start (``recorded``, running VMs) or on the host now (a
    server that went away since, or what a start would find)."""
    if not vm.sound.playback:
        return "off"
    if recorded is not None and not recorded.get("available", True):
        return f"unavailable: {recorded.get('why')}"
    if now is not None and not now.available:
        return f"unavailable: {now.why}"
    return "playback and capture" if vm.sound.capture else "playback"


def vm_status(vm: VmPlan, *, running: bool, sound: SoundFacts | None = None) -> dict[str, Any]:
    """SPEC §6's status fields for ``vm``, whose supervisor runs or not (``running``).

    A running VM's values are those it was started with (its plan snapshot, SPEC §6); when
    the config has changed since, ``config_changed`` is true, ``config_changes`` lists what
    changed (the plan's top-level keys) and ``config_values`` has the config's values of the
    status fields that differ."""
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
    values: dict[str, Any] = {
        "id": vm.id,
        "hypervisor": vm.hypervisor,
        "memory": vm.memory,
        "cpus": vm.cpus,
        "netvm": vm.netvm,
        "color": vm.color,
    }
    changes: list[str] = []
    config_values: dict[str, Any] = {}
    if running:
        snap = read_snapshot(vm.paths.plan_snapshot)
        if snap is not None and changed_since(snap, vm):
            current = vm_to_json(vm)
            keys = sorted(set(snap.vm_json) | set(current))
            changes = [k for k in keys if snap.vm_json.get(k) != current.get(k)]
            for field, key in _FROM_SNAPSHOT.items():
                if key in snap.vm_json and snap.vm_json[key] != values[field]:
                    config_values[field] = values[field]
                    values[field] = snap.vm_json[key]
    last_exit = st.last_exit if st is not None else None
    if st is not None and not running and st.state in _IN_FLIGHT:
        last_exit = {
            "reason": "supervisor exited without cleanup",
            "cause": "abandoned",
            "clean": False,
            "at": None,
        }
    return {
        "name": vm.name,
        "state": state,
        **values,
        "pid": st.vmm_pid if running and st is not None else None,
        "supervisor_pid": st.supervisor_pid if running and st is not None else None,
        "uptime_s": uptime,
        "config_changed": bool(changes),
        # what changed (the plan's keys), and the config's values of the fields above
        "config_changes": changes,
        "config_values": config_values,
        "last_exit": last_exit,
        "detail": st.detail if running and st is not None else None,
        "sound": sound_text(vm, st.extra.get("sound") if running and st else None, sound),
        # fastStart (SPEC §10): whether this run was restored from the saved state
        "restored": (
            st.extra.get("start") == "restored" if running and st and vm.fast_start else None
        ),
        # why this run is not as fast as it should be, or the next one will not be
        "fast_start_note": fast_start_note(st.extra) if running and st and vm.fast_start else None,
    }


def fast_start_note(extra: dict[str, Any]) -> str | None:
    """What went wrong with fastStart in this run (None: nothing): a save that failed (the
    next start boots again), a saved state that did not restore (this run booted instead)."""
    if extra.get("save_failed"):
        return f"saving the ready state failed ({extra['save_failed']}): the next start boots"
    if extra.get("restore_failed"):
        return f"the saved state did not restore ({extra['restore_failed']}): booted instead"
    return None


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
