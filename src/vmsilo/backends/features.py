"""What each hypervisor can and cannot do, as pure data (a stdlib-only leaf module).

The config checks (:mod:`vmsilo.config.rules`) and the plan (:mod:`vmsilo.plan.build`) sit
below the backends and must not import them; yet what they refuse or default depends on the
VMM. So the per-hypervisor facts live here, with no imports but the standard library, and both
floors read them; the :class:`~vmsilo.backends.base.Backend` objects expose the same tables.
Adding a backend means adding one :class:`FeatureTable` here and one Backend object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Hypervisor = Literal["crosvm", "qemu"]
#: QEMU's accelerator
Accel = Literal["kvm", "tcg"]

#: Every configurable hypervisor, the default first.
HYPERVISORS: tuple[Hypervisor, ...] = ("crosvm", "qemu")

#: Features a VM may ask for explicitly, in the order the config checks look at them.
FEATURES = (
    "gpu.wayland",
    "gpu.opengl",
    "gpu.vulkan",
    "sound.playback",
    "sound.capture",
    "fastStart",
)


@dataclass(frozen=True)
class Refusal:
    """Why ``check`` refuses a feature: the config key it points at, the message, the hint."""

    key: tuple[str, ...]
    message: str
    hint: str


@dataclass(frozen=True)
class FeatureTable:
    """One hypervisor's abilities, as the config checks and the plan need them."""

    #: how messages name the VMM
    label: str
    #: explicitly requested features it cannot provide (feature → refusal)
    refused: MappingProxyType[str, Refusal] = field(default_factory=lambda: MappingProxyType({}))
    #: vhost-user device types it can front, type → its device (None: any type)
    vhost_user_devices: MappingProxyType[str, str] | None = None
    #: built-in crosvm tunings it does not apply (``vmsilo plan`` lists them)
    not_applied: tuple[str, ...] = ()
    #: what an unset ``gpu`` means: the features on (empty: no GPU)
    default_gpu: tuple[tuple[str, bool], ...] = ()
    #: whether an unset ``sound.playback`` means on
    default_playback: bool = False
    #: what a fastStart VM (SPEC §10) may have besides its disks: "shares" (their devices
    #: hot-plugged after every start), "sound" (the sound device is saved with the machine)
    fast_start_keeps: frozenset[str] = frozenset()


_QEMU_GPU = Refusal(
    ("gpu",),
    "QEMU cannot provide Vulkan (venus) here",
    "venus needs QEMU >= 8.1 with rutabaga (Debian 12 has 7.2); use hypervisor = 'crosvm',"
    " or gpu = { wayland = true, opengl = true }",
)


#: vhost-user device types QEMU 7.2 can front without extra information.
QEMU_VHOST_USER_DEVICES: MappingProxyType[str, str] = MappingProxyType(
    {
        "block": "vhost-user-blk-pci",
        "gpu": "vhost-user-gpu-pci",
        "input": "vhost-user-input-pci",
        "rng": "vhost-user-rng-pci",
        "scsi": "vhost-user-scsi-pci",
        "vsock": "vhost-user-vsock-pci",
    }
)

#: crosvm's built-in tunings that QEMU has no counterpart for (SPEC §4 "QEMU").
QEMU_NOT_APPLIED = (
    "hugepages",
    "balloon-page-reporting",
    "boost-uclamp",
    "disable-virtio-intx",
    "s2idle",
    "core-scheduling",
    "packed-queue",
)

CROSVM = FeatureTable(
    label="crosvm",
    default_gpu=(("wayland", True), ("opengl", True)),
    default_playback=True,
    # `crosvm snapshot take` / `run --restore` save crosvm's own devices only: a vhost-user
    # device served by another daemon (a virtiofsd share, the upstream sound daemon) is not in
    # the snapshot, and crosvm hot-plugs nothing but network devices; the vmsilo flavor's
    # PulseAudio device is its own patch, not known to snapshot
    fast_start_keeps=frozenset(),
)

QEMU = FeatureTable(
    label="QEMU",
    refused=MappingProxyType(
        {
            "gpu.vulkan": _QEMU_GPU,
            # sound: no virtio-sound before QEMU 8.2, so QEMU plays through an emulated Intel
            # HDA card instead (SPEC §9.2): nothing to refuse
        }
    ),
    vhost_user_devices=QEMU_VHOST_USER_DEVICES,
    not_applied=QEMU_NOT_APPLIED,
    # windows through waypipe over the channel (SPEC §9.1); OpenGL only when asked for
    default_gpu=(("wayland", True),),
    # shares hot-plugged after every start (QEMU 7.2 cannot migrate vhost-user-fs); the HDA
    # card migrates with the machine
    fast_start_keeps=frozenset({"shares", "sound"}),
)

TABLES: MappingProxyType[str, FeatureTable] = MappingProxyType({"crosvm": CROSVM, "qemu": QEMU})


def table(hypervisor: str) -> FeatureTable:
    """The feature table of ``hypervisor`` (one of :data:`HYPERVISORS`)."""
    return TABLES[hypervisor]
