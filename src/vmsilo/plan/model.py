"""The plan: every value derived from the configuration, computed once (SPEC §3).

Immutable dataclasses. Every generator downstream (crosvm and QEMU argv, supervisor, systemd
units, status) reads these fields and derives nothing of its own, so two consumers can never
disagree about a tap name or a socket path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KvValue = bool | int | str


def render_kv_value(value: KvValue) -> str:
    """crosvm spelling: ``true``/``false``, decimal integers, strings verbatim."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_kv(items: tuple[tuple[str, KvValue], ...], positional: str | None = None) -> str:
    """``<positional>,k=v,…`` with the items in the order given (already sorted by the plan)."""
    words = [positional] if positional is not None else []
    words += [f"{k}={render_kv_value(v)}" for k, v in items]
    return ",".join(words)


@dataclass(frozen=True, slots=True)
class HostUserPlan:
    name: str
    uid: int
    gid: int
    home: str
    runtime_dir: str


@dataclass(frozen=True, slots=True)
class Route:
    dest: str
    via: str


@dataclass(frozen=True, slots=True)
class InterfacePlan:
    name: str
    if_index: int
    pci_address: str
    mac: str
    tap: str
    host_address: str | None
    bridge: str | None
    dhcp: bool
    addresses: tuple[str, ...]
    v6_addresses: tuple[str, ...]
    routes: tuple[Route, ...]
    v6_routes: tuple[Route, ...]
    injected_for: str | None  # the peer VM of a netvm link ("host" for the host), else None


@dataclass(frozen=True, slots=True)
class DiskPlan:
    role: Literal["root", "additional", "ephemeral"]
    path: str
    options: tuple[tuple[str, KvValue], ...]  # crosvm keys except path, sorted, defaults merged
    read_only: bool
    block_id: str | None

    @property
    def crosvm_kv(self) -> str:
        return render_kv(self.options, positional=self.path)


@dataclass(frozen=True, slots=True)
class SharePlan:
    tag: str
    host_path: str
    mount_point: str
    read_only: bool
    socket: str


@dataclass(frozen=True, slots=True)
class GpuPlan:
    wayland: bool
    opengl: bool
    vulkan: bool
    wayland_socket: str
    #: the VM's filter socket (SPEC §9.1): what its Wayland clients reach instead of
    #: ``wayland_socket`` (crosvm upstream's ``--wayland-sock``, waypipe's display under QEMU)
    filter_socket: str = ""
    #: where the host's waypipe client listens for the VM's streams (QEMU path)
    waypipe_socket: str = ""
    #: the filter's control socket: vm-clipboard's way to the VM's selection (SPEC §9.4)
    control_socket: str = ""

    @property
    def context_types(self) -> tuple[str, ...]:
        names = (("cross-domain", self.wayland), ("virgl2", self.opengl), ("venus", self.vulkan))
        return tuple(name for name, on in names if on)


@dataclass(frozen=True, slots=True)
class SoundPlan:
    playback: bool
    capture: bool
    #: ``sound.playback`` or ``sound.capture`` was written ``true`` in the config (not a
    #: default): a VM that asked for sound by name fails to start without it, one that merely
    #: inherited the default starts without a sound device (SPEC §9.2)
    explicit: bool = False


@dataclass(frozen=True, slots=True)
class PciDevicePlan:
    bdf: str | None  # normalised, when known
    sysfs_path: str
    options: tuple[tuple[str, KvValue], ...]

    @property
    def crosvm_kv(self) -> str:
        return render_kv(self.options, positional=self.sysfs_path)


@dataclass(frozen=True, slots=True)
class VhostUserPlan:
    options: tuple[tuple[str, KvValue], ...]

    @property
    def crosvm_kv(self) -> str:
        return render_kv(self.options)

    def get(self, key: str) -> KvValue | None:
        return dict(self.options).get(key)


@dataclass(frozen=True, slots=True)
class NetvmLink:
    """One /31 between a client and its netvm (a VM, or ``host``)."""

    client: str
    netvm: str
    subnet: str
    gateway: str  # even address, the netvm's side
    client_address: str  # odd address
    bridge: str | None  # vmsilo-br<client id> when the netvm is a VM
    pinned: bool


@dataclass(frozen=True, slots=True)
class RuntimePaths:
    command_socket: str
    console: str
    console_backend: str
    ready_socket: str
    channel_socket: str
    crosvm_control: str
    qmp: str
    sound_socket: str
    plan_snapshot: str
    state_file: str
    lock: str
    spawn_lock: str
    supervisor_log: str
    ephemeral_disk: str
    console_log: str

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class ImagePlan:
    name: str
    suite: str
    packages: tuple[str, ...]
    directory: str  # S/images/<name>
    current: str  # S/images/<name>/current


@dataclass(frozen=True, slots=True)
class VmPlan:
    name: str
    id: int
    hypervisor: Literal["crosvm", "qemu"]
    memory: int
    cpus: int
    color: str
    image: str
    kernel: str
    initramfs: str
    disks: tuple[DiskPlan, ...]
    interfaces: tuple[InterfacePlan, ...]
    kernel_params: tuple[str, ...]
    shares: tuple[SharePlan, ...]
    gpu: GpuPlan | None
    sound: SoundPlan
    pci_devices: tuple[PciDevicePlan, ...]
    vhost_user: tuple[VhostUserPlan, ...]
    root_overlay: Literal["raw", "tmpfs"]
    root_overlay_size: str
    auto_shutdown_after: int | None
    nameservers: tuple[str, ...]
    netvm: str | None
    is_netvm: bool
    netvm_clients: tuple[str, ...]
    start_timeout: int
    stop_timeout: int
    log_level: str
    extra_args: tuple[str, ...]
    extra_run_args: tuple[str, ...]
    paths: RuntimePaths
    service_unit: str
    socket_unit: str
    not_applied: tuple[str, ...]
    #: ``desktopEntries``: the menu entries to install (None: every one the image offers)
    desktop_entries: tuple[str, ...] | None = None
    #: start from a saved ready state (SPEC §10)
    fast_start: bool = False

    @property
    def kernel_cmdline(self) -> str:
        return " ".join(self.kernel_params)

    @property
    def ephemeral_disk(self) -> DiskPlan | None:
        return next((d for d in self.disks if d.role == "ephemeral"), None)


@dataclass(frozen=True, slots=True)
class CrosvmSettings:
    binary: str
    flavor: Literal["upstream", "vmsilo"]
    render_server: str
    sound_device: str


@dataclass(frozen=True, slots=True)
class QemuSettings:
    binary: str
    accel: Literal["auto", "kvm", "tcg"]


@dataclass(frozen=True, slots=True)
class Plan:
    user: HostUserPlan
    vms: dict[str, VmPlan]  # ordered by id; treat as read-only
    links: tuple[NetvmLink, ...]
    images: dict[str, ImagePlan]
    scheduler_isolation: Literal["full", "vm", "off"]
    isolated_pci_devices: tuple[str, ...]
    netvm_range: str
    state_dir: str
    runtime_dir: str
    shared_root: str
    crosvm: CrosvmSettings
    qemu: QemuSettings

    def vm(self, name: str) -> VmPlan:
        return self.vms[name]
