"""IOMMU group check before PCI passthrough (SPEC §4 "Before launch").

A device can only be given to a VM safely if every other device in its IOMMU group is given to
the same VM, unbound, bound to vfio-pci, or a PCI bridge (class 0x0604xx). The error names the
device, the offending peer, its driver and the group, because "IOMMU group not viable" alone
tells a user nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from vmsilo.errors import VmsiloError


def check_iommu_groups(bdfs: Iterable[str], sysfs: Path = Path("/sys")) -> None:
    """Raise :class:`VmsiloError` for the first device whose group is not viable."""
    ours = set(bdfs)
    for bdf in sorted(ours):
        dev = sysfs / "bus" / "pci" / "devices" / bdf
        group_devices = dev / "iommu_group" / "devices"
        if not group_devices.is_dir():
            raise VmsiloError(
                f"PCI device {bdf}: no IOMMU group (IOMMU off, or no such device)",
                "enable the IOMMU (intel_iommu=on or amd_iommu=on) and check the address",
            )
        group = os.path.basename(os.path.realpath(dev / "iommu_group"))
        for peer_path in sorted(group_devices.iterdir()):
            peer = peer_path.name
            if peer == bdf or peer in ours:
                continue
            driver_link = sysfs / "bus" / "pci" / "devices" / peer / "driver"
            if not driver_link.exists():
                continue  # unbound
            driver = os.path.basename(os.path.realpath(driver_link))
            if driver == "vfio-pci":
                continue
            cls = _read(sysfs / "bus" / "pci" / "devices" / peer / "class")
            if cls.startswith("0x0604"):
                continue  # PCI-to-PCI bridge
            raise VmsiloError(
                f"PCI device {bdf} shares IOMMU group {group} with {peer} (bound to {driver})",
                f"pass {peer} to the same VM, unbind it, or bind it to vfio-pci",
            )


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
