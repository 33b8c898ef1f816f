"""Default locations, spelled once for every side of vmsilo (stdlib only, imports nothing).

The configuration model (:mod:`vmsilo.config.model`) takes its path defaults from here, and so
can code that must not import the model — ``vm-run``'s fast path reads the TOML without
pydantic, and the guest never has it — so a default changes in one place and
``docs/CONFIG.md`` (generated from the model) follows. The runtime file names a client finds
without the plan are here too, beside the directory they live in.
"""

from __future__ import annotations

CONFIG_FILE = "/etc/vmsilo/vmsilo.toml"
"""The system configuration file (``-c FILE`` and ``$VMSILO_CONFIG`` override it)."""

RUNTIME_DIR = "/run/vmsilo"
"""``runtimeDir``: sockets, state files, locks, plan snapshots."""

STATE_DIR = "/var/lib/vmsilo"
"""``stateDir``: images, ephemeral disks, console logs."""

SHARED_ROOT = "/shared"
"""``sharedRoot``: parent of the default shared homes."""

DEFAULT_IMAGE = "default"
"""The image every VM uses unless it names another; it always exists."""


def command_socket(runtime_dir: str, vm: str) -> str:
    """Where ``vm-run`` connects for ``vm`` (SPEC §3 ``R/<vm>-command.socket``)."""
    return f"{runtime_dir}/{vm}-command.socket"
