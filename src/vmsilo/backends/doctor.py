"""The doctor's VMM checks (``/dev/kvm``, vhost-vsock, the VMM binaries), read off the
Backend objects of the VMs in use, so the host layer never names a hypervisor."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator

from vmsilo.backends.base import WAYPIPE, Backend
from vmsilo.backends.registry import BACKENDS, backend_for
from vmsilo.host.doctor import VmmChecks, device_access
from vmsilo.host.findings import Finding, Level
from vmsilo.plan.model import Plan, VmPlan


def _in_use(plan: Plan) -> dict[Backend, list[VmPlan]]:
    """The backends with at least one VM, in registry order, with their VMs."""
    used: dict[Backend, list[VmPlan]] = {}
    for backend in BACKENDS.values():
        vms = [vm for vm in plan.vms.values() if backend_for(vm) is backend]
        if vms:
            used[backend] = vms
    return used


def check_kvm(plan: Plan) -> Iterator[Finding]:
    exists, usable = device_access("/dev/kvm")
    used = _in_use(plan)
    if not exists or not usable:
        what = "missing" if not exists else "not accessible to this user"
        needing = [b for b in used if b.needs_kvm]
        # with no backend that needs it, say what the ones that can do without it do
        said = needing or [b for b in BACKENDS.values() if not b.needs_kvm]
        level: Level = "fail" if needing else "warn"
        yield Finding(
            "/dev/kvm",
            level,
            f"/dev/kvm is {what}; {said[0].without_kvm}",
            "enable virtualisation in the firmware and load kvm_intel or kvm_amd",
        )
        return
    for backend, vms in used.items():
        more = backend.doctor_kvm(plan, vms)
        if more is not None:
            yield from more
            return
    yield Finding("/dev/kvm", "ok", "present and accessible")


def check_vsock(plan: Plan) -> Iterator[Finding]:
    exists, usable = device_access("/dev/vhost-vsock")
    needing = [b for b in _in_use(plan) if b.needs_vsock]
    if exists and usable:
        yield Finding("/dev/vhost-vsock", "ok", "present: sessions use one vsock connection each")
    elif needing:
        yield Finding("/dev/vhost-vsock", "fail", needing[0].without_vsock, "modprobe vhost_vsock")
    else:
        optional = [b for b in BACKENDS.values() if not b.needs_vsock]
        yield Finding("/dev/vhost-vsock", "ok", optional[0].without_vsock)


def check_binaries(plan: Plan) -> Iterator[Finding]:
    for backend in _in_use(plan):
        binary = backend.binary(plan)
        found = shutil.which(binary)
        if found:
            yield Finding(binary, "ok", found)
        else:
            yield Finding(binary, "fail", "not found", backend.install_hint)


def check_sound(plan: Plan) -> Iterator[Finding]:
    """Per backend, whether its VMs with sound will be heard (SPEC §9.2); a VM never fails
    over sound unless its config asked for it and the crosvm sound daemon is missing."""
    for backend, vms in _in_use(plan).items():
        with_sound = [vm for vm in vms if vm.sound.playback]
        if with_sound:
            yield from backend.doctor_sound(plan, with_sound)


#: What ``vmsilo doctor`` passes to :func:`vmsilo.host.doctor.diagnose`.
def check_windows(plan: Plan) -> Iterator[Finding]:
    """Whether the VMs with Wayland will show windows (SPEC §9.1): the compositor's socket and,
    for the QEMU path, waypipe. Neither is worth a VM: without them it starts, and a window
    program in it fails with the reason."""
    sidecars = [s for vm in plan.vms.values() if (s := backend_for(vm).windows(plan, vm))]
    by_socket: dict[str, list[str]] = {}
    for s in sidecars:
        by_socket.setdefault(s.compositor, []).append(s.vm)
    for path, names in by_socket.items():
        vms = ", ".join(names)
        if is_socket(path):
            yield Finding("Wayland compositor", "ok", f"{path} (windows of {vms})")
        else:
            yield Finding(
                "Wayland compositor",
                "warn",
                f"no socket at {path}: window programs in {vms} fail until it exists",
                f"log in as {plan.user.name} to a Wayland desktop, or set gpu.waylandSocket",
            )
    piped = [s.vm for s in sidecars if s.waypipe_socket is not None]
    if piped:
        found = shutil.which(WAYPIPE)
        if found:
            yield Finding("waypipe", "ok", f"{found} (windows of {', '.join(piped)})")
        else:
            yield Finding(
                "waypipe",
                "warn",
                f"not installed: {', '.join(piped)} cannot show windows",
                "apt-get install waypipe",
            )


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


VMM_CHECKS = VmmChecks(
    devices=(check_kvm, check_vsock), programs=(check_binaries, check_sound, check_windows)
)
