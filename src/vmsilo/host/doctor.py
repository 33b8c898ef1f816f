"""``vmsilo doctor``: what this host can and cannot do for the configured VMs, with fixes.

Each check is a small function returning a :class:`Finding` (ok / warn / fail, what was found,
and a hint). Checks run only where the config needs them (KVM and vsock for the VMMs in use,
``/dev/net/tun`` for VMs with interfaces, virtiofsd for shares, the IOMMU for passthrough), so
a clean report means the configured fleet can start here — users' most common complaints are
exactly these host problems surfacing as an obscure VMM error at start time. The checks that
depend on the VMM (KVM, vsock, the VMM binaries) belong to the backends and are passed in.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from vmsilo.errors import VmsiloError
from vmsilo.host.findings import Finding, Level
from vmsilo.plan.model import Plan

__all__ = ["Finding", "Level", "VmmChecks", "device_access", "diagnose"]


def device_access(path: str) -> tuple[bool, bool]:
    return os.path.exists(path), os.access(path, os.R_OK | os.W_OK)


def check_tun(plan: Plan) -> Iterator[Finding]:
    users = [vm.name for vm in plan.vms.values() if vm.interfaces]
    if not users:
        return
    exists, usable = device_access("/dev/net/tun")
    if exists and usable:
        yield Finding("/dev/net/tun", "ok", f"present (needed by {', '.join(users)})")
    else:
        yield Finding(
            "/dev/net/tun", "fail", f"missing; needed by {', '.join(users)}", "modprobe tun"
        )


def check_nft(plan: Plan) -> Iterator[Finding]:
    """nftables: the NAT of host-NAT VMs and the input filter of every netvm link."""
    users = [vm.name for vm in plan.vms.values() if any(i.injected_for for i in vm.interfaces)]
    if not users:
        return
    from vmsilo.host.nat import nft_binary

    try:
        found = nft_binary()
    except VmsiloError as e:
        yield Finding("nft", "fail", f"{e.message}; needed by {', '.join(users)}", e.hint or "")
        return
    yield Finding("nft", "ok", f"{found} (needed by {', '.join(users)})")


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
    from vmsilo.host.dirsafety import unsafe_dir

    for label, path in (("runtimeDir", plan.runtime_dir), ("stateDir", plan.state_dir)):
        why = unsafe_dir(path)
        if why is not None:
            yield Finding(
                label,
                "fail",
                f"{path} is not safe for vmsilo's root-only files: {why}",
                "use a directory only root can write to (the defaults /run/vmsilo and"
                " /var/lib/vmsilo are)",
            )
            continue
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


def check_shares(plan: Plan) -> Iterator[Finding]:
    """Share directories that do not exist: the VM would fail to start."""
    from vmsilo.host.preflight import missing_share_dirs, share_setting

    shared = [vm for vm in plan.vms.values() if vm.shares]
    missing = [(vm, s) for vm in shared for s in missing_share_dirs(vm)]
    for vm, share in missing:
        yield Finding(
            f"share {vm.name}/{share.tag}",
            "fail",
            f"{share.host_path} does not exist: VM {vm.name} cannot start",
            f"create it, or fix vms.{vm.name}.{share_setting(share)}",
        )
    if shared and not missing:
        yield Finding("shares", "ok", "every shared directory exists")


def check_dns(plan: Plan) -> Iterator[Finding]:
    """VMs behind the host's NAT get the host's resolvers unless they name their own: say
    when the host has none a VM can reach (a loopback-only stub)."""
    from vmsilo.host.resolvers import host_nameservers

    natted = [vm.name for vm in plan.vms.values() if vm.netvm == "host" and not vm.nameservers]
    if not natted:
        return
    servers = host_nameservers()
    if servers:
        yield Finding("DNS", "ok", f"{', '.join(natted)} use the host's {', '.join(servers)}")
    else:
        yield Finding(
            "DNS",
            "warn",
            f"the host's resolvers are loopback only: {', '.join(natted)} get no DNS",
            "set network.nameservers for them (e.g. your router, or a public resolver)",
        )


def check_systemd(plan: Plan, config: str) -> Iterator[Finding]:
    if not os.path.isdir("/run/systemd/system"):
        yield Finding("systemd", "ok", "not PID 1: VMs run under the embedded supervisor")
        return
    from vmsilo.host.systemd import installed_units

    units = installed_units(config, state_dir=plan.state_dir)
    missing = [vm.name for vm in plan.vms.values() if vm.service_unit not in units]
    if missing:
        yield Finding(
            "systemd units", "warn", "not installed for " + ", ".join(missing), "vmsilo install"
        )
    else:
        yield Finding("systemd units", "ok", "installed for every VM")


Check = Callable[[Plan], Iterator[Finding]]


class VmmChecks(NamedTuple):
    """The VMM-specific checks, given by the backends (:mod:`vmsilo.backends.doctor`):
    ``devices`` run first (KVM, vsock), ``programs`` after ``/dev/net/tun``."""

    devices: Sequence[Check] = ()
    programs: Sequence[Check] = ()


def checks(vmm: VmmChecks) -> tuple[Check, ...]:
    """Every check, in the order the report lists them."""
    return (
        *vmm.devices,
        check_tun,
        check_nft,
        *vmm.programs,
        check_virtiofsd,
        check_image_tools,
        check_images,
        check_iommu,
        check_dirs,
        check_shares,
        check_dns,
    )


NO_VMM_CHECKS = VmmChecks()


def diagnose(plan: Plan, config: str, vmm: VmmChecks = NO_VMM_CHECKS) -> list[Finding]:
    findings: list[Finding] = []
    for check in checks(vmm):
        findings += check(plan)
    findings += check_systemd(plan, config)
    return findings
