"""Semantic rules of SPEC §2 that span several keys or several VMs.

Types and formats are checked by the model; what remains is how values relate: exclusive
options, references between VMs (``netvm``), cycles, pinned /31 subnets, features one
hypervisor cannot provide. Rules that depend on *derived* values (tap names, MACs, PCI slots,
runtime paths, the kernel command line) run on the plan, in :mod:`vmsilo.plan.checks`.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Callable, Iterator

from vmsilo.backends.features import FEATURES
from vmsilo.backends.features import table as feature_table
from vmsilo.config.model import Config, GpuConfig, VmConfig
from vmsilo.config.problems import Problem, join_path
from vmsilo.config.types import crosvm_unsafe_reason, is_bdf
from vmsilo.config.users import UserLookup
from vmsilo.defaults import DEFAULT_IMAGE

IMAGE_DEFAULT = DEFAULT_IMAGE


def check_config(config: Config, users: UserLookup, skip_vms: set[str]) -> list[Problem]:
    """Every semantic problem; VMs in ``skip_vms`` failed validation and are only names here."""
    problems: list[Problem] = []
    if users(config.user) is None:
        problems.append(
            Problem(
                "user", f"no host user named {config.user!r}", "create the user or fix the name"
            )
        )
    known = set(config.vms) | skip_vms
    for name, vm in config.vms.items():
        problems += _check_vm(config, name, vm, known)
    problems += _check_netvm_cycles(config)
    problems += _check_pinned_subnets(config)
    return problems


def _check_vm(config: Config, name: str, vm: VmConfig, known: set[str]) -> Iterator[Problem]:
    def at(*parts: str | int) -> str:
        return join_path("vms", name, *parts)

    images = set(config.images) | {IMAGE_DEFAULT}
    if vm.image not in images:
        yield Problem(
            at("image"),
            f"no image named {vm.image!r}",
            _did_you_mean(vm.image, images, f"define [images.{vm.image}] or use 'default'"),
        )

    for ifname, iface in vm.network.interfaces.items():
        if iface.dhcp and (
            iface.addresses or iface.v6_addresses or iface.routes or iface.v6_routes
        ):
            yield Problem(
                at("network", "interfaces", ifname, "dhcp"),
                "dhcp together with static addresses or routes",
                "use either dhcp = true or addresses/routes, not both",
            )
        if iface.tap.host_address is not None and iface.tap.bridge is not None:
            yield Problem(
                at("network", "interfaces", ifname, "tap"),
                "hostAddress together with bridge",
                "a tap either gets a host address or joins a bridge",
            )

    net = vm.network
    if net.netvm_subnet is not None and net.netvm is None:
        yield Problem(
            at("network", "netvmSubnet"),
            "netvmSubnet without netvm",
            "set network.netvm, or remove netvmSubnet",
        )
    if net.netvm is not None and net.netvm != "host":
        if net.netvm not in known:
            yield Problem(
                at("network", "netvm"),
                f"no VM named {net.netvm!r}",
                _did_you_mean(
                    net.netvm, known | {"host"}, "name a VM with isNetvm = true, or 'host'"
                ),
            )
        elif net.netvm in config.vms and not config.vms[net.netvm].network.is_netvm:
            yield Problem(
                at("network", "netvm"),
                f"VM {net.netvm!r} is not a netvm",
                f"set vms.{net.netvm}.network.isNetvm = true",
            )

    gpu = vm.gpu
    if (
        gpu is not None
        and not isinstance(gpu, bool)
        and not (gpu.wayland or gpu.opengl or gpu.vulkan)
    ):
        yield Problem(
            at("gpu"),
            "gpu table enables no feature",
            "enable wayland, opengl or vulkan, or write gpu = false",
        )

    if vm.shared_home is not False and "home" in vm.shared_directories:
        yield Problem(
            at("sharedDirectories", "home"),
            "share tag 'home' is taken by sharedHome",
            "rename the share, or set sharedHome = false",
        )

    for i, dev in enumerate(vm.pci_devices):
        if not is_bdf(dev.path) and not dev.path.startswith("/sys/"):
            yield Problem(
                at("pciDevices", i, "path"),
                f"{dev.path!r} is neither a PCI address nor a sysfs path",
                "write a BDF like 0000:01:00.0 or /sys/bus/pci/devices/0000:01:00.0",
            )
        elif (reason := crosvm_unsafe_reason(dev.path, "path")) is not None:
            yield Problem(at("pciDevices", i, "path"), *reason)

    yield from _check_fast_start(vm, at)
    yield from _check_hypervisor(vm, at)


def _check_fast_start(vm: VmConfig, at: Callable[..., str]) -> Iterator[Problem]:
    """What a saved state cannot hold (SPEC §10): writable disks, PCI passthrough and
    vhost-user devices; and, where the hypervisor's table says so (``fast_start_keeps``),
    shares and sound. (QEMU keeps both: the shares' virtiofs devices are hot-plugged after
    every start, see :meth:`vmsilo.supervisor.service.Supervisor._plug_shares`; crosvm's
    snapshot holds neither.)"""
    if not vm.fast_start:
        return
    yield from _check_fast_start_parts(vm, at)
    # a restored guest's RAM caches what its disks held at save time: a disk written since
    # (by the previous run) would be corrupted; passed-through and vhost-user devices keep
    # state outside QEMU that no saved state holds
    if vm.root_disk is not None and vm.root_disk.ro is not True:
        yield Problem(
            at("rootDisk"),
            "fastStart cannot restore a VM with a writable disk: rootDisk",
            "set rootDisk.ro = true, or remove fastStart",
        )
    for i, disk in enumerate(vm.additional_disks):
        if disk.ro is not True:
            yield Problem(
                at("additionalDisks", i),
                f"fastStart cannot restore a VM with a writable disk: {disk.path}",
                f"set additionalDisks[{i}].ro = true, or remove fastStart",
            )
    if vm.pci_devices:
        yield Problem(
            at("pciDevices"),
            "fastStart cannot save a VM with passed-through PCI devices",
            "remove pciDevices, or remove fastStart",
        )
    if vm.vhost_user:
        yield Problem(
            at("vhostUser"),
            "fastStart cannot save a VM with vhost-user devices",
            "remove vhostUser, or remove fastStart",
        )


def _check_fast_start_parts(vm: VmConfig, at: Callable[..., str]) -> Iterator[Problem]:
    abilities = feature_table(vm.hypervisor)
    label = abilities.label
    if "shares" not in abilities.fast_start_keeps:
        if vm.shared_home is not False:
            yield Problem(
                at("sharedHome"),
                f"fastStart with {label} cannot keep the share 'home' (sharedHome): its"
                " snapshot holds no virtiofs device and none can be plugged in later",
                "set sharedHome = false, or hypervisor = 'qemu' (which plugs shares in after"
                " every start)",
            )
        for tag in vm.shared_directories:
            yield Problem(
                at("sharedDirectories", tag),
                f"fastStart with {label} cannot keep the share {tag!r}: its snapshot holds no"
                " virtiofs device and none can be plugged in later",
                f"remove sharedDirectories.{tag}, or set hypervisor = 'qemu'",
            )
    if "sound" not in abilities.fast_start_keeps:
        playback = vm.sound.playback
        if playback is None:
            playback = abilities.default_playback
        if playback or vm.sound.capture:
            default = "" if vm.sound.playback is not None else f" ({label}'s default)"
            yield Problem(
                at("sound", "playback"),
                f"fastStart with {label} cannot save a VM with sound{default}: its sound"
                " device is not in the snapshot",
                "set sound.playback = false (and sound.capture = false), or hypervisor = 'qemu'",
            )


def requested_features(vm: VmConfig) -> list[str]:
    """The features of :data:`~vmsilo.backends.features.FEATURES` ``vm`` asks for explicitly
    (``gpu = true`` means Wayland and OpenGL; unset values are the hypervisor's to choose)."""
    gpu = vm.gpu
    wanted: set[str] = set()
    if gpu is True:
        wanted |= {"gpu.wayland", "gpu.opengl"}
    elif isinstance(gpu, GpuConfig):
        wanted |= {f"gpu.{k}" for k in ("wayland", "opengl", "vulkan") if getattr(gpu, k)}
    wanted |= {f"sound.{k}" for k in ("playback", "capture") if getattr(vm.sound, k) is True}
    if vm.fast_start:
        wanted.add("fastStart")
    return [f for f in FEATURES if f in wanted]


def _check_hypervisor(vm: VmConfig, at: Callable[..., str]) -> Iterator[Problem]:
    """What the VM's hypervisor refuses (its table in :mod:`vmsilo.backends.features`)."""
    abilities = feature_table(vm.hypervisor)
    reported: set[tuple[str, ...]] = set()
    for feature in requested_features(vm):
        refusal = abilities.refused.get(feature)
        if refusal is not None and refusal.key not in reported:
            reported.add(refusal.key)
            yield Problem(at(*refusal.key), refusal.message, refusal.hint)
    devices = abilities.vhost_user_devices
    if devices is None:
        return
    for n, vu in enumerate(vm.vhost_user):
        if vu.type not in devices:
            yield Problem(
                at("vhostUser", n, "type"),
                f"{abilities.label} cannot front a vhost-user {vu.type!r} device",
                f"supported with {abilities.label}: " + ", ".join(sorted(devices)),
            )


def gpu_features(gpu: GpuConfig) -> bool:
    return gpu.wayland or gpu.opengl or gpu.vulkan


def _check_netvm_cycles(config: Config) -> Iterator[Problem]:
    reported: set[frozenset[str]] = set()
    for start in config.vms:
        seen: list[str] = []
        cur: str | None = start
        while cur is not None and cur in config.vms and cur not in seen:
            seen.append(cur)
            cur = config.vms[cur].network.netvm
        if cur is not None and cur in seen:
            cycle = seen[seen.index(cur) :]
            key = frozenset(cycle)
            if key not in reported:
                reported.add(key)
                chain = " -> ".join([*cycle, cur])
                yield Problem(
                    join_path("vms", cur, "network", "netvm"),
                    f"netvm cycle: {chain}",
                    "a chain of netvms must end at 'host' or at a netvm without a netvm",
                )


def _check_pinned_subnets(config: Config) -> Iterator[Problem]:
    rng = ipaddress.IPv4Network(config.netvm_range)
    owners: dict[ipaddress.IPv4Network, str] = {}
    for name, vm in config.vms.items():
        pinned = vm.network.netvm_subnet
        if pinned is None or vm.network.netvm is None:
            continue
        path = join_path("vms", name, "network", "netvmSubnet")
        net = ipaddress.IPv4Network(pinned)
        if net.prefixlen != 31:
            yield Problem(path, f"{pinned} is not a /31", "pin a /31, e.g. 10.200.0.8/31")
            continue
        if not net.subnet_of(rng):
            yield Problem(
                path,
                f"{pinned} lies outside netvmRange {config.netvm_range}",
                "pick a /31 inside it",
            )
            continue
        if net in owners:
            yield Problem(
                path, f"{pinned} is also pinned by VM {owners[net]!r}", "give each VM its own /31"
            )
            continue
        owners[net] = name


def _did_you_mean(value: str, candidates: set[str], fallback: str) -> str:
    close = difflib.get_close_matches(value, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else fallback
