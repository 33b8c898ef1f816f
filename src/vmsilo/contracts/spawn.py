"""Start a child by argv (never a shell) with default signal dispositions, and wait for it.

``posix_spawn`` rather than ``fork``+``exec``: nothing of the parent's Python state runs in
the child, and ``setsigdef`` gives the child default handlers for the signals its parent
(the guest's PID 1) catches or ignores, which a plain ``exec`` would leave ignored. A
long-lived child gets a session of its own (``setsid``) so that a signal to the parent's
group does not reach it.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterable, Sequence


def spawn(
    argv: Sequence[str],
    *,
    reset_signals: Iterable[int] = (),
    setsid: bool = False,
) -> int:
    """Start ``argv`` (``argv[0]`` a path) with this environment; its pid."""
    return os.posix_spawn(
        argv[0],
        list(argv),
        dict(os.environ),
        setsigdef=tuple(reset_signals),
        setsigmask=(),
        setsid=setsid,
    )


def spawn_session(argv: Sequence[str], *, reset_signals: Iterable[int] = ()) -> int:
    """Start a long-lived child in a session of its own; its pid (the caller reaps it)."""
    return spawn(argv, reset_signals=reset_signals, setsid=True)


def wait_exit(pid: int, timeout: float) -> int:
    """Wait for ``pid`` (SIGKILL after ``timeout`` s); its exit status (-N if killed by N).

    The wait is on a pidfd, so the kernel wakes us when the child exits: no polling.
    """
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run(argv: Sequence[str], timeout: float, *, reset_signals: Iterable[int] = ()) -> int:
    """Run ``argv`` to completion (stdio inherited); its exit status."""
    return wait_exit(spawn(argv, reset_signals=reset_signals), timeout)
