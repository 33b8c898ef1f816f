"""The QEMU Backend: argv from :mod:`vmsilo.backends.qemu`, control over QMP.

Its argv depends on two host facts, gathered here and nowhere else: the accelerator (KVM only
when a test boot under it worked, :mod:`vmsilo.backends.accel`) and whether
``/dev/vhost-vsock`` exists (else sessions go over the ``org.vmsilo.channel`` port). QEMU is
asked to power off with QMP ``system_powerdown`` (the ACPI power button).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

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
from vmsilo.backends.qemu import qemu_argv, share_port
from vmsilo.backends.qmp import MIGRATION_DONE, Qmp, QmpError, migration_status
from vmsilo.backends.vmm import Vmm, resumed_after
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

    # ------------------------------------------------------------------ saved states (§10)

    def save_state(self, target: Path, while_stopped: Callable[[], None], timeout: float) -> None:
        """Save the running guest into the file ``target`` (0600), then let it go on.

        The guest is paused first (``stop``: nothing changes while RAM is written, and no
        dirty pages are sent twice), migrated to ``fd`` (QMP ``getfd`` + ``migrate fd:``),
        ``while_stopped`` runs (the caller copies the disks, consistent with the RAM), and
        ``cont`` resumes the guest whatever happened. Blocking; QmpError on failure."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            self._save_into(fd, while_stopped, timeout)
        finally:
            os.close(fd)

    def _save_into(self, fd: int, while_stopped: Callable[[], None], timeout: float) -> None:
        with Qmp(self.vm.paths.qmp, timeout) as qmp:
            qmp.execute("migrate-set-capabilities", {"capabilities": _EVENTS})
            qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
            qmp.execute("stop")
            with resumed_after(lambda: qmp.execute("cont"), (QmpError,)):
                qmp.execute("getfd", {"fdname": SAVE_FD}, fds=[fd])
                qmp.execute("migrate", {"uri": f"fd:{SAVE_FD}"})
                done = qmp.wait_event(lambda e: migration_status(e) in MIGRATION_DONE, timeout)
                if migration_status(done) != "completed":
                    raise QmpError(f"saving the state {migration_status(done)}")
                _wait_postmigrate(qmp, timeout)
                while_stopped()

    def restore_state(self, state: Path, timeout: float) -> None:
        """Load the saved state file ``state`` into this VMM (started with ``-incoming
        defer``) and let the guest run. The state was saved paused (:meth:`save_state`), so
        QEMU keeps it paused after loading: ``cont`` starts it. Blocking; QmpError on failure
        (QEMU then exits by itself: a failed incoming migration ends the process)."""
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._load_from(fd, timeout)
        finally:
            os.close(fd)

    def _load_from(self, fd: int, timeout: float) -> None:
        with Qmp(self.vm.paths.qmp, timeout) as qmp:
            qmp.execute("migrate-set-capabilities", {"capabilities": _EVENTS})
            qmp.execute("getfd", {"fdname": RESTORE_FD}, fds=[fd])
            qmp.execute("migrate-incoming", {"uri": f"fd:{RESTORE_FD}"})
            done = qmp.wait_event(lambda e: migration_status(e) in MIGRATION_DONE, timeout)
            if migration_status(done) != "completed":
                raise QmpError(f"restoring the state {migration_status(done)}")
            qmp.execute("cont")

    def plug_shares(self, connections: Sequence[tuple[str, int]], timeout: float) -> None:
        """Hot-plug the shares of a fastStart VM (SPEC §10): for each (tag, socket connected
        to its virtiofsd), hand QEMU the socket (``getfd``), make it a chardev
        (``chardev-add`` on that descriptor: QEMU, dropped to ``-runas``, need not open
        anything) and plug a ``vhost-user-fs-pci`` device into the share's root port."""
        with Qmp(self.vm.paths.qmp, timeout) as qmp:
            for n, (tag, fd) in enumerate(connections):
                name = f"fs-{tag}"
                qmp.execute("getfd", {"fdname": name}, fds=[fd])
                addr = {"type": "fd", "data": {"str": name}}
                qmp.execute(
                    "chardev-add",
                    {
                        "id": name,
                        "backend": {"type": "socket", "data": {"addr": addr, "server": False}},
                    },
                )
                qmp.execute(
                    "device_add",
                    {
                        "driver": "vhost-user-fs-pci",
                        "id": f"fsdev-{tag}",
                        "chardev": name,
                        "tag": tag,
                        "bus": share_port(n),
                    },
                )


def _wait_postmigrate(qmp: Qmp, timeout: float) -> None:
    """QEMU 7.2 reports a migration ``completed`` (its event) a moment before it leaves the
    ``finish-migrate`` run state, and until then ``cont`` fails ("Migration is not finalized
    yet"); no event marks that step, so ask — each answer is one turn of QEMU's main loop,
    which is what that step waits for — bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while qmp.execute("query-status").get("status") == "finish-migrate":
        if time.monotonic() > deadline:
            raise QmpError("QEMU did not finish the migration in time")


#: QMP names of the state file's descriptor while QEMU writes, resp. reads it.
SAVE_FD = "vmsilo-save"
RESTORE_FD = "vmsilo-restore"
#: Migration bandwidth for a save: as fast as the disk takes it (the guest is paused).
MAX_BANDWIDTH = 1 << 40
_EVENTS = [{"capability": "events", "state": True}]


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
    saves_state = True

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
            generation_id=str(uuid.uuid4()) if vm.fast_start else None,
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
            generation_id=facts.generation_id,
            incoming=facts.restore_from is not None,
            ephemeral_fds=facts.ephemeral_fds,
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
