"""What this host offers a VM's sound (SPEC §9.2): the desktop user's audio server, QEMU's
PulseAudio module and the vhost-user sound daemon, read once per start.

A VM never fails to start because the desktop has no audio server: the backends read these
facts first and fall back to a silent audio backend with the same guest devices (QEMU's
``-audiodev none``, the daemon's ``--backend null``), so the guest sees the card it would see
with sound, and ``vmsilo status`` / ``doctor`` say why nothing is heard. Only a missing sound
*daemon* removes the device (there is nothing to serve it), and only a VM whose config asked
for sound by name fails over that.

Readers only: nothing here starts or changes anything.
"""

from __future__ import annotations

import os
import shutil
import stat

from vmsilo.plan.model import HostUserPlan

#: Where Debian's ``qemu-system-gui`` puts QEMU's PulseAudio backend (a loadable module: QEMU
#: 7.2 refuses ``-audiodev pa`` without it).
QEMU_MODULE_DIRS: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu/qemu",
    "/usr/lib/aarch64-linux-gnu/qemu",
    "/usr/lib64/qemu",
    "/usr/lib/qemu",
)
QEMU_PA_MODULE = "audio-pa.so"
QEMU_PA_HINT = "apt-get install qemu-system-gui (it ships QEMU's PulseAudio module)"

SOUND_DEVICE_HINT = (
    "vhost-device-sound is not packaged in Debian 12: build it from rust-vmm/vhost-device"
    " (cargo install vhost-device-sound) and set crosvm.soundDevice to it"
)

#: What a crosvm sound guest's kernel needs; Debian 12's 6.1 kernel is built without it.
VIRTIO_SND_KERNEL = (
    "a crosvm sound guest needs a kernel built with CONFIG_SND_VIRTIO (Debian 12's 6.1 guest"
    " kernel lacks it; Debian 13's 6.12 has it as a module): set kernel/initramfs of the VM to"
    " such a kernel, or use hypervisor = 'qemu' (Intel HDA)"
)


def pulse_socket(user: HostUserPlan) -> str:
    """The user's PulseAudio (or PipeWire-pulse) native socket."""
    return f"{user.runtime_dir}/pulse/native"


def pulse_cookie(user: HostUserPlan) -> str:
    """The user's PulseAudio cookie: a client of another uid (the root VMM) needs it."""
    return f"{user.home}/.config/pulse/cookie"


def pipewire_socket(user: HostUserPlan) -> str:
    """The user's PipeWire socket (what vhost-device-sound's pipewire backend talks to)."""
    return f"{user.runtime_dir}/pipewire-0"


def is_socket(path: str) -> bool:
    """Whether ``path`` is a Unix socket (a server listens there, or did and died uncleanly)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def qemu_pa_module() -> str | None:
    """QEMU's PulseAudio module, or None when ``qemu-system-gui`` is not installed."""
    for directory in QEMU_MODULE_DIRS:
        path = os.path.join(directory, QEMU_PA_MODULE)
        if os.path.exists(path):
            return path
    return None


def find_program(name: str) -> str | None:
    """``name`` looked up in PATH (or checked, when it is a path)."""
    return shutil.which(name)


def sound_device_argv(binary: str, fd: int, backend: str) -> list[str]:
    """vhost-device-sound serving the supervisor's listening socket ``fd`` (``--socket-fd``:
    bound before the VMM, so the VMM never races the daemon)."""
    return [binary, f"--socket-fd={fd}", f"--backend={backend}"]
