"""Whether systemd runs this machine, runs this process, and manages a config's VMs.

Cheap enough for vm-run's start-up path: the install manifest is read only where systemd runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmsilo.defaults import STATE_DIR
from vmsilo.errors import VmsiloError

SYSTEMD_BOOTED_MARK = "/run/systemd/system"


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 of this machine (or container)."""
    return os.path.isdir(SYSTEMD_BOOTED_MARK)


def run_by_systemd() -> bool:
    """This process is a unit's process (systemd sets ``INVOCATION_ID`` for each)."""
    return bool(os.environ.get("INVOCATION_ID"))


def installed_units(
    config: str | Path, root: Path = Path("/"), state_dir: str = STATE_DIR
) -> frozenset[str]:
    """The units ``vmsilo install`` put in place for ``config``, if systemd runs here.

    Empty when systemd is not PID 1, nothing is installed, or the install was made for
    another config file: then no VM of ``config`` is systemd's to start or stop.
    """
    if not systemd_running():
        return frozenset()
    from vmsilo.host.manifest import read_manifest  # only where systemd runs: vm-run's path

    try:
        manifest = read_manifest(root, state_dir)
    except VmsiloError:
        return frozenset()
    if manifest.config is None or Path(manifest.config).resolve() != Path(config).resolve():
        return frozenset()
    return frozenset(manifest.units)


def units_installed(
    service_unit: str, config: str | Path, root: Path = Path("/"), state_dir: str = STATE_DIR
) -> bool:
    """True when systemd runs here and manages the VM of ``service_unit`` for ``config``."""
    return service_unit in installed_units(config, root, state_dir)
