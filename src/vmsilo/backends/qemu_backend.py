"""The QEMU Backend: argv from :mod:`vmsilo.backends.qemu`, control over QMP.

Its argv depends on two host facts, gathered here and nowhere else: the accelerator (KVM only
when a test boot under it worked, :mod:`vmsilo.backends.accel`) and whether
``/dev/vhost-vsock`` exists (else sessions go over the ``org.vmsilo.channel`` port). QEMU is
asked to power off with QMP ``system_powerdown`` (the ACPI power button).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

from vmsilo.backends import accel, features
from vmsilo.backends.base import (
    NO_SOUND,
    Backend,
    HostFacts,
    SoundFacts,
    WindowsSidecar,
    dns_facts,
    windows_sidecar,
)
from vmsilo.backends.qemu import qemu_argv
from vmsilo.backends.vmm import Vmm
from vmsilo.contracts.ports import CHANNEL_PORT
from vmsilo.host import sound
from vmsilo.host.findings import Finding
from vmsilo.plan.model import Plan, VmPlan

VHOST_VSOCK = "/dev/vhost-vsock"


def runas_ids(plan: Plan) -> tuple[int, int] | None:
    """Whom QEMU drops to after opening its devices (SPEC §11.7): the config's user, when we
    are root (an unprivileged supervisor's QEMU is unprivileged already) and the user is not
    root itself (QEMU refuses ``-runas 0:0``; there is nothing to drop to)."""
    if os.geteuid() != 0 or plan.user.uid == 0:
        return None
    return plan.user.uid, plan.user.gid


def vsock_available() -> bool:
    """Whether QEMU can give the guest a vhost-vsock device on this host."""
    return os.path.exists(VHOST_VSOCK)


class QemuVmm(Vmm):
    name = "qemu"

    def env(self) -> dict[str, str] | None:
        """With sound, the user's PulseAudio cookie for QEMU's ``pa`` client (QEMU connects
        as root, before ``-runas``: a client of another uid is let in by the cookie alone)."""
        if not self.vm.sound.playback:
            return None
        return {**os.environ, "PULSE_COOKIE": sound.pulse_cookie(self.plan.user)}

    async def request_poweroff(self) -> None:
        """QMP ``system_powerdown``: the ACPI power button, handled by the guest init."""
        import asyncio

        reader, writer = await asyncio.open_unix_connection(self.vm.paths.qmp)
        try:
            await reader.readline()  # greeting
            for command in ("qmp_capabilities", "system_powerdown"):
                writer.write(json.dumps({"execute": command}).encode() + b"\n")
                await writer.drain()
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    reply = json.loads(line)
                    if "return" in reply or "error" in reply:
                        break
        finally:
            writer.close()


class QemuBackend(Backend):
    name = "qemu"
    features = features.QEMU
    package = "qemu-system-x86"
    install_hint = "apt-get install qemu-system-x86"
    needs_kvm = False
    needs_vsock = False
    without_kvm = "QEMU falls back to TCG (slow)"
    without_vsock = (
        f"missing: QEMU VMs multiplex sessions over the {CHANNEL_PORT} virtio-serial port"
    )

    def binary(self, plan: Plan) -> str:
        return plan.qemu.binary

    def host_facts(self, plan: Plan, vm: VmPlan, *, probe: bool) -> HostFacts:
        verdict = accel.resolve_accel(plan, vm) if probe else accel.cached_accel(plan, vm)
        return HostFacts(
            accel=verdict,
            vsock=vsock_available(),
            nameservers=dns_facts(vm),
            runas=runas_ids(plan),
            sound=self.sound_facts(plan, vm),
        )

    def windows(self, plan: Plan, vm: VmPlan) -> WindowsSidecar | None:
        """waypipe over the channel (SPEC §9.1), started at the VM's first window."""
        return windows_sidecar(plan, vm, waypipe=True)

    def sound_facts(self, plan: Plan, vm: VmPlan) -> SoundFacts:
        """The HDA card is always there; it plays into the user's audio server when QEMU's
        PulseAudio module is installed and the server's socket exists, else into nothing."""
        if not vm.sound.playback:
            return NO_SOUND
        if sound.qemu_pa_module() is None:
            return SoundFacts(True, False, f"QEMU has no PulseAudio module ({sound.QEMU_PA_HINT})")
        socket = sound.pulse_socket(plan.user)
        if not sound.is_socket(socket):
            return SoundFacts(True, False, f"no audio server at {socket}")
        return SoundFacts()

    def doctor_sound(self, plan: Plan, vms: Sequence[VmPlan]) -> Iterator[Finding]:
        names = ", ".join(vm.name for vm in vms)
        module = sound.qemu_pa_module()
        if module is None:
            yield Finding(
                "QEMU PulseAudio module",
                "warn",
                f"not installed: sound is unavailable (silent) in {names}",
                sound.QEMU_PA_HINT,
            )
        else:
            yield Finding("QEMU PulseAudio module", "ok", module)
        socket = sound.pulse_socket(plan.user)
        if sound.is_socket(socket):
            yield Finding("audio server", "ok", f"{socket} (sound for {names})")
        else:
            yield Finding(
                "audio server",
                "warn",
                f"no PulseAudio/PipeWire-pulse socket at {socket}: {names} start with silent sound",
                f"log in as {plan.user.name} to a desktop session with PulseAudio or"
                " PipeWire-pulse",
            )

    def probe_step(self, plan: Plan, vm: VmPlan) -> str | None:
        if accel.needs_probe(plan, vm):
            return "probing KVM (a test boot, once per kernel and QEMU build)"
        return None

    def argv(self, plan: Plan, vm: VmPlan, facts: HostFacts) -> list[str]:
        return qemu_argv(
            plan,
            vm,
            facts.accel,
            vsock=facts.vsock,
            extra_params=facts.kernel_params,
            runas=facts.runas,
            audio_server=facts.sound.server,
        )

    def vmm(self, plan: Plan, vm: VmPlan, argv: list[str]) -> Vmm:
        return QemuVmm(plan, vm, argv)

    def doctor_kvm(self, plan: Plan, vms: Sequence[VmPlan]) -> Iterator[Finding] | None:
        """With ``qemu.accel = auto``, whether a test guest boots under KVM here."""
        if not vms or plan.qemu.accel != "auto":
            return None
        return self._probe(plan, vms[0])

    def _probe(self, plan: Plan, vm: VmPlan) -> Iterator[Finding]:
        if not os.path.exists(vm.kernel):
            yield Finding(
                "kvm boot",
                "warn",
                "not probed: no guest kernel built yet",
                f"vmsilo image build {vm.image}",
            )
            return
        if accel.resolve_accel(plan, vm) == "kvm":
            yield Finding("kvm boot", "ok", "a test guest booted under KVM")
        else:
            yield Finding(
                "kvm boot",
                "warn",
                "/dev/kvm exists but a test guest did not boot under it (nested or broken"
                " KVM); QEMU VMs use TCG",
                "on a nested host, enable nested virtualisation on the outer hypervisor",
            )


QEMU = QemuBackend()
