"""``vmsilo doctor``: what this host can and cannot do for the configured VMs, with fixes.

Each check is a small function returning a :class:`Finding` (ok / warn / fail, what was found,
and a hint). Checks run only where the config needs them (KVM and vsock for the VMMs in use,
``/dev/net/tun`` for VMs with interfaces, virtiofsd for shares, the IOMMU for passthrough), so
a clean report means the configured fleet can start here — users' most common complaints are
exactly these host problems surfacing as an obscure VMM error at start time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmsilo.errors import VmsiloError
from vmsilo.plan.model import Plan

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    detail: str
    hint: str = ""


def _device(path: str) -> tuple[bool, bool]:
    return os.path.exists(path), os.access(path, os.R_OK | os.W_OK)


def check_kvm(plan: Plan) -> Iterator[Finding]:
    exists, usable = _device("/dev/kvm")
    crosvm = [vm for vm in plan.vms.values() if vm.hypervisor == "crosvm"]
    qemu = [vm for vm in plan.vms.values() if vm.hypervisor == "qemu"]
    if not exists or not usable:
        what = "missing" if not exists else "not accessible to this user"
        level: Level = "fail" if crosvm else "warn"
        yield Finding(
            "/dev/kvm",
            level,
            f"/dev/kvm is {what}"
            + ("; crosvm VMs cannot start" if crosvm else "; QEMU falls back to TCG (slow)"),
            "enable virtualisation in the firmware and load kvm_intel or kvm_amd",
        )
        return
    if qemu and plan.qemu.accel == "auto":
        from vmsilo.backends.accel import resolve_accel

        vm = qemu[0]
        if not os.path.exists(vm.kernel):
            yield Finding(
                "kvm boot",
                "warn",
                "not probed: no guest kernel built yet",
                f"vmsilo image build {vm.image}",
            )
            return
        verdict = resolve_accel(plan, vm)
        if verdict == "kvm":
            yield Finding("kvm boot", "ok", "a test guest booted under KVM")
        else:
            yield Finding(
                "kvm boot",
                "warn",
                "/dev/kvm exists but a test guest did not boot under it (nested or broken"
                " KVM); QEMU VMs use TCG",
                "on a nested host, enable nested virtualisation on the outer hypervisor",
            )
    else:
        yield Finding("/dev/kvm", "ok", "present and accessible")


def check_vsock(plan: Plan) -> Iterator[Finding]:
    exists, usable = _device("/dev/vhost-vsock")
    crosvm = any(vm.hypervisor == "crosvm" for vm in plan.vms.values())
    if exists and usable:
        yield Finding("/dev/vhost-vsock", "ok", "present: sessions use one vsock connection each")
    elif crosvm:
        yield Finding(
            "/dev/vhost-vsock", "fail", "missing; crosvm VMs need vsock", "modprobe vhost_vsock"
        )
    else:
        yield Finding(
            "/dev/vhost-vsock",
            "ok",
            "missing: QEMU VMs multiplex sessions over the org.vmsilo.channel virtio-serial port",
        )


def check_tun(plan: Plan) -> Iterator[Finding]:
    users = [vm.name for vm in plan.vms.values() if vm.interfaces]
    if not users:
        return
    exists, usable = _device("/dev/net/tun")
    if exists and usable:
        yield Finding("/dev/net/tun", "ok", f"present (needed by {', '.join(users)})")
    else:
        yield Finding(
            "/dev/net/tun", "fail", f"missing; needed by {', '.join(users)}", "modprobe tun"
        )


def check_binaries(plan: Plan) -> Iterator[Finding]:
    kinds = {vm.hypervisor for vm in plan.vms.values()}
    wanted = []
    if "qemu" in kinds:
        wanted.append((plan.qemu.binary, "apt-get install qemu-system-x86"))
    if "crosvm" in kinds:
        wanted.append((plan.crosvm.binary, "install crosvm, or set crosvm.binary"))
    for binary, hint in wanted:
        found = shutil.which(binary)
        if found:
            yield Finding(binary, "ok", found)
        else:
            yield Finding(binary, "fail", "not found", hint)


def check_virtiofsd(plan: Plan) -> Iterator[Finding]:
    users = [vm.name for vm in plan.vms.values() if vm.shares]
    if not users:
        return
    from vmsilo.host.virtiofsd import locate

    try:
        binary = locate()
    except VmsiloError as e:
        yield Finding("virtiofsd", "fail", e.message, e.hint or "")
        return
    yield Finding("virtiofsd", "ok", f"{binary.path} ({binary.flavor} flavor)")


def check_image_tools(plan: Plan) -> Iterator[Finding]:
    missing = [
        t for t in ("mmdebstrap", "mkfs.erofs", "apt-get", "depmod", "cpio") if not shutil.which(t)
    ]
    if not os.path.exists("/bin/busybox"):
        missing.append("busybox (static)")
    if missing:
        yield Finding(
            "image tools",
            "warn",
            "missing: " + ", ".join(missing) + " (needed only to build images)",
            "apt-get install mmdebstrap erofs-utils busybox-static cpio kmod",
        )
    else:
        yield Finding("image tools", "ok", "mmdebstrap, mkfs.erofs, busybox, depmod present")


def check_images(plan: Plan) -> Iterator[Finding]:
    for name in sorted({vm.image for vm in plan.vms.values()}):
        users = [vm for vm in plan.vms.values() if vm.image == name]
        needed = [p for vm in users for p in (vm.kernel, vm.initramfs)]
        needed += [d.path for vm in users for d in vm.disks if d.role == "root"]
        missing = sorted({p for p in needed if not os.path.exists(p)})
        if missing:
            yield Finding(
                f"image {name}",
                "fail",
                "missing " + ", ".join(missing),
                f"vmsilo image build {name}",
            )
        else:
            target = os.path.realpath(plan.images[name].current)
            yield Finding(f"image {name}", "ok", f"built ({os.path.basename(target)})")


def check_iommu(plan: Plan) -> Iterator[Finding]:
    users = [vm.name for vm in plan.vms.values() if vm.pci_devices]
    if not users and not plan.isolated_pci_devices:
        return
    groups = Path("/sys/kernel/iommu_groups")
    if groups.is_dir() and any(groups.iterdir()):
        yield Finding("IOMMU", "ok", f"enabled ({len(list(groups.iterdir()))} groups)")
    else:
        yield Finding(
            "IOMMU",
            "fail",
            f"no IOMMU groups; PCI passthrough for {', '.join(users) or 'isolatedPciDevices'}"
            " cannot work",
            "boot with intel_iommu=on or amd_iommu=on and enable VT-d/AMD-Vi",
        )


def check_dirs(plan: Plan) -> Iterator[Finding]:
    for label, path in (("runtimeDir", plan.runtime_dir), ("stateDir", plan.state_dir)):
        p = Path(path)
        probe = p if p.exists() else next((a for a in p.parents if a.exists()), Path("/"))
        if os.access(probe, os.W_OK):
            yield Finding(label, "ok", f"{path} writable")
        else:
            yield Finding(
                label,
                "warn",
                f"{path} not writable by this user",
                "start VMs as root, or through the systemd units (vmsilo install)",
            )


def check_systemd(plan: Plan, config: str) -> Iterator[Finding]:
    if not os.path.isdir("/run/systemd/system"):
        yield Finding("systemd", "ok", "not PID 1: VMs run under the embedded supervisor")
        return
    from vmsilo.host.systemd import installed_units

    units = installed_units(config)
    missing = [vm.name for vm in plan.vms.values() if vm.service_unit not in units]
    if missing:
        yield Finding(
            "systemd units", "warn", "not installed for " + ", ".join(missing), "vmsilo install"
        )
    else:
        yield Finding("systemd units", "ok", "installed for every VM")


CHECKS: tuple[Callable[[Plan], Iterator[Finding]], ...] = (
    check_kvm,
    check_vsock,
    check_tun,
    check_binaries,
    check_virtiofsd,
    check_image_tools,
    check_images,
    check_iommu,
    check_dirs,
)


def diagnose(plan: Plan, config: str) -> list[Finding]:
    findings: list[Finding] = []
    for check in CHECKS:
        findings += check(plan)
    findings += check_systemd(plan, config)
    return findings
