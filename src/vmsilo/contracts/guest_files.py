"""The files the image builder copies into the guest (``/usr/lib/python3/dist-packages``).

One list, beside the modules it names: a module the guest needs is one line here. Paths are
relative to the directory holding the ``vmsilo`` package. Everything listed is standard-library
only; tests check that the guest's imports stay inside this list and that no module of the
guest-side packages is left out of it.
"""

from __future__ import annotations

#: Python modules of the guest: its init and agent, and what they import.
GUEST_MODULES: tuple[str, ...] = (
    "vmsilo/__init__.py",
    "vmsilo/contracts/__init__.py",
    "vmsilo/contracts/cmdline.py",
    "vmsilo/contracts/fs.py",
    "vmsilo/contracts/guest_files.py",
    "vmsilo/contracts/mount.py",
    "vmsilo/contracts/ports.py",
    "vmsilo/contracts/spawn.py",
    "vmsilo/channel/__init__.py",
    "vmsilo/channel/blocking_client.py",
    "vmsilo/channel/client.py",
    "vmsilo/channel/escapes.py",
    "vmsilo/channel/mux.py",
    "vmsilo/channel/pipes.py",
    "vmsilo/channel/protocol.py",
    "vmsilo/channel/relay.py",
    "vmsilo/channel/splice.py",
    "vmsilo/guest/__init__.py",
    "vmsilo/guest/actions.py",
    "vmsilo/guest/agent.py",
    "vmsilo/guest/agent_exec.py",
    "vmsilo/guest/boot.py",
    "vmsilo/guest/copy_pack.py",
    "vmsilo/guest/copy_rules.py",
    "vmsilo/guest/copy_unpack.py",
    "vmsilo/guest/dhcp_restart.py",
    "vmsilo/guest/init.py",
    "vmsilo/guest/netvm.py",
    "vmsilo/guest/ports.py",
    "vmsilo/guest/ready_port.py",
    "vmsilo/guest/sound.py",
    "vmsilo/guest/wayland.py",
)

#: Executable data files (made mode 0755 in the image).
GUEST_DATA: tuple[str, ...] = (
    "vmsilo/guest/data/stage1-init",
    "vmsilo/guest/data/udhcpc-script",
)

#: Every file copied into the guest.
GUEST_FILES: tuple[str, ...] = GUEST_MODULES + GUEST_DATA
