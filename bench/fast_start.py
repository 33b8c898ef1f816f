#!/usr/bin/env python3
"""fastStart (SPEC §10, issue 14): a cold `vm-run VM true` restored from the saved ready
state, next to the boot path, measured in the same run (QEMU; TCG where KVM cannot run).

Two VMs with the same plan but for ``fastStart``: ``bench`` (fastStart) and ``benchboot``.
1. First start of ``bench`` (no state yet): boots, saves the state before it serves the
   command; the save's cost and what it delays the first start by.
2. Alternating, N times each: cold `vm-run bench true` (restore) and cold `vm-run benchboot
   true` (boot); medians, and the split of a restore (until the supervisor runs, until the
   VMM runs, VMM start to the restored guest's hello, hello to vm-run's exit).
3. The state on disk: the migration stream's and the disk copy's sizes (apparent and
   allocated), and what zlib level 1 would make of the stream.
4. With $VMSILO_BENCH_USER (a non-root account: virtiofsd does not serve root's shares), a
   third VM with the default shared home: cold restores whose share is hot-plugged and
   mounted before ready.
Target: the restore's median < 1.0 s.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path

from benchvm import STATE, BenchVM, bench_vm

N = 5

BOOT_VM = """
fastStart = true
[vms.benchboot]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
"""
SHARE_VM = """
[vms.benchshare]
hypervisor = "qemu"
memory = 512
cpus = 1
fastStart = true
"""
USER = os.environ.get("VMSILO_BENCH_USER")


def cold(vm: BenchVM, name: str) -> tuple[float, dict[str, float]]:
    """A cold `vm-run NAME true`: its time and the split from the state file."""
    vm.cmd("vmsilo", "stop", name)
    t0 = time.time()
    p = vm.cmd("vm-run", name, "true")
    t1 = time.time()
    if p.returncode != 0:
        raise SystemExit(p.stderr.decode())
    st = json.loads((vm.run_dir / f"{name}.state.json").read_text())
    vmm_at, ready_at = st["extra"]["vmm_started_at"], st["ready_at"]
    split = {
        "supervisor": st["started_at"] - t0,
        "vmm": vmm_at - st["started_at"],
        "guest": ready_at - vmm_at,
        "after": t1 - ready_at,
        "restored": st["extra"].get("start") == "restored",
        "restore_s": st["extra"].get("restore_s", 0.0),
        "save_s": (st["extra"].get("saved") or {}).get("save_s", 0.0),
    }
    return t1 - t0, split


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def main() -> int:
    more = BOOT_VM + (SHARE_VM if USER else "")
    with bench_vm(user=USER or "root", more=more) as vm:
        if USER:
            text = vm.config.read_text()
            vm.config.write_text(
                text.replace("runtimeDir =", f'sharedRoot = "{vm.run_dir}/shared"\nruntimeDir =')
            )
        saved = STATE / "bench" / "saved"
        shutil.rmtree(saved, ignore_errors=True)
        first, fsplit = cold(vm, "bench")
        if fsplit["restored"]:
            raise SystemExit("the first start restored: no fresh state")
        boot0, _ = cold(vm, "benchboot")
        print(
            f"first start of the fastStart VM (boot + save): {first:5.2f} s, of which saving"
            f" {fsplit['save_s']:.3f} s (a plain boot in the same minute: {boot0:5.2f} s)"
        )
        restores, boots, splits = [], [], []
        for _ in range(N):
            t, split = cold(vm, "bench")
            if not split["restored"]:
                raise SystemExit("a cold start of the fastStart VM booted instead of restoring")
            restores.append(t)
            splits.append(split)
            t, _ = cold(vm, "benchboot")
            boots.append(t)
        vm.cmd("vmsilo", "stop", "bench")
        vm.cmd("vmsilo", "stop", "benchboot")
        med_r, med_b = statistics.median(restores), statistics.median(boots)
        print(
            "cold `vm-run bench true`, restored: "
            + ", ".join(f"{t:.3f}" for t in restores)
            + f" s; median {med_r:.3f} s (target < 1.0 s)"
        )
        print(
            "cold `vm-run benchboot true`, booted: "
            + ", ".join(f"{t:.2f}" for t in boots)
            + f" s; median {med_b:.2f} s; ratio boot/restore {med_b / med_r:.1f}"
        )

        def med(key: str) -> float:
            return statistics.median(s[key] for s in splits)

        print(
            f"split of a restore (medians): until the supervisor runs {med('supervisor'):.3f}"
            f" + until the VMM runs {med('vmm'):.3f} + VMM start to the restored guest's hello"
            f" {med('guest'):.3f} (of which loading the state {med('restore_s'):.3f}) + hello to"
            f" vm-run's exit (first command) {med('after'):.3f} s"
        )
        [key] = [p for p in saved.iterdir() if p.is_dir()]
        meta = json.loads((key / "meta.json").read_text())
        state, disk = key / "state", key / "ephemeral.raw"
        packed = len(zlib.compress(state.read_bytes(), 1))
        mib = 1 << 20
        print(
            f"state on disk: migration stream {state.stat().st_size / mib:.1f} MiB (allocated"
            f" {allocated(state) / mib:.1f} MiB; zlib -1 would make it {packed / mib:.1f} MiB),"
            f" disk copy {disk.stat().st_size / mib:.0f} MiB apparent, {allocated(disk) / mib:.1f}"
            f" MiB allocated; save {meta['save_s']:.3f} s of which copying the disk"
            f" {meta['disk_copy_s']:.3f} s (guest paused throughout)"
        )
        ok = med_r < 1.0
        if USER:
            shutil.rmtree(STATE / "benchshare" / "saved", ignore_errors=True)
            cold(vm, "benchshare")  # boot, save, plug in
            shared = []
            for _ in range(N):
                t, split = cold(vm, "benchshare")
                if not split["restored"]:
                    raise SystemExit("the shared VM booted instead of restoring")
                shared.append(t)
            vm.cmd("vmsilo", "stop", "benchshare")
            print(
                "cold `vm-run benchshare true`, restored, shared home plugged in and mounted: "
                + ", ".join(f"{t:.3f}" for t in shared)
                + f" s; median {statistics.median(shared):.3f} s"
            )
        else:
            print("(set VMSILO_BENCH_USER to a non-root account to measure a VM with a share)")
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
