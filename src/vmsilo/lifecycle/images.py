"""Which image versions running VMs use (for ``vmsilo image gc``).

Which version a running VM uses cannot be read from its plan snapshot alone: the plan names
``S/images/<name>/current/…``, and ``current`` may have moved to a newer build since the VM
started. The truth is what the VMM holds open, so the rule is, for every running supervisor
(every locked ``R/*.lock``, including VMs since removed from the config):

* every image version directory that the VMM process or one of its descendants has open or
  mapped (``/proc/<pid>/fd``, ``/proc/<pid>/maps``; the root disk stays open for the VM's
  whole life) is in use;
* so is every version its snapshot's kernel, initramfs and disk paths resolve to (explicit
  version paths in the config);
* if that cannot be determined — no VMM yet (starting), or ``/proc`` unreadable — every
  version of that VM's image is kept, and the output says why.

``current`` is never removed, so a VM starting concurrently (it opens ``current``) is safe, and
each image is collected under the build lock, so a build cannot move ``current`` meanwhile.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmsilo.plan.model import Plan
from vmsilo.supervisor.snapshot import read_snapshot
from vmsilo.supervisor.state import is_locked, read_state


def _version_dir(path: str, images: Path) -> Path | None:
    """``images/<name>/<version>`` containing ``path`` (after resolving symlinks), if any."""
    real = Path(os.path.realpath(path))
    try:
        parts = real.relative_to(images).parts
    except ValueError:
        return None
    if len(parts) < 2 or parts[1].startswith(".") or parts[1] == "current":
        return None
    return images / parts[0] / parts[1]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the comm field may contain spaces and parentheses: the ppid follows the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _process_tree(pid: int) -> list[int]:
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _open_paths(pid: int) -> list[str]:
    """Files process ``pid`` has open or mapped; raises PermissionError if it may not be read."""
    paths: list[str] = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except FileNotFoundError:
        return paths  # exited meanwhile
    for fd in fds:
        try:
            paths.append(os.readlink(fd))
        except OSError:
            continue
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except FileNotFoundError:
        return paths
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.append(fields[5].removesuffix(" (deleted)"))
    return paths


def images_in_use(state_dir: str, runtime_dir: str) -> tuple[set[Path], list[str]]:
    """(version directories running VMs use, notes on VMs whose use had to be guessed)."""
    images = Path(os.path.realpath(Path(state_dir) / "images"))
    in_use: set[Path] = set()
    notes: list[str] = []
    run = Path(runtime_dir)
    locks = sorted(run.glob("*.lock")) if run.is_dir() else []
    for lock in locks:
        if not is_locked(lock):
            continue
        vm = lock.stem
        snap = read_snapshot(str(run / f"{vm}.plan.json"))
        state = read_state(run / f"{vm}.state.json")
        names: set[str] = set()
        if snap is not None:
            vm_json = snap.vm_json
            paths = [vm_json.get("kernel"), vm_json.get("initramfs")]
            paths += [d.get("path") for d in vm_json.get("disks", []) if isinstance(d, dict)]
            for p in paths:
                if isinstance(p, str) and (found := _version_dir(p, images)) is not None:
                    in_use.add(found)
                    names.add(found.parent.name)
            if isinstance(vm_json.get("image"), str):
                names.add(vm_json["image"])
        pid = state.vmm_pid if state is not None else None
        why = None
        if pid is None:
            why = "its VMM has not started yet"
        else:
            try:
                for p in _process_tree(pid):
                    for path in _open_paths(p):
                        if (found := _version_dir(path, images)) is not None:
                            in_use.add(found)
            except PermissionError:
                why = f"cannot read /proc/{pid} (run as root)"
        if why is not None:
            guarded = sorted(names) if names else sorted(p.name for p in images.glob("*/"))
            for name in guarded:
                in_use.update(
                    d
                    for d in (images / name).glob("*")
                    if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")
                )
            notes.append(
                f"VM {vm} is running but {why}: kept every version of {', '.join(guarded)}"
            )
    return in_use, notes


def stale_saved_states(plan: Plan) -> list[Path]:
    """fastStart states (SPEC §10) no current key uses: for every VM of the config, each
    ``S/<vm>/saved/<key>`` but the key it would start with now (none without fastStart); for
    VMs no longer in the config, all of them. A save in progress (``.new-<pid>`` of a live
    supervisor) is left alone."""
    from vmsilo.backends.registry import backend_for
    from vmsilo.supervisor.saved import stale_states, state_key

    keys: dict[str, str | None] = {}
    for vm in plan.vms.values():
        backend = backend_for(vm)
        if vm.fast_start and backend.saves_state:
            facts = backend.host_facts(plan, vm, probe=False)
            keys[vm.name] = state_key(plan, vm, backend, facts)
        else:
            keys[vm.name] = None
    stale = []
    for path in stale_states(plan.state_dir, keys):
        if path.name.startswith(".new-") and _alive(path.name.removeprefix(".new-")):
            continue
        if path.parent.parent.name == "images":  # S/images/saved: an image named "saved"
            continue
        stale.append(path)
    return stale


def _alive(pid: str) -> bool:
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")
