"""Choosing QEMU's accelerator: KVM only if a real test boot under KVM works (SPEC §4).

``/dev/kvm`` existing is not enough: under nested virtualisation it may open fine and then fail
or hang on a real kernel. So ``qemu.accel = "auto"`` boots the VM's own kernel once under KVM
with no root file system and a short timeout; the kernel reaching its "no root" panic proves KVM
runs guest code. The verdict is cached in the state dir (it survives reboots), keyed on the
host kernel, the QEMU build and the guest kernel, so the probe is paid once per such
combination — by ``vmsilo doctor`` or ``vmsilo install`` ahead of time, else by the first start.
A working KVM reaches the panic in well under a second; the probe gives up after
:data:`PROBE_TIMEOUT`, so a broken nested KVM costs a first start at most that long.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from vmsilo.backends.features import Accel
from vmsilo.contracts.fs import atomic_write
from vmsilo.plan.model import Plan, VmPlan

__all__ = ["CACHE_NAME", "Accel", "cached_accel", "needs_probe", "probe_kvm", "resolve_accel"]
PROBE_TIMEOUT = 5.0
CACHE_NAME = "qemu-accel.json"


def _cache_key(binary: str, kernel: str) -> str:
    def stamp(path: str | None) -> str:
        if path is None:
            return "-"
        try:
            st = os.stat(path)
        except OSError:
            return f"{path}:missing"
        return f"{os.path.realpath(path)}:{st.st_size}:{int(st.st_mtime)}"

    host = os.uname()
    return f"{host.release} {host.version}|{stamp(shutil.which(binary))}|{stamp(kernel)}"


def probe_kvm(binary: str, kernel: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot ``kernel`` under KVM until its no-root panic; True if that happened in time."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [
        binary,
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        kernel,
        "-append",
        "console=ttyS0 panic=-1 root=/dev/nonexistent",
    ]
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return b"Kernel panic" in proc.stdout or b"VFS: Unable to mount root" in proc.stdout


def _cached_verdict(plan: Plan, vm: VmPlan) -> Accel | None:
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads((Path(plan.state_dir) / CACHE_NAME).read_text())
        verdict = cached.get(_cache_key(plan.qemu.binary, vm.kernel))
        if verdict in ("kvm", "tcg"):
            return "kvm" if verdict == "kvm" else "tcg"
    return None


def needs_probe(plan: Plan, vm: VmPlan) -> bool:
    """Whether :func:`resolve_accel` will run the test boot (no cached verdict yet)."""
    return (
        plan.qemu.accel == "auto"
        and os.access("/dev/kvm", os.R_OK | os.W_OK)
        and _cached_verdict(plan, vm) is None
    )


def resolve_accel(plan: Plan, vm: VmPlan) -> Accel:
    """The accelerator to use for ``vm`` (probing and caching when ``auto``)."""
    if plan.qemu.accel != "auto":
        return plan.qemu.accel
    if not os.path.exists("/dev/kvm"):
        return "tcg"
    cache = Path(plan.state_dir) / CACHE_NAME
    key = _cache_key(plan.qemu.binary, vm.kernel)
    known = _cached_verdict(plan, vm)
    if known is not None:
        return known
    verdict: Accel = "kvm" if probe_kvm(plan.qemu.binary, vm.kernel) else "tcg"
    with contextlib.suppress(OSError, ValueError):
        data = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(cache.read_text())
        data[key] = verdict
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps(data))
    return verdict


def cached_accel(plan: Plan, vm: VmPlan) -> Accel:
    """The accelerator ``vmsilo argv`` shows: the cached verdict, without probing."""
    if plan.qemu.accel != "auto":
        return plan.qemu.accel
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads((Path(plan.state_dir) / CACHE_NAME).read_text())
        if cached.get(_cache_key(plan.qemu.binary, vm.kernel)) == "kvm":
            return "kvm"
    return "tcg"
