"""Choosing how this host runs a config's VMs: the one place that decides (SPEC §5).

Through systemd when ``vmsilo install`` put the config's units in place and systemd is PID 1,
else with the embedded supervisor. Every command that starts, stops or inspects a VM gets its
app from here (or a fake, in tests), so none of them can run an embedded supervisor beside the
one systemd would start. Cheap: vm-run's fast path calls it; the install manifest is read only
where systemd runs, and the systemd side is imported only when it is chosen.
"""

from __future__ import annotations

from pathlib import Path

from vmsilo.defaults import STATE_DIR
from vmsilo.host.systemd import installed_units
from vmsilo.lifecycle.base import App


def open_app(config_path: str | Path, root: Path = Path("/"), state_dir: str = STATE_DIR) -> App:
    """The lifecycle app for the VMs of ``config_path`` on this host (installed below
    ``root``, with the config's ``stateDir``, where the install manifest is)."""
    units = installed_units(config_path, root, state_dir)
    if units:
        from vmsilo.lifecycle.systemd import SystemdApp

        return SystemdApp(config_path, units)
    from vmsilo.lifecycle.embedded import EmbeddedApp

    return EmbeddedApp(config_path)
