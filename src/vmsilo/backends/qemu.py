"""QEMU command line from the plan (SPEC §4 "QEMU"): the portable second VMM.

The same plan maps onto QEMU devices: virtio-blk with ``serial=`` set to the block id (the guest
init finds the ephemeral disk by it), virtio-net on the planned tap at the planned PCI slot,
vhost-user-fs per share (guest RAM shared through a memfd backend), vhost-vsock when the host
has it and otherwise the ``org.vmsilo.channel`` virtio-serial port, the two virtio-console
ports, vfio-pci, and QMP for control. crosvm-only tunings are listed in the plan's
``not_applied`` instead of being approximated. Pure: the host facts (accelerator, vsock) are
arguments, gathered by :class:`vmsilo.backends.qemu_backend.QemuBackend`.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmsilo.backends.features import QEMU_VHOST_USER_DEVICES, Accel
from vmsilo.contracts.cmdline import SHARES_LATER, WAYPIPE_PARAM
from vmsilo.contracts.ports import CHANNEL_PORT, CONSOLE_PORT, READY_PORT
from vmsilo.plan.model import Plan, VmPlan

__all__ = ["QEMU_VHOST_USER_DEVICES", "SANDBOX", "q", "qemu_argv"]

#: QEMU's seccomp filter (SPEC §11.7): no obsolete syscalls, no fork/exec (QEMU spawns nothing:
#: taps come without scripts, migration to a file gets its fd through QMP ``getfd``), no
#: scheduler or resource changes. ``elevateprivileges`` stays allowed because ``-runas`` itself
#: calls setuid/setgid after the filter is in place (QEMU dies of SIGSYS otherwise); once it
#: ran, QEMU holds no privilege a set*id call could regain.
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"


#: The ``-add-fd`` set of the disposable disk's descriptors.
EPHEMERAL_FDSET = 1


def shares_later(vm: VmPlan) -> bool:
    """Whether ``vm``'s shares are hot-plugged after the start (fastStart with shares)."""
    return vm.fast_start and bool(vm.shares)


def share_port(n: int) -> str:
    """QEMU id of the PCIe root port the ``n``-th share is hot-plugged into."""
    return f"fsport{n}"


def q(value: str) -> str:
    """Escape a value for QEMU's option syntax, where ``,`` is written ``,,``."""
    return value.replace(",", ",,")


