"""Checks made before a VM is launched, each failing with a hint that fixes it.

Which VMM binary to look for is the caller's to say (:class:`VmmProgram`, filled in by the
VM's backend, :meth:`vmsilo.backends.base.Backend.preflight`): the host layer knows no
hypervisor by name.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vmsilo.errors import ImageMissingError, VmsiloError
from vmsilo.host.iommu import check_iommu_groups
from vmsilo.plan.model import Plan, SharePlan, VmPlan


@dataclass(frozen=True)
class VmmProgram:
    """The VMM a VM needs: its program as configured, its package, its config section."""

    binary: str
    package: str
    section: str


def check_image(plan: Plan, vm: VmPlan) -> None:
    missing = [p for p in (vm.kernel, vm.initramfs) if not os.path.exists(p)]
    missing += [d.path for d in vm.disks if d.role == "root" and not os.path.exists(d.path)]
    if missing:
        uses_image = any(p.startswith(plan.images[vm.image].directory) for p in missing)
        hint = (
            f"vmsilo image build {vm.image}"
            if uses_image
            else "check the kernel/initramfs/rootDisk paths in the config"
        )
        raise ImageMissingError(f"VM {vm.name}: missing {', '.join(missing)}", hint)


def check_binary(vm: VmPlan, vmm: VmmProgram) -> str:
    found = shutil.which(vmm.binary)
    if found is None:
        raise VmsiloError(
            f"VM {vm.name}: VMM binary {vmm.binary!r} not found",
            f"install {vmm.package}, or set {vmm.section}.binary in the config",
        )
    return found


def check_tun(vm: VmPlan) -> None:
    if vm.interfaces and not os.path.exists("/dev/net/tun"):
        raise VmsiloError(
            f"VM {vm.name} has network interfaces but /dev/net/tun is missing",
            "modprobe tun",
        )


def available_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def check_memory(vm: VmPlan) -> None:
    avail = available_memory_mib()
    if avail is not None and avail < vm.memory:
        raise VmsiloError(
            f"VM {vm.name} needs {vm.memory} MiB but only {avail} MiB are available",
            "stop other VMs or lower its memory",
        )


def preflight(plan: Plan, vm: VmPlan, vmm: VmmProgram) -> str:
    """Run every check; return the resolved VMM binary path."""
    check_image(plan, vm)
    binary = check_binary(vm, vmm)
    check_tun(vm)
    check_memory(vm)
    bdfs = [d.bdf for d in vm.pci_devices if d.bdf is not None]
    if bdfs:
        check_iommu_groups(bdfs)
    return binary


def share_setting(share: SharePlan) -> str:
    """The config key that names a share's host directory (for hints)."""
    return "sharedHome" if share.tag == "home" else f"sharedDirectories.{share.tag}.path"


def missing_share_dirs(vm: VmPlan) -> list[SharePlan]:
    """Shares whose host directory does not exist yet; the shared home is left out, since the
    supervisor creates it (owned by ``user``) on the first start."""
    return [s for s in vm.shares if s.tag != "home" and not Path(s.host_path).is_dir()]
