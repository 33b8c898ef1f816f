"""The typed configuration model (SPEC §2): one pydantic class per TOML table.

Models are strict (no silent coercion of ``"2048"`` to 2048), frozen, and forbid unknown keys;
field names are snake_case with the original's camelCase spelling as the alias. Values that
depend on the hypervisor (``gpu``, ``sound``) stay ``None`` when unset so that the plan, not the
model, decides their defaults — and so the rules can tell an explicit setting from a default.
Tables passed through to crosvm as ``key=value`` lists (``rootDisk``, ``pciDevices`` extras,
``vhostUser``) use crosvm's own key spelling and only the keys crosvm knows.

This module is the one table of settings (as in mkosi): each field spells its default once and
carries the description users read; ``docs/CONFIG.md`` is generated from it by
:mod:`vmsilo.config.reference` (``make config-doc``), and a test fails when the two disagree.
Defaults other code needs without pydantic (paths) come from :mod:`vmsilo.defaults`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic.alias_generators import to_camel

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
from vmsilo.defaults import DEFAULT_IMAGE, RUNTIME_DIR, SHARED_ROOT, STATE_DIR

PositiveInt = Annotated[int, Field(ge=1)]
#: A desktop file id as in ``/usr/share/applications/<id>.desktop``.
DesktopId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$", max_length=200)]


def shown(default: str) -> dict[str, Any]:
    """Field metadata: how ``docs/CONFIG.md`` shows a default the model leaves unset
    (``None``: the plan decides it, e.g. from the hypervisor)."""
    return {"shown_default": default}


def key(placeholder: str) -> dict[str, Any]:
    """Field metadata: how ``docs/CONFIG.md`` writes the user's keys of this table."""
    return {"key": placeholder}


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
    type: Literal["raw", "tmpfs"] = Field(
        "raw", description="the writable layer: a fresh sparse disk per boot, or memory"
    )
    size: Size = Field("10G", description="its size (`K`, `M`, `G` or `T`)")


class SharedDirectory(Model):
    path: HostPath = Field(description="the host directory")
    mount_point: GuestPath = Field(description="where the guest mounts it")
    read_only: bool = Field(False, description="mount it read-only")


class GpuConfig(Model):
    wayland: bool = Field(
        False,
        description="windows on the host's Wayland desktop (QEMU: waypipe over the channel)",
    )
    opengl: bool = Field(False, description="OpenGL through virgl")
    vulkan: bool = Field(False, description="Vulkan through venus (crosvm only)")
    wayland_socket: HostPath | None = Field(
        None,
        description="the host compositor's socket",
        json_schema_extra=shown("`/run/user/<uid>/wayland-0`"),
    )


class SoundConfig(Model):
    playback: bool | None = Field(
        None, description="a sound output", json_schema_extra=shown("crosvm: `true`; qemu: `false`")
    )
    capture: bool | None = Field(
        None,
        description="a sound input (implies `playback`)",
        json_schema_extra=shown("`false`"),
    )


class AutoShutdown(Model):
    enable: bool = Field(False, description="power the VM off when it has been idle")
    after: PositiveInt = Field(300, description="idle seconds before it does")


class Route4(Model):
    via: Ipv4Address = Field(description="the gateway")


class Route6(Model):
    via: Ipv6Address = Field(description="the gateway")


class TapConfig(Model):
    name: IfName | None = Field(
        None,
        description="the host tap interface",
        json_schema_extra=shown("`<vm>-<ifIndex>` (cut to 15 characters)"),
    )
    host_address: Ipv4Interface | None = Field(
        None,
        description="address of the host end (not with `bridge`); the host's services are"
        " then open to the VM on this tap as your firewall allows (vmsilo closes the host's"
        " input only on the netvm links it makes)",
    )
    bridge: IfName | None = Field(
        None, description="a host bridge the tap joins (not with `hostAddress`)"
    )


