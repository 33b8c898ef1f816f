"""Find the VMM's ports in the guest (stdlib only; the agent uses it inside the VM).

The guest has no udev, so there are no ``/dev/virtio-ports/<name>`` links: each port is
``/sys/class/virtio-ports/vportNpM`` with a ``name`` file, and its device node is
``/dev/vportNpM`` (created by devtmpfs). A VMM that gives a port a virtio-console device of its
own (upstream crosvm) makes it an unnamed hvc console instead: see :func:`find_ready_console`.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSFS_PORTS = Path("/sys/class/virtio-ports")
DEV = Path("/dev")


def list_virtio_ports(sysfs: Path = SYSFS_PORTS, dev: Path = DEV) -> dict[str, Path]:
    """Port name → device node, for every named virtio-serial port."""
    ports: dict[str, Path] = {}
    try:
        entries = sorted(sysfs.iterdir())
    except OSError:
        return ports
    for entry in entries:
        try:
            name = (entry / "name").read_text().strip()
        except OSError:
            continue
        if name:
            ports.setdefault(name, dev / entry.name)
    return ports


def find_virtio_port(name: str, sysfs: Path = SYSFS_PORTS, dev: Path = DEV) -> Path | None:
    """The device node of the virtio-serial port called ``name`` (e.g. ``org.vmsilo.ready``),
    or None if there is none (yet)."""
    path = list_virtio_ports(sysfs, dev).get(name)
    if path is not None and path.exists():
        return path
    return None


#: The hvc driver's device nodes (/dev/hvc0 … hvc7 exist whether or not a console backs them).
HVC_DEVICES = 8


def find_ready_console() -> Path | None:
    """/dev/hvcN carrying the readiness port when the VMM gave it a device of its own.

    Upstream crosvm makes every ``--serial hardware=virtio-console`` a separate virtio-console
    device without the multiport feature. The guest then sees each one's only port as an hvc
    console with no name (and its /dev/vportNp0 refuses to open), so the port cannot be found
    by name. vmsilo gives such a VMM exactly two of them: the kernel's console
    (``console=hvc0``) and ``org.vmsilo.ready``. So: the one hvc console that a device backs
    (an unbacked one fails to open) and that is not the kernel's console. None when that is
    not exactly one, rather than guess.
    """
    try:
        active = set(Path("/sys/class/tty/console/active").read_text().split())
    except OSError:
        active = set()
    backed = []
    for n in range(HVC_DEVICES):
        name = f"hvc{n}"
        if name in active:
            continue
        try:
            fd = os.open(f"/dev/{name}", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        os.close(fd)
        backed.append(name)
    return Path("/dev") / backed[0] if len(backed) == 1 else None
