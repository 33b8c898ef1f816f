"""The crosvm Backend: argv from :mod:`vmsilo.backends.crosvm`, control through its socket.

crosvm is asked to power off with ``crosvm powerbtn <control socket>`` and tells why it ended
in its exit code (SPEC §4 "Stop": 32 reset → boot again with a fresh ephemeral disk, 33
crash, 34 guest panic, 36 watchdog). fastStart (SPEC §10) saves with ``crosvm suspend --full``
+ ``snapshot take`` + ``resume --full`` on the same socket and restores with ``run --restore``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vmsilo.backends import features
from vmsilo.backends.base import (
    NO_SOUND,
    Backend,
    HostFacts,
    SoundFacts,
    SoundSidecar,
    WindowsSidecar,
    windows_sidecar,
)
from vmsilo.backends.crosvm import control_argv, crosvm_argv
from vmsilo.backends.vmm import Vmm, VmmExit, resumed_after
from vmsilo.errors import VmsiloError
from vmsilo.host import sound
from vmsilo.host.findings import Finding
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.runcmd import describe_status, run

CROSVM_EXITS = {
    0: "stopped",
    32: "reset",
    33: "crash",
    34: "guest panic",
    35: "invalid arguments",
    36: "watchdog reset",
}


class CrosvmVmm(Vmm):
    name = "crosvm"

    def classify(self, code: int) -> VmmExit:
        if code == 0:
            # the guest powered off, or someone ran `crosvm stop` on the control socket
            return VmmExit(0, "guest powered off (or crosvm stop)", clean=True)
        if code in CROSVM_EXITS:
            return VmmExit(code, f"crosvm: {CROSVM_EXITS[code]}", clean=False, restart=code == 32)
        return VmmExit(code, f"crosvm {describe_status(code)}", clean=False)

    async def control(self, command: str) -> int:
        import asyncio

        proc = await asyncio.create_subprocess_exec(
            *control_argv(self.plan, self.vm, command),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()

    async def request_poweroff(self) -> None:
        await self.control("powerbtn")

    # ------------------------------------------------------------------ saved states (§10)

    def _control_now(self, timeout: float, *words: str) -> None:
        """One control command, blocking (the supervisor calls these from a worker thread);
        a VmsiloError naming the command and crosvm's stderr on failure."""
        run(control_argv(self.plan, self.vm, *words), timeout=timeout)

    def save_state(self, target: Path, while_stopped: Callable[[], None], timeout: float) -> None:
        """Snapshot the running guest into ``target`` (crosvm writes it), then let it go on.

        ``crosvm suspend --full`` first: the vCPUs stop and every device sleeps (the block
        device's requests are finished), so nothing changes the RAM or the disks while the
        snapshot is written and ``while_stopped`` runs (the caller copies the disposable
        disk, consistent with the RAM); then ``crosvm snapshot take`` (it leaves a suspended
        VM suspended) and ``crosvm resume --full`` whatever happened."""
        with resumed_after(lambda: self._control_now(timeout, "resume", "--full"), (VmsiloError,)):
            self._control_now(timeout, "suspend", "--full")
            self._control_now(timeout, "snapshot", "take", str(target))
            while_stopped()

    def restore_state(self, state: Path, timeout: float) -> None:
        """Nothing to load: crosvm read the snapshot as it started (``run --restore``, see
        :attr:`~vmsilo.backends.base.HostFacts.restore_from`) and runs the guest; the
        restored agent's hello (answering the supervisor's restore line) says it is up, and
        a crosvm that could not restore exits (the supervisor then boots instead)."""


