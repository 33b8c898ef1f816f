"""Failures of a program started from the host menu, where nobody reads standard error.

A menu entry runs ``vm-run --detach VM …`` (SPEC §9.3) with no terminal: when that fails
(vm-run's own failure, or the program cannot be found or run) the message goes to the journal
(syslog, which journald serves on ``/dev/log``) and, where the user has a session bus, to a
desktop notification through ``notify-send``. Both are best effort: a notification that cannot
be shown never changes vm-run's exit status.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

APP_NAME = "vmsilo"


def session_bus() -> str | None:
    """The user's session bus address: ``$DBUS_SESSION_BUS_ADDRESS``, else the systemd user
    bus socket ``/run/user/<uid>/bus`` if it exists."""
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    path = f"/run/user/{os.getuid()}/bus"
    return f"unix:path={path}" if os.path.exists(path) else None


def to_journal(ident: str, text: str) -> None:
    import syslog

    with contextlib.suppress(OSError):
        syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_USER)
        syslog.syslog(syslog.LOG_ERR, text)
        syslog.closelog()


def to_desktop(summary: str, body: str) -> bool:
    """A desktop notification; False when there is no session bus or no ``notify-send``."""
    bus = session_bus()
    program = shutil.which("notify-send")
    if bus is None or program is None:
        return False
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus)
    try:
        done = subprocess.run(
            [program, f"--app-name={APP_NAME}", "--urgency=critical", "--", summary, body],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def report_launch_failure(prog: str, vm: str, text: str) -> None:
    """Tell the user (journal, and the desktop where it can) that a launch in ``vm`` failed."""
    to_journal(prog, f"{vm}: {text}")
    to_desktop(f"{vm}: the program did not start", text)