class Interface(Model):
    type: Literal["tap"] = Field("tap", description="the kind of link")
    mac_address: MacAddress | None = Field(
        None,
        description="the guest's MAC address",
        json_schema_extra=shown("derived from the VM and interface names"),
    )
    tap: TapConfig = TapConfig()
    dhcp: bool = Field(False, description="configure by DHCP (not with static addresses/routes)")
    addresses: list[Ipv4Interface] = Field([], description="static IPv4 addresses")
    v6_addresses: list[Ipv6Interface] = Field([], description="static IPv6 addresses")
    routes: dict[Ipv4Network, Route4] = Field(
        {}, description="IPv4 routes by destination", json_schema_extra=key("<dest>")
    )
    v6_routes: dict[Ipv6Network, Route6] = Field(
        {}, description="IPv6 routes by destination", json_schema_extra=key("<dest>")
    )


class Network(Model):
    interfaces: dict[IfName, Interface] = Field(
        {},
        description="the guest's interfaces by guest-visible name (see below)",
        json_schema_extra=key("<ifname>"),
    )
    nameservers: list[IpAddress] = Field(
        [],
        description='DNS servers for the guest. Empty with `netvm = "host"`: the host\'s'
        " resolvers at start, if the VM can reach them (not a loopback stub such as"
        " systemd-resolved's 127.0.0.53, whose upstream servers are used instead); `vmsilo"
        " doctor` warns when there are none",
    )
    netvm: str | None = Field(
        None,
        description='a VM with `isNetvm = true` that routes this one, or `"host"` (the host NATs)',
        json_schema_extra=shown("none"),
    )
    is_netvm: bool = Field(
        False,
        description="this VM routes its clients (nftables is in every image: nothing to add)",
    )
    netvm_subnet: Ipv4Network | None = Field(
        None,
        description="pin this VM's /31 link to its netvm (needs `netvm`)",
        json_schema_extra=shown("allocated"),
    )


class CrosvmVm(Model):
    log_level: LogLevel | None = Field(
        None, description="overrides the global one", json_schema_extra=shown("global")
    )
    extra_args: list[ArgvWord] = Field(
        [], description="appended after the global `crosvm.extraArgs`"
    )
    extra_run_args: list[ArgvWord] = Field(
        [], description="appended after the global `crosvm.extraRunArgs`"
    )


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
    hypervisor: Literal["crosvm", "qemu"] = Field("crosvm", description="the VMM that runs it")
    memory: Annotated[int, Field(ge=64)] = Field(2048, description="guest memory in MiB")
    cpus: Annotated[int, Field(ge=1, le=256)] = Field(2, description="virtual CPUs")
    color: Color = Field("gray", description="window border colour: a CSS colour name or `#RRGGBB`")
    image: ImageName = Field(DEFAULT_IMAGE, description="a name under `images`")
    root_disk: BlockDevice | None = Field(
        None,
        description="a root disk of your own instead of the image's",
        json_schema_extra=shown("the image's root"),
    )
    root_disk_readonly: bool = Field(True, description="the image root is read-only")
    kernel: HostPath | None = Field(
        None, description="a kernel of your own", json_schema_extra=shown("the image's")
    )
    initramfs: HostPath | None = Field(
        None, description="an initramfs of your own", json_schema_extra=shown("the image's")
    )
    additional_disks: list[BlockDevice] = Field([], description="more block devices")
    root_overlay: RootOverlay = RootOverlay()
    shared_home: SharedHomeSetting = Field(
        True,
        description="`/home/user` over virtiofs: from `<sharedRoot>/<vm>` (`true`), from"
        " this host path, or none (`false`); its share tag is `home`",
    )
    shared_directories: dict[ShareTag, SharedDirectory] = Field(
        {}, description="host directories shared by tag", json_schema_extra=key("<tag>")
    )
    gpu: GpuSetting | None = Field(
        None,
        description="`true` (wayland + opengl), `false`, or a table of features",
        json_schema_extra=shown("crosvm: `true`; qemu: `{ wayland = true }`"),
    )
    sound: SoundConfig = SoundConfig()
    pci_devices: list[PciDevice] = Field(
        [], description="PCI devices to pass through: `path` is a BDF or a sysfs path"
    )
    vhost_user: list[VhostUserDevice] = Field([], description="crosvm `--vhost-user` devices")
    kernel_params: list[KernelParam] = Field([], description="extra guest kernel parameters")
    fast_start: bool = Field(
        False,
        description="start from a saved, booted and ready state (saved by the first start;"
        " no writable disks, PCI passthrough or vhost-user devices; with crosvm also no"
        " shares and no sound)",
    )
    auto_shutdown: AutoShutdown = AutoShutdown()
    network: Network = Network()
    start_timeout: PositiveInt | None = Field(
        None, description="overrides the global one", json_schema_extra=shown("global")
    )
    stop_timeout: PositiveInt | None = Field(
        None, description="overrides the global one", json_schema_extra=shown("global")
    )
    crosvm: CrosvmVm = CrosvmVm()
    desktop_entries: list[DesktopId] | None = Field(
        None,
        description="desktop file ids (without `.desktop`) of the image's own packages whose"
        " menu entries `vmsilo install` writes; `[]` none; checked against the image at"
        " install and image build",
        json_schema_extra=shown("all"),
    )