class CrosvmBackend(Backend):
    name = "crosvm"
    features = features.CROSVM
    package = "crosvm"
    install_hint = "install crosvm, or set crosvm.binary"
    needs_kvm = True
    needs_vsock = True
    without_kvm = "crosvm VMs cannot start"
    without_vsock = "missing; crosvm VMs need vsock"
    #: ``crosvm snapshot take`` / ``run --restore`` (in upstream's grammar; vmsilo passes
    #: neither a share nor a sound device to a fastStart VM, see the feature table)
    saves_state = True

    def binary(self, plan: Plan) -> str:
        return plan.crosvm.binary

    def argv(self, plan: Plan, vm: VmPlan, facts: HostFacts) -> list[str]:
        return crosvm_argv(
            plan,
            vm,
            extra_params=facts.kernel_params,
            sound=facts.sound.device,
            restore=facts.restore_from,
        )

    def sound_facts(self, plan: Plan, vm: VmPlan) -> SoundFacts:
        """vmsilo flavor: crosvm's own PulseAudio backend, which needs the user's server.
        Upstream: the ``crosvm.soundDevice`` daemon serves the device; without the daemon
        there is no device, without a PipeWire server it plays into its null backend."""
        if not vm.sound.playback:
            return NO_SOUND
        if plan.crosvm.flavor == "vmsilo":
            # the patched crosvm's own PulseAudio client: the device is always there (as the
            # original module gave it); whether it is heard depends on the user's server
            socket = sound.pulse_socket(plan.user)
            if sound.is_socket(socket):
                return SoundFacts()
            return SoundFacts(True, False, f"no audio server at {socket}")
        binary = plan.crosvm.sound_device
        if sound.find_program(binary) is None:
            return SoundFacts(
                False, False, f"{binary} (crosvm.soundDevice) not found: started without sound"
            )
        socket = sound.pipewire_socket(plan.user)
        if not sound.is_socket(socket):
            return SoundFacts(True, False, f"no PipeWire server at {socket}: the sound is silent")
        return SoundFacts()

    def windows(self, plan: Plan, vm: VmPlan) -> WindowsSidecar | None:
        """Upstream: the filter, which ``--wayland-sock`` names, up before the VMM. The vmsilo
        flavor registers its security context at the compositor itself: no filter there."""
        if plan.crosvm.flavor != "upstream":
            return None
        return windows_sidecar(plan, vm, waypipe=False)

    def sound_sidecar(self, plan: Plan, vm: VmPlan, facts: HostFacts) -> SoundSidecar | None:
        if plan.crosvm.flavor != "upstream" or not facts.sound.device:
            return None
        found = sound.find_program(plan.crosvm.sound_device)
        if found is None:  # gone since the facts were read: the VMM will fail to connect
            found = plan.crosvm.sound_device
        user = plan.user
        return SoundSidecar(
            binary=found,
            backend="pipewire" if facts.sound.server else "null",
            socket=vm.paths.sound_socket,
            uid=user.uid,
            gid=user.gid,
            env=(("XDG_RUNTIME_DIR", user.runtime_dir), ("PIPEWIRE_RUNTIME_DIR", user.runtime_dir)),
        )

    def preflight(self, plan: Plan, vm: VmPlan) -> str:
        """SPEC §9.2: a VM whose config asked for sound by name does not start without the
        sound daemon; one that only inherited crosvm's default starts without the device."""
        found = super().preflight(plan, vm)
        if (
            vm.sound.playback
            and vm.sound.explicit
            and plan.crosvm.flavor == "upstream"
            and sound.find_program(plan.crosvm.sound_device) is None
        ):
            keys = "sound.playback = false"
            if vm.sound.capture:
                keys += " and sound.capture = false"
            raise VmsiloError(
                f"VM {vm.name}: sound is asked for in the config but the sound daemon"
                f" {plan.crosvm.sound_device} (crosvm.soundDevice) is not found",
                f"{sound.SOUND_DEVICE_HINT}; or set {keys} for VM {vm.name}",
            )
        return found

    def doctor_sound(self, plan: Plan, vms: Sequence[VmPlan]) -> Iterator[Finding]:
        names = ", ".join(vm.name for vm in vms)
        if plan.crosvm.flavor == "upstream":
            binary = plan.crosvm.sound_device
            found = sound.find_program(binary)
            if found is None:
                explicit = [vm.name for vm in vms if vm.sound.explicit]
                what = f"not found: crosvm VMs {names} start without sound"
                if explicit:
                    what += f"; {', '.join(explicit)} (sound written in the config) cannot start"
                yield Finding(binary, "fail" if explicit else "warn", what, sound.SOUND_DEVICE_HINT)
            else:
                yield Finding(binary, "ok", found)
            socket = sound.pipewire_socket(plan.user)
            if not sound.is_socket(socket):
                yield Finding(
                    "sound (crosvm)",
                    "warn",
                    f"no PipeWire server at {socket}: sound is unavailable (silent) in {names}",
                    f"log in as {plan.user.name} to a desktop session with PipeWire",
                )
        yield Finding("guest kernel (crosvm sound)", "warn", VIRTIO_SND_NOTE.format(vms=names))

    def vmm(self, plan: Plan, vm: VmPlan, argv: list[str]) -> Vmm:
        return CrosvmVmm(plan, vm, argv)


VIRTIO_SND_NOTE = "{vms}: " + sound.VIRTIO_SND_KERNEL


CROSVM = CrosvmBackend()
