"""The typed configuration model (SPEC §2): one pydantic class per TOML table.

Models are strict (no silent coercion of ``"2048"`` to 2048), frozen, and forbid unknown keys;
field names are snake_case with the original's camelCase spelling as the alias. Values that
depend on the hypervisor (``gpu``, ``sound``) stay ``None`` when unset so that the plan, not the
model, decides their defaults — and so the rules can tell an explicit setting from a default.
Tables passed through to crosvm as ``key=value`` lists (``rootDisk``, ``pciDevices`` extras,
``vhostUser``) use crosvm's own key spelling and only the keys crosvm knows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic.alias_generators import to_camel

from vmsilo.config.location import DEFAULT_RUNTIME_DIR
from vmsilo.config.types import (
    ArgvWord,
    Bdf,
    BlockId,
    Color,
    DebPackage,
    GuestPath,
    HostPath,
    IfName,
    ImageName,
    IpAddress,
    Ipv4Address,
    Ipv4Interface,
    Ipv4Network,
    Ipv6Address,
    Ipv6Interface,
    Ipv6Network,
    KernelParam,
    KvString,
    LogLevel,
    MacAddress,
    PciAddress,
    Program,
    ShareTag,
    Size,
    Suite,
    fail,
)

PositiveInt = Annotated[int, Field(ge=1)]


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise fail(f"queue size {value} is not a power of two", "use e.g. 256 or 1024")
    return value


QueueSize = Annotated[int, Field(ge=1, le=32768), AfterValidator(_power_of_two)]


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
    )


class KvModel(BaseModel):
    """A table whose keys are spelled exactly as crosvm spells them."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    def crosvm_items(self) -> dict[str, bool | int | str]:
        """The keys the user set, in crosvm spelling (``path`` included)."""
        return {k: v for k, v in self.model_dump(by_alias=True, exclude_none=True).items()}


class BlockDevice(KvModel):
    """crosvm ``--block`` (DiskOption) keys."""

    path: HostPath
    ro: bool | None = None
    root: bool | None = None
    sparse: bool | None = None
    direct: bool | None = None
    lock: bool | None = None
    block_size: Annotated[int, Field(ge=512)] | None = Field(None, alias="block-size")
    id: BlockId | None = None
    multiple_workers: bool | None = Field(None, alias="multiple-workers")
    async_executor: Literal["epoll", "uring"] | None = Field(None, alias="async-executor")
    packed_queue: bool | None = Field(None, alias="packed-queue")
    bootindex: Annotated[int, Field(ge=0)] | None = None
    pci_address: PciAddress | None = Field(None, alias="pci-address")
    dontcache: bool | None = None


class PciDevice(KvModel):
    """A PCI device to pass through (``--vfio``): BDF or sysfs path, plus VfioOption keys."""

    path: str
    iommu: Literal["off", "viommu", "coiommu", "pkvm-iommu"] | None = None
    guest_address: PciAddress | None = Field(None, alias="guest-address")
    dt_symbol: KvString | None = Field(None, alias="dt-symbol")


VHOST_USER_TYPES = (
    "net",
    "block",
    "console",
    "rng",
    "balloon",
    "scsi",
    "9p",
    "gpu",
    "input",
    "vsock",
    "iommu",
    "sound",
    "fs",
    "pmem",
    "mac80211-hwsim",
    "video-encoder",
    "video-decoder",
    "scmi",
    "wl",
    "tpm",
    "pvclock",
    "media",
)


class VhostUserDevice(KvModel):
    """crosvm ``--vhost-user`` (VhostUserFrontendOption) keys."""

    type: Literal[VHOST_USER_TYPES]  # type: ignore[valid-type]
    socket: HostPath
    max_queue_size: QueueSize | None = Field(None, alias="max-queue-size")
    pci_address: PciAddress | None = Field(None, alias="pci-address")


class RootOverlay(Model):
    type: Literal["raw", "tmpfs"] = "raw"
    size: Size = "10G"


class SharedDirectory(Model):
    path: HostPath
    mount_point: GuestPath
    read_only: bool = False


class GpuConfig(Model):
    wayland: bool = False
    opengl: bool = False
    vulkan: bool = False
    wayland_socket: HostPath | None = None


class SoundConfig(Model):
    playback: bool | None = None
    capture: bool | None = None


class AutoShutdown(Model):
    enable: bool = False
    after: PositiveInt = 300


class Route4(Model):
    via: Ipv4Address


class Route6(Model):
    via: Ipv6Address