def qemu_argv(
    plan: Plan,
    vm: VmPlan,
    accel: Accel = "tcg",
    *,
    vsock: bool = False,
    extra_params: Sequence[str] = (),
    runas: tuple[int, int] | None = None,
    audio_server: bool = True,
    generation_id: str | None = None,
    incoming: bool = False,
    ephemeral_fds: tuple[int, int] | None = None,
) -> list[str]:
    """QEMU's argv; ``extra_params`` are kernel parameters from host facts (after the plan's).

    ``runas``: (uid, gid) QEMU switches to once every device, disk, tap and socket is open
    (``-runas UID:GID``, no passwd entry needed), so a guest that escapes into QEMU is that
    user, not root. ``audio_server``: whether the desktop's audio server is there (else the
    same sound devices on ``-audiodev none``: QEMU 7.2 exits at once when ``pa`` cannot
    connect).

    ``generation_id``: a ``vmgenid`` device with this GUID (fastStart VMs, SPEC §10: each
    restore gets a new one, so the guest kernel reseeds its RNG). ``incoming``: ``-incoming
    defer``, the machine waits for a saved state (QMP ``migrate-incoming``) instead of
    booting. ``ephemeral_fds``: the disposable disk as inherited descriptors (read-write,
    read-only), for a saving QEMU that runs as another user."""
    p = vm.paths
    # windows go through waypipe over the channel: the guest runs its server (SPEC §9.1)
    waypipe = [WAYPIPE_PARAM] if vm.gpu is not None and vm.gpu.wayland else []
    argv = [
        plan.qemu.binary,
        "-name",
        f"{q(vm.name)},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-sandbox",
        SANDBOX,
    ]
    if runas is not None:
        argv += ["-runas", f"{runas[0]}:{runas[1]}"]
    argv += [
        "-machine",
        f"q35,accel={accel}" + (",memory-backend=mem" if vm.shares else ""),
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-m",
        f"{vm.memory}M",
        "-smp",
        str(vm.cpus),
    ]
    if vm.shares:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={vm.memory}M,share=on"]
    argv += [
        "-kernel",
        vm.kernel,
        "-initrd",
        vm.initramfs,
        "-append",
        " ".join(
            [
                "console=hvc0",
                "panic=-1",
                *waypipe,
                *vm.kernel_params,
                *extra_params,
                *([f"{SHARES_LATER}=1"] if shares_later(vm) else []),
            ]
        ),
        "-chardev",
        f"socket,id=qmp,path={q(p.qmp)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-device",
        "virtio-serial-pci,id=vser0,max_ports=4",
        "-chardev",
        f"socket,id=console,path={q(p.console_backend)}",
        "-device",
        f"virtconsole,bus=vser0.0,nr=0,chardev=console,name={CONSOLE_PORT}",
        "-chardev",
        f"socket,id=ready,path={q(p.ready_socket)}",
        "-device",
        f"virtserialport,bus=vser0.0,nr=1,chardev=ready,name={READY_PORT}",
    ]
    if vsock:
        argv += ["-device", f"vhost-vsock-pci,guest-cid={vm.id}"]
    else:
        argv += [
            "-chardev",
            f"socket,id=channel,path={q(p.channel_socket)}",
            "-device",
            f"virtserialport,bus=vser0.0,nr=2,chardev=channel,name={CHANNEL_PORT}",
        ]
    if ephemeral_fds is not None:
        # the disposable disk as a descriptor set (one read-write, one read-only descriptor):
        # a save inactivates it and `cont` activates it again, and QEMU reopens the file then
        # — as the -runas user, who may not even reach stateDir; from the set it needs no path
        argv += [
            "-add-fd",
            f"fd={ephemeral_fds[0]},set={EPHEMERAL_FDSET}",
            "-add-fd",
            f"fd={ephemeral_fds[1]},set={EPHEMERAL_FDSET}",
        ]
    for n, disk in enumerate(vm.disks):
        path = disk.path
        if ephemeral_fds is not None and disk.role == "ephemeral":
            path = f"/dev/fdset/{EPHEMERAL_FDSET}"
        drive = [
            f"file={q(path)}",
            "if=none",
            f"id=disk{n}",
            "format=raw",
            f"readonly={'on' if disk.read_only else 'off'}",
        ]
        if dict(disk.options).get("direct"):
            drive += ["cache.direct=on", "aio=native" if accel == "kvm" else "aio=threads"]
        if path != disk.path:  # (the set's two descriptors would lock each other out)
            drive += ["file.locking=off"]
        argv += ["-drive", ",".join(drive)]
        dev = f"virtio-blk-pci,drive=disk{n}"
        if disk.block_id:
            dev += f",serial={q(disk.block_id)}"
        argv += ["-device", dev]
    for i in vm.interfaces:
        argv += [
            "-netdev",
            f"tap,id=net-{q(i.name)},ifname={q(i.tap)},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=net-{q(i.name)},mac={i.mac},addr=0x{i.if_index:02x}.0",
        ]
    if shares_later(vm):
        # fastStart (SPEC §10): QEMU 7.2 cannot migrate vhost-user-fs, so the machine that is
        # saved has none; a PCIe root port per share waits for its device, hot-plugged (QMP)
        # once the guest is ready, before any session
        for n, _ in enumerate(vm.shares):
            argv += ["-device", f"pcie-root-port,id={share_port(n)},chassis={n + 1}"]
    else:
        for s in vm.shares:
            argv += [
                "-chardev",
                f"socket,id=fs-{q(s.tag)},path={q(s.socket)}",
                "-device",
                f"vhost-user-fs-pci,chardev=fs-{q(s.tag)},tag={q(s.tag)}",
            ]
    for n, vu in enumerate(vm.vhost_user):
        device = QEMU_VHOST_USER_DEVICES[str(vu.get("type"))]
        argv += [
            "-chardev",
            f"socket,id=vu{n},path={q(str(vu.get('socket')))}",
            "-device",
            f"{device},chardev=vu{n}",
        ]
    for pci in vm.pci_devices:
        where = f"host={pci.bdf}" if pci.bdf is not None else f"sysfsdev={q(pci.sysfs_path)}"
        argv += ["-device", f"vfio-pci,{where}"]
    if vm.gpu is not None and vm.gpu.opengl:
        argv += ["-device", "virtio-gpu-gl-pci", "-display", "egl-headless"]
    argv += sound_args(plan, vm, audio_server=audio_server)
    if generation_id is not None:
        argv += ["-device", f"vmgenid,guid={generation_id}"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


#: QEMU's id of the VM's audio backend.
AUDIODEV = "snd0"


def sound_args(plan: Plan, vm: VmPlan, *, audio_server: bool) -> list[str]:
    """The sound card (SPEC §9.2): an Intel HDA controller with an output-only codec
    (``hda-output``: the guest has no capture device at all) or, with capture, a duplex one.

    ``mixer=off``: the codec has no amplifier controls, so a guest mixer left at its boot
    default (muted, 0 %: no alsactl restores it) cannot silence the stream QEMU opens on the
    host; the guest's PulseAudio scales in software, the host's mixer is where the user turns
    it down. Last on the command line, so that the card never shifts another device's PCI slot; and
    the same devices with or without the audio server, so a saved state stays valid. The
    user's cookie reaches QEMU's PulseAudio client through ``PULSE_COOKIE`` (see
    :class:`vmsilo.backends.qemu_backend.QemuVmm`): ``-audiodev pa`` has no option for it."""
    if not vm.sound.playback:
        return []
    if audio_server:
        server = f"unix:{plan.user.runtime_dir}/pulse/native"
        audiodev = f"pa,id={AUDIODEV},server={q(server)}"
    else:
        audiodev = f"none,id={AUDIODEV}"
    codec = "hda-duplex" if vm.sound.capture else "hda-output"
    return [
        "-audiodev",
        audiodev,
        "-device",
        "intel-hda,id=hda0",
        "-device",
        f"{codec},bus=hda0.0,audiodev={AUDIODEV},mixer=off",
    ]
