"""A restored guest asks for its DHCP leases afresh (fastStart, SPEC §10: each restore is a new
machine).

The saved RAM holds the DHCP clients the init started (``udhcpc -f -i IF ... -p
/run/udhcpc.IF.pid``, see :func:`vmsilo.guest.actions.network_actions`) with the leases of the
saved run, and their timers run on the guest's monotonic clock, which a restore does not
advance: left alone, a state restored days later keeps an address the DHCP server may have
given to another machine since, or one of a network the host has left (a netvm on a laptop
that moved), until half the lease has passed *in guest time*. So after a restore each such
client is stopped and started again with its own argv: it drops the old address and discovers
anew, as on a boot. The clients are PID 1's children; the new ones are ours, reaped in a
thread.

Standard library only (runs in the guest).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
from pathlib import Path

from vmsilo.contracts.spawn import spawn_session

log = logging.getLogger("vmsilo.agent")

#: Where the init's DHCP clients write their pid files (``udhcpc.<ifname>.pid``).
PID_DIR = Path("/run")
#: How long an old client may take to exit before it is killed (s).
STOP_WAIT = 5.0


def dhcp_clients(pid_dir: Path = PID_DIR) -> list[tuple[int, list[str]]]:
    """The running DHCP clients named by pid files in ``pid_dir``: (pid, argv) each, only
    those whose command line is a ``udhcpc`` (a stale pid file may name another process)."""
    found = []
    for pid_file in sorted(pid_dir.glob("udhcpc.*.pid")):
        try:
            pid = int(pid_file.read_text().split()[0])
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        argv = [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]
        if len(argv) >= 2 and os.path.basename(argv[1]) == "udhcpc" and argv[0].startswith("/"):
            found.append((pid, argv))
    return found


def _stop(pid: int) -> None:
    """SIGTERM (udhcpc exits without releasing the lease), SIGKILL after :data:`STOP_WAIT`;
    returns once the process is gone (a pidfd: no polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        ready, _, _ = select.select([pidfd], [], [], STOP_WAIT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            select.select([pidfd], [], [], STOP_WAIT)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def restart_dhcp_clients(pid_dir: Path = PID_DIR) -> list[int]:
    """Stop every DHCP client of ``pid_dir`` and start it again with the same argv; the new
    pids. Blocking (run it in a thread); a client that cannot be restarted is logged."""
    started = []
    for pid, argv in dhcp_clients(pid_dir):
        _stop(pid)
        try:
            new = spawn_session(argv, reset_signals=(signal.SIGPIPE, signal.SIGCHLD))
        except OSError as e:
            log.warning("cannot restart the DHCP client %s: %s", " ".join(argv[1:4]), e)
            continue
        threading.Thread(target=_reap, args=(new,), daemon=True, name="dhcp").start()
        log.info("DHCP client restarted after the restore: %s", " ".join(argv[1:4]))
        started.append(new)
    return started
