"""A start never takes a running VM's identities; a cleanup never removes them (SPEC §11.6).

The running VMs are those whose supervisor holds ``R/<vm>.lock`` and whose plan snapshot
``R/<vm>.plan.json`` is readable — whatever the config says now: a VM removed from it or
renamed still runs with what it was started with, and its snapshot says what that is. The
comparison itself is :mod:`vmsilo.host.identity` (pure); this module only reads the runtime
directory and words the refusal.
"""

from __future__ import annotations

from pathlib import Path

from vmsilo.errors import VMAlreadyRunningError
from vmsilo.host.identity import Claim, claims_of, conflicts, describe, shared
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.plan.serialize import vm_to_json
from vmsilo.supervisor.snapshot import read_snapshot
from vmsilo.supervisor.state import is_locked

SNAPSHOT_SUFFIX = ".plan.json"


def running_claims(runtime_dir: str, *, besides: str) -> dict[str, list[Claim]]:
    """Running VM → the identities it holds, for every running VM but ``besides``."""
    out: dict[str, list[Claim]] = {}
    for path in sorted(Path(runtime_dir).glob(f"*{SNAPSHOT_SUFFIX}")):
        name = path.name[: -len(SNAPSHOT_SUFFIX)]
        if name == besides or not is_locked(path.with_name(f"{name}.lock")):
            continue
        snap = read_snapshot(str(path))
        if snap is None:
            continue
        try:
            out[name] = claims_of(name, snap.vm_json)
        except (KeyError, TypeError, ValueError):
            continue  # a snapshot of another vmsilo version's shape: nothing to compare
    return out


def claims_of_plan(vm: VmPlan) -> list[Claim]:
    return claims_of(vm.name, vm_to_json(vm))


def refuse_shared_identities(plan: Plan, vm: VmPlan) -> None:
    """Raise, naming each running VM and what ``vm`` would share with it, if it would."""
    mine = claims_of_plan(vm)
    found = []
    for other, theirs in running_claims(plan.runtime_dir, besides=vm.name).items():
        clash = conflicts(mine, theirs)
        if clash:
            found.append((other, describe(clash)))
    if not found:
        return
    what = "; ".join(f"with running VM {other}: {clash}" for other, clash in found)
    stops = " and ".join(f"`vm-stop {other}`" for other, _ in found)
    raise VMAlreadyRunningError(
        f"VM {vm.name} cannot start: it would share identities {what}"
        " (ids, links and taps follow the config, which changed since that VM started)",
        f"stop it first: {stops}; then start {vm.name}",
    )


def held_by_others(plan: Plan, vm: VmPlan) -> set[tuple[str, str]]:
    """The identities of ``vm`` that another running VM holds too (cleanup keeps them)."""
    mine = claims_of_plan(vm)
    held: set[tuple[str, str]] = set()
    for theirs in running_claims(plan.runtime_dir, besides=vm.name).values():
        held |= {c.key for c in shared(mine, theirs)}
    return held