class TapConfig(Model):
    name: IfName | None = None
    host_address: Ipv4Interface | None = None
    bridge: IfName | None = None


class Interface(Model):
    type: Literal["tap"] = "tap"
    mac_address: MacAddress | None = None
    tap: TapConfig = TapConfig()
    dhcp: bool = False
    addresses: list[Ipv4Interface] = []
    v6_addresses: list[Ipv6Interface] = []
    routes: dict[Ipv4Network, Route4] = {}
    v6_routes: dict[Ipv6Network, Route6] = {}


class Network(Model):
    interfaces: dict[IfName, Interface] = {}
    nameservers: list[IpAddress] = []
    netvm: str | None = None
    is_netvm: bool = False
    netvm_subnet: Ipv4Network | None = None


class CrosvmVm(Model):
    log_level: LogLevel | None = None
    extra_args: list[ArgvWord] = []
    extra_run_args: list[ArgvWord] = []


def _bool_or_other(value: Any) -> str | None:
    if isinstance(value, bool):
        return "<bool>"
    if isinstance(value, dict):
        return "<table>"
    if isinstance(value, str):
        return "<path>"
    return None


GpuSetting = Annotated[
    Annotated[bool, Tag("<bool>")] | Annotated[GpuConfig, Tag("<table>")],
    Discriminator(
        _bool_or_other,
        custom_error_type="vmsilo_gpu",
        custom_error_message="expected true, false or a table of GPU features",
    ),
]
SharedHomeSetting = Annotated[
    Annotated[bool, Tag("<bool>")] | Annotated[HostPath, Tag("<path>")],
    Discriminator(
        _bool_or_other,
        custom_error_type="vmsilo_home",
        custom_error_message="expected true, false or a host path",
    ),
]


class VmConfig(Model):
    hypervisor: Literal["crosvm", "qemu"] = "crosvm"
    memory: Annotated[int, Field(ge=64)] = 2048
    cpus: Annotated[int, Field(ge=1, le=256)] = 2
    color: Color = "gray"
    image: ImageName = "default"
    root_disk: BlockDevice | None = None
    root_disk_readonly: bool = True
    kernel: HostPath | None = None
    initramfs: HostPath | None = None
    additional_disks: list[BlockDevice] = []
    root_overlay: RootOverlay = RootOverlay()
    shared_home: SharedHomeSetting = True
    shared_directories: dict[ShareTag, SharedDirectory] = {}
    gpu: GpuSetting | None = None
    sound: SoundConfig = SoundConfig()
    pci_devices: list[PciDevice] = []
    vhost_user: list[VhostUserDevice] = []
    kernel_params: list[KernelParam] = []
    auto_shutdown: AutoShutdown = AutoShutdown()
    network: Network = Network()
    start_timeout: PositiveInt | None = None
    stop_timeout: PositiveInt | None = None
    crosvm: CrosvmVm = CrosvmVm()


class CrosvmGlobal(Model):
    binary: Program = "crosvm"
    flavor: Literal["upstream", "vmsilo"] = "upstream"
    log_level: LogLevel = "info"
    extra_args: list[ArgvWord] = []
    extra_run_args: list[ArgvWord] = []
    render_server: HostPath = "/usr/libexec/virgl_render_server"
    sound_device: Program = "vhost-device-sound"


class QemuGlobal(Model):
    binary: Program = "qemu-system-x86_64"
    accel: Literal["auto", "kvm", "tcg"] = "auto"


class ImageConfig(Model):
    packages: list[DebPackage] = []
    suite: Suite = "bookworm"


class GlobalConfig(Model):
    """Everything but the VMs, validated first so VM errors can be collected per VM."""

    user: str
    scheduler_isolation: Literal["full", "vm", "off"] = "vm"
    isolated_pci_devices: list[Bdf] = []
    netvm_range: Ipv4Network = "10.200.0.0/16"
    start_timeout: PositiveInt = 60
    stop_timeout: PositiveInt = 30
    state_dir: HostPath = "/var/lib/vmsilo"
    runtime_dir: HostPath = DEFAULT_RUNTIME_DIR
    shared_root: HostPath = "/shared"
    crosvm: CrosvmGlobal = CrosvmGlobal()
    qemu: QemuGlobal = QemuGlobal()
    images: dict[ImageName, ImageConfig] = {}
    vms: dict[str, Any] = {}


class Config(GlobalConfig):
    """The whole validated configuration; ``vms`` is in file order."""

    vms: dict[str, VmConfig] = {}
