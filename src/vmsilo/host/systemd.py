"""Whether systemd runs this machine: a check cheap enough for vm-run's start-up path."""

from __future__ import annotations

import os

SYSTEMD_BOOTED_MARK = "/run/systemd/system"


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 of this machine (or container)."""
    return os.path.isdir(SYSTEMD_BOOTED_MARK)
