"""fastStart's saved states (SPEC §10): where they live, what they are keyed by, saving one.

A state lives in ``S/<vm>/saved/<key>/`` (root only: directories 0700, files 0600): ``state``
is the VMM's saved machine — QEMU's migration stream of the booted, ready guest (one file),
crosvm's snapshot (a directory it writes) — ``ephemeral.raw`` a sparse copy of
its disposable disk taken while the guest was paused for the save (the RAM holds a mounted
ext4 upper layer on it: every restore gets a fresh copy of this, never an earlier restore's
disk), ``meta.json`` what the save cost. The key is a hash of everything the saved machine
depends on: the whole VM plan, the VMM argv it ran with (host facts included; the per-start
generation id left out), the VMM build, the accelerator and the image's files. Any change
gives a new key: the old state is never loaded (boot, then save anew), and ``vmsilo image gc``
removes states no current key names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vmsilo.backends.base import Backend, HostFacts, file_identity
from vmsilo.backends.vmm import Vmm
from vmsilo.host.disks import sparse_copy
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.plan.serialize import vm_to_json

STATE = "state"
DISK = "ephemeral.raw"
META = "meta.json"
#: The generation id written into the key's argv (the real one is new for every start).
KEY_GENERATION_ID = "00000000-0000-0000-0000-000000000000"


def saved_root(state_dir: str, vm_name: str) -> Path:
    """``S/<vm>/saved``: every saved state of one VM."""
    return Path(state_dir) / vm_name / "saved"


def state_key(plan: Plan, vm: VmPlan, backend: Backend, facts: HostFacts) -> str:
    """The key of ``vm``'s saved state under ``facts`` (see the module docstring)."""
    key_facts = replace(
        facts,
        generation_id=KEY_GENERATION_ID if facts.generation_id is not None else None,
        restore_from=None,
        ephemeral_fds=None,
    )
    image_files = [vm.kernel, vm.initramfs]
    image_files += [d.path for d in vm.disks if d.role != "ephemeral"]
    doc = {
        "plan": vm_to_json(vm),
        "argv": backend.argv(plan, vm, key_facts),
        "vmm": backend.build_id(plan),
        "accel": facts.accel,
        "image": [file_identity(p) for p in image_files],
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class SavedState:
    """One VM's saved state under one key (present or still to be saved)."""

    root: Path  # S/<vm>/saved
    key: str

    @property
    def directory(self) -> Path:
        return self.root / self.key

    @property
    def state(self) -> Path:
        return self.directory / STATE

    @property
    def disk(self) -> Path:
        return self.directory / DISK

    @property
    def meta(self) -> Path:
        return self.directory / META

    def complete(self) -> bool:
        """Whether a whole state was saved under this key (meta.json is written last)."""
        return self.meta.is_file() and self.state.exists()

    def forget(self) -> None:
        """Remove this key's state (a restore of it failed: the next start boots)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _size(path: Path) -> int:
    """The bytes of a state (QEMU writes one file, crosvm a directory of files)."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


async def save(vm: VmPlan, vmm: Vmm, saved: SavedState, timeout: float) -> dict[str, Any]:
    """Save the running ``vmm``'s guest as ``saved`` (the guest goes on); what it cost.

    Written into a temporary directory beside it and renamed into place once complete; every
    other state of the VM (stale keys) is removed afterwards. Raises on failure (the caller
    logs it: the VM runs on without a saved state)."""
    _private_dir(saved.root.parent)
    _private_dir(saved.root)
    tmp = saved.root / f".new-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _private_dir(tmp)
    disk_bytes = 0
    paused: list[float] = []

    def copy_disk() -> None:
        nonlocal disk_bytes
        t0 = time.monotonic()
        if vm.root_overlay == "raw":
            disk_bytes = sparse_copy(vm.paths.ephemeral_disk, str(tmp / DISK), skip_zeros=True)
        paused.append(time.monotonic() - t0)

    start = time.monotonic()
    try:
        await asyncio.to_thread(vmm.save_state, tmp / STATE, copy_disk, timeout)
        meta = {
            "key": saved.key,
            "saved_at": time.time(),
            "save_s": round(time.monotonic() - start, 3),
            "disk_copy_s": round(paused[0], 3) if paused else None,
            "state_bytes": _size(tmp / STATE),
            "disk_bytes": disk_bytes,
        }
        (tmp / META).write_text(json.dumps(meta) + "\n")
        os.chmod(tmp / META, 0o600)
        shutil.rmtree(saved.directory, ignore_errors=True)
        os.rename(tmp, saved.directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for other in saved.root.iterdir():
        if other.name != saved.key:
            shutil.rmtree(other, ignore_errors=True)
    return meta


def restore_disk(vm: VmPlan, saved: SavedState) -> None:
    """A fresh copy of the saved disposable disk for this restore (a new machine)."""
    if vm.root_overlay == "raw":
        sparse_copy(str(saved.disk), vm.paths.ephemeral_disk)


def log(vm: VmPlan, message: str) -> None:
    print(f"vmsilo supervisor: VM {vm.name}: {message}", file=sys.stderr)


def stale_states(state_dir: str, keys: dict[str, str | None]) -> list[Path]:
    """Saved states no current key uses: every key directory of ``S/*/saved/`` except
    ``keys[vm]`` (``keys``: the configured VMs and their current key, None without
    fastStart)."""
    stale: list[Path] = []
    for saved in sorted(Path(state_dir).glob("*/saved")):
        vm_name = saved.parent.name
        current = keys.get(vm_name)
        with contextlib.suppress(OSError):
            for entry in sorted(saved.iterdir()):
                if entry.is_dir() and entry.name != current:
                    stale.append(entry)
    return stale
