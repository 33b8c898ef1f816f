"""The names the VMM gives the guest's ports and the vsock port the agent listens on.

Host (VMM argv, supervisor) and guest (init, agent) must agree on these byte for byte, so they
are spelled here once (SPEC §4, §6).
"""

from __future__ import annotations

#: virtio-console port of the kernel console (QEMU names it; crosvm's console is unnamed).
CONSOLE_PORT = "org.vmsilo.console"
#: virtio-console port on which the agent says ``hello`` once it is ready.
READY_PORT = "org.vmsilo.ready"
#: virtio-serial port multiplexing the sessions where there is no vsock.
CHANNEL_PORT = "org.vmsilo.channel"
#: vsock port the agent listens on.
VSOCK_PORT = 5000