class CrosvmGlobal(Model):
    binary: Program = Field("crosvm", description="the production VMM (a name or a path)")
    flavor: Literal["upstream", "vmsilo"] = Field(
        "upstream", description="`vmsilo` uses the original module's patched crosvm options"
    )
    log_level: LogLevel = Field("info", description="crosvm's `--log-level`")
    extra_args: list[ArgvWord] = Field([], description="arguments before `run`, every VM")
    extra_run_args: list[ArgvWord] = Field([], description="arguments after `run`, every VM")
    render_server: HostPath = Field(
        "/usr/libexec/virgl_render_server", description="the GPU render server"
    )
    sound_device: Program = Field(
        "vhost-device-sound", description="the vhost-user sound daemon (upstream flavor)"
    )


class QemuGlobal(Model):
    binary: Program = Field("qemu-system-x86_64", description="the portable VMM")
    accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="`auto` uses KVM only if a test boot under KVM works"
    )


class ImageConfig(Model):
    packages: list[DebPackage] = Field([], description="extra Debian packages in this image")
    suite: Suite = Field("bookworm", description="the Debian release it is built from")


class CopyLimits(Model):
    """``vm-copy``'s limits (SPEC §9.4): what one copy may carry, enforced by the destination
    VM's unpacker whatever the source sends."""

    max_bytes: PositiveInt = Field(64 << 30, description="bytes of file data in one `vm-copy`")
    max_files: PositiveInt = Field(
        1_000_000, description="files, directories and symlinks in one `vm-copy`"
    )


class GlobalConfig(Model):
    """Everything but the VMs, validated first so VM errors can be collected per VM."""

    user: str = Field(
        description="the desktop user who runs `vm-run`; must exist on the host; the guest"
        " user `user` gets its uid:gid"
    )
    scheduler_isolation: Literal["full", "vm", "off"] = Field(
        "vm", description="crosvm core scheduling: all VMs, per VM, or off"
    )
    isolated_pci_devices: list[Bdf] = Field([], description="BDFs reserved for passthrough")
    netvm_range: Ipv4Network = Field(
        "10.200.0.0/16",
        description="where the /31 links between clients and their netvm come from",
    )
    start_timeout: PositiveInt = Field(60, description="seconds to a ready guest")
    stop_timeout: PositiveInt = Field(30, description="seconds from the power button to a kill")
    state_dir: HostPath = Field(STATE_DIR, description="images, ephemeral disks, console logs")
    runtime_dir: HostPath = Field(RUNTIME_DIR, description="sockets, state files, locks")
    shared_root: HostPath = Field(
        SHARED_ROOT, description="parent of the default shared homes (`<sharedRoot>/<vm>`)"
    )
    crosvm: CrosvmGlobal = CrosvmGlobal()
    qemu: QemuGlobal = QemuGlobal()
    copy_limits: CopyLimits = Field(CopyLimits(), alias="copy")
    images: dict[ImageName, ImageConfig] = Field(
        {},
        description="guest images by name; an image `default` always exists",
        json_schema_extra=key("<name>"),
    )
    vms: dict[str, Any] = {}


class Config(GlobalConfig):
    """The whole validated configuration; ``vms`` is in file order."""

    vms: dict[str, VmConfig] = {}
