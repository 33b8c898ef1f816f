"""Find virtio-serial ports by name in the guest (stdlib only; runs inside the VM).

The guest has no udev, so there are no ``/dev/virtio-ports/<name>`` links: each port is
``/sys/class/virtio-ports/vportNpM`` with a ``name`` file, and its device node is
``/dev/vportNpM`` (created by devtmpfs).
"""

from __future__ import annotations

import time
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


def wait_virtio_port(
    name: str, timeout: float = 10.0, sysfs: Path = SYSFS_PORTS, dev: Path = DEV
) -> Path | None:
    """Like :func:`find_virtio_port`, waiting up to ``timeout`` s for the port to appear
    (the virtio_console driver may still be probing right after boot)."""
    deadline = time.monotonic() + timeout
    while True:
        path = find_virtio_port(name, sysfs, dev)
        if path is not None or time.monotonic() >= deadline:
            return path
        time.sleep(0.02)  # sleep-ok: no udev in the guest; ports appear during probe (bounded)
