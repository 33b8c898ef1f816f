"""The plan snapshot taken when a VM starts (``R/<vm>.plan.json``).

It holds the config *text* the VM was started from plus that VM's plan as JSON. Runtime actions
on a running VM (stop, cleanup, connecting vm-run) rebuild the plan from the saved text — the
plan is a pure function of it — so they act on what is running even after the config file was
edited; ``status`` compares the saved JSON with the current plan to flag "config changed".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmsilo.config.users import UserLookup, system_users
from vmsilo.contracts.fs import atomic_write
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.plan.serialize import vm_to_json


@dataclass(frozen=True)
class Snapshot:
    config_path: str
    config_text: str
    vm_json: dict[str, Any]

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(self.config_text.encode()).hexdigest()[:16]


def write_snapshot(
    path: str, config_path: str, config_text: str, vm: VmPlan, group: int | None = None
) -> Snapshot:
    """Root writes it; ``group`` (the desktop user's) may read it, nobody else (SPEC §11.5)."""
    snap = Snapshot(config_path, config_text, vm_to_json(vm))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        target,
        json.dumps(
            {"configPath": config_path, "configText": config_text, "vm": snap.vm_json}, indent=1
        ),
        0o640 if group is not None else 0o600,
        group=group,
    )
    return snap


def read_snapshot(path: str) -> Snapshot | None:
    try:
        data = json.loads(Path(path).read_text())
        return Snapshot(data["configPath"], data["configText"], data["vm"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_from_snapshot(
    snap: Snapshot, vm: str, users: UserLookup = system_users
) -> tuple[Plan, VmPlan]:
    from vmsilo.config.load import parse_config  # the typed config: only when re-planning
    from vmsilo.plan.build import build_plan

    plan = build_plan(parse_config(snap.config_text, users, source=snap.config_path), users)
    return plan, plan.vms[vm]


def changed_since(snap: Snapshot, current: VmPlan) -> bool:
    return snap.vm_json != vm_to_json(current)
