"""The Backend interface: everything vmsilo does differently under crosvm and under QEMU.

One object per hypervisor (see :mod:`vmsilo.backends.registry`) owns what that VMM refuses
(its :class:`~vmsilo.backends.features.FeatureTable`), its argv, its process control (power
button, exit codes), its preflight and its doctor checks. Code outside ``backends/`` asks the
VM's Backend instead of comparing ``vm.hypervisor`` to a name, so a third VMM, or a feature
that differs per VMM, lands in one place.

The argv is pure: what it needs from the host (QEMU's accelerator, whether vhost-vsock exists)
is gathered first, by :meth:`Backend.host_facts`, and passed in as :class:`HostFacts`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmsilo.backends.features import Accel, FeatureTable
from vmsilo.backends.vmm import Vmm
from vmsilo.contracts.cmdline import nameserver_params
from vmsilo.host.findings import Finding
from vmsilo.host.preflight import VmmProgram, preflight
from vmsilo.plan.model import Plan, VmPlan


@dataclass(frozen=True)
class SoundFacts:
    """What a VM's sound gets on this host (SPEC §9.2), read when it starts."""

    #: the guest gets its sound device (False: sound off, or nothing could serve it)
    device: bool = True
    #: the host's audio server is reachable (False: a silent backend behind the same device)
    server: bool = True
    #: why sound is unavailable, for ``status`` and the supervisor's log (None: it is fine)
    why: str | None = None

    @property
    def available(self) -> bool:
        return self.device and self.server


#: A VM without sound.
NO_SOUND = SoundFacts(device=False, server=False)


@dataclass(frozen=True)
class SoundSidecar:
    """A vhost-user sound daemon the supervisor runs next to the VMM (crosvm upstream)."""

    binary: str  # as found in PATH
    backend: str  # its audio backend: "pipewire", or "null" when the desktop has none
    socket: str  # R/<vm>-sound.socket, bound by the supervisor before the VMM starts
    #: whom it runs as: the desktop user, whose audio server it talks to
    uid: int
    gid: int
    env: tuple[tuple[str, str], ...] = ()

    def argv(self, fd: int) -> list[str]:
        from vmsilo.host.sound import sound_device_argv

        return sound_device_argv(self.binary, fd, self.backend)


#: Where the QEMU path's waypipe is looked for (Debian's package ``waypipe``).
WAYPIPE = "waypipe"


@dataclass(frozen=True)
class WindowsSidecar:
    """The desktop user's side of a VM's windows (SPEC §9.1): :mod:`vmsilo.wayland.bridge`,
    run by the supervisor as the user — the filter, and under QEMU the waypipe client."""

    vm: str
    color: str
    compositor: str  # the desktop's Wayland socket
    filter_socket: str
    #: QEMU: where the waypipe client listens for the VM's streams (None: the VMM itself
    #: connects to the filter, crosvm upstream)
    waypipe_socket: str | None
    waypipe: str | None  # the waypipe program
    control_socket: str  # the filter's, for vm-clipboard
    uid: int
    gid: int
    home: str
    runtime_dir: str
    #: started before the VMM (crosvm connects at once) instead of at the first window (QEMU)
    at_launch: bool

    def argv(self, python: str, *, drop: bool) -> list[str]:
        """The bridge's command line; ``drop``: it is started as root and becomes the user."""
        argv = [python, "-m", "vmsilo.wayland.bridge", "--vm", self.vm, "--color", self.color]
        if drop:
            argv += ["--uid", str(self.uid), "--gid", str(self.gid)]
        argv += ["--listen", self.filter_socket, "--upstream", self.compositor]
        argv += ["--control", self.control_socket]
        if self.waypipe_socket is not None and self.waypipe is not None:
            argv += ["--waypipe", self.waypipe, "--waypipe-socket", self.waypipe_socket]
        return argv

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.home,
            "XDG_RUNTIME_DIR": self.runtime_dir,
            "LANG": "C.UTF-8",
        }


def windows_sidecar(plan: Plan, vm: VmPlan, *, waypipe: bool) -> WindowsSidecar | None:
    """``vm``'s :class:`WindowsSidecar` (None without Wayland); ``waypipe``: the QEMU path."""
    gpu = vm.gpu
    if gpu is None or not gpu.wayland:
        return None
    import shutil

    u = plan.user
    return WindowsSidecar(
        vm=vm.name,
        color=vm.color,
        compositor=gpu.wayland_socket,
        filter_socket=gpu.filter_socket,
        waypipe_socket=gpu.waypipe_socket if waypipe else None,
        waypipe=(shutil.which(WAYPIPE) or WAYPIPE) if waypipe else None,
        control_socket=gpu.control_socket,
        uid=u.uid,
        gid=u.gid,
        home=u.home,
        runtime_dir=u.runtime_dir,
        at_launch=not waypipe,
    )


@dataclass(frozen=True)
class HostFacts:
    """What a VMM's argv depends on besides the plan, read from this host."""

    accel: Accel = "tcg"  # QEMU: the accelerator (KVM only when a test boot worked)
    vsock: bool = False  # QEMU: /dev/vhost-vsock exists (else the virtio-serial channel)
    #: the host's resolvers, for a VM behind the host's NAT that names none of its own
    nameservers: tuple[str, ...] = ()
    #: QEMU: the (uid, gid) to drop to once its devices are open (None: we are not root)
    runas: tuple[int, int] | None = None
    #: the VM's sound on this host (the default: as configured, the audio server there)
    sound: SoundFacts = SoundFacts()
    #: QEMU fastStart: the VM generation id of this machine (new for every start, SPEC §10)
    generation_id: str | None = None
    #: fastStart: the saved state this start loads instead of booting (QEMU waits for it
    #: with ``-incoming defer``; crosvm restores it with ``run --restore``); None: boot
    restore_from: str | None = None
    #: QEMU fastStart under -runas: the disposable disk's inherited descriptors (rw, ro)
    ephemeral_fds: tuple[int, int] | None = None

    @property
    def kernel_params(self) -> list[str]:
        """Parameters the host's facts add after the plan's (the guest reads them the same)."""
        return nameserver_params(self.nameservers)


def file_identity(path: str) -> str:
    """``path`` resolved, with its size and modification time: what changes when a package
    upgrade or an image rebuild replaces the file (part of fastStart's key, SPEC §10)."""
    import os

    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def dns_facts(vm: VmPlan) -> tuple[str, ...]:
    """The host's resolvers for ``vm`` when its netvm is the host and it names none."""
    if vm.netvm != "host" or vm.nameservers:
        return ()
    from vmsilo.host.resolvers import host_nameservers

    return host_nameservers()


class Backend(ABC):
    """One hypervisor: its tables, argv, process control, preflight and doctor checks."""

    #: the ``hypervisor`` value in the config, and the config section of its settings
    name: str
    features: FeatureTable
    #: the Debian package providing the VMM (preflight hint)
    package: str
    #: the doctor's hint when the binary is missing
    install_hint: str
    #: whether VMs of this backend cannot run without /dev/kvm, resp. vhost-vsock
    needs_kvm: bool
    needs_vsock: bool
    #: what the doctor says a missing /dev/kvm resp. vhost-vsock means for this backend
    without_kvm: str
    without_vsock: str

    @abstractmethod
    def binary(self, plan: Plan) -> str:
        """The VMM program as configured (a name looked up in PATH, or a path)."""

    #: whether its VMM can save a running guest and restore it (fastStart, SPEC §10)
    saves_state = False

    def build_id(self, plan: Plan) -> str:
        """Which build of the VMM runs (part of a saved state's key, SPEC §10): the binary's
        :func:`file_identity` — a package upgrade changes it, so a state saved by another
        build is never loaded."""
        import shutil

        return file_identity(shutil.which(self.binary(plan)) or self.binary(plan))

    def host_facts(self, plan: Plan, vm: VmPlan, *, probe: bool) -> HostFacts:
        """The host facts :meth:`argv` needs; ``probe`` may run a test boot (else: cached)."""
        return HostFacts(nameservers=dns_facts(vm), sound=self.sound_facts(plan, vm))

    @abstractmethod
    def sound_facts(self, plan: Plan, vm: VmPlan) -> SoundFacts:
        """Whether ``vm``'s sound works on this host now, and why not (reads the host)."""

    def sound_sidecar(self, plan: Plan, vm: VmPlan, facts: HostFacts) -> SoundSidecar | None:
        """The sound daemon the supervisor must run next to the VMM (None: none needed)."""
        return None

    def doctor_sound(self, plan: Plan, vms: Sequence[VmPlan]) -> Iterator[Finding]:
        """The doctor's sound findings for this backend's VMs with sound."""
        return iter(())

    def windows(self, plan: Plan, vm: VmPlan) -> WindowsSidecar | None:
        """The desktop user's side of ``vm``'s windows the supervisor runs (None: none)."""
        return None

    def probe_step(self, plan: Plan, vm: VmPlan) -> str | None:
        """What ``host_facts(probe=True)`` will spend noticeable time on (a start says it on a
        terminal), or None when it only reads cached or cheap facts."""
        return None

    @abstractmethod
    def argv(self, plan: Plan, vm: VmPlan, facts: HostFacts) -> list[str]:
        """The VMM's command line (pure: a function of the plan and the facts)."""

    @abstractmethod
    def vmm(self, plan: Plan, vm: VmPlan, argv: list[str]) -> Vmm:
        """A not yet started VMM process for ``argv``, with this backend's control."""

    def preflight(self, plan: Plan, vm: VmPlan) -> str:
        """Every check before launch (SPEC §4); the VMM binary as found in PATH."""
        return preflight(plan, vm, VmmProgram(self.binary(plan), self.package, self.name))

    def doctor_kvm(self, plan: Plan, vms: Sequence[VmPlan]) -> Iterator[Finding] | None:
        """Findings beyond "/dev/kvm is usable" for ``vms`` (None: nothing more to check)."""
        return None
