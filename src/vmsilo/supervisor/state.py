"""The per-VM state file and lock, shared by the supervisor and every reader.

The lock (``R/<vm>.lock``, flock) is held by the supervisor for its whole life: whether it is
held is the single source of truth for "a supervisor runs"; a waiter blocks on it to learn, with
no polling, when a supervisor has exited. The state file (``R/<vm>.state.json``, replaced
atomically) says what that supervisor is doing, and after it exits keeps the last exit reason.

Both belong to root and are readable by the desktop user's group only (0640; SPEC §11.5):
another account can neither take the lock — a shared lock held by anyone keeps the VM from
starting — nor read what runs. A lock file that root did not create (a runtimeDir others can
write to) is refused rather than used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmsilo.contracts.fs import atomic_write
from vmsilo.errors import VMAlreadyRunningError, VmsiloError

#: Mode of the lock, state and snapshot files: root writes, the desktop user's group reads.
PRIVATE = 0o640

#: The signal that tells a supervisor "kill the VM now" (``vmsilo stop --kill``): the VMM is
#: killed without the power button; the supervisor still cleans up and records why. SIGTERM
#: (also SIGINT, SIGHUP) is the graceful stop.
KILL_SIGNAL = signal.SIGQUIT

State = Literal["stopped", "starting", "running", "stopping", "failed"]


@dataclass
class VmState:
    state: State
    supervisor_pid: int | None = None
    vmm_pid: int | None = None
    hypervisor: str | None = None
    started_at: float | None = None
    ready_at: float | None = None
    config_hash: str | None = None
    last_exit: dict[str, Any] | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_state(path: str | Path) -> VmState | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    known = {k: v for k, v in data.items() if k in VmState.__dataclass_fields__}
    try:
        return VmState(**known)
    except TypeError:
        return None


def write_state(path: str | Path, state: VmState, group: int | None = None) -> None:
    """Replace the state file; ``group`` (default: the current file's) may read it."""
    if group is None:
        with contextlib.suppress(OSError):
            group = os.stat(path).st_gid
    atomic_write(path, json.dumps(asdict(state), indent=1) + "\n", PRIVATE, group=group)


def now() -> float:
    return time.time()


class VmLock:
    """The supervisor's lifetime lock on ``R/<vm>.lock``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, vm: str, group: int | None = None) -> None:
        """Hold the lock for this process's life; ``group`` may read it (``status``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            os.close(fd)
            raise VmsiloError(
                f"VM {vm}: the lock file {self.path} belongs to uid {owner}, not to vmsilo",
                f"remove it; {self.path.parent} must be writable by root only"
                " (`vmsilo doctor` checks it)",
            )
        os.fchmod(fd, PRIVATE if group is not None else 0o600)
        if group is not None:
            os.fchown(fd, -1, group)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VMAlreadyRunningError(
                f"VM {vm} already has a running supervisor",
                f"use `vmsilo status {vm}`, or `vmsilo stop {vm}` first",
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_locked(path: str | Path) -> bool:
    """Whether a live process holds the lock (i.e. the VM's supervisor runs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def wait_unlocked(path: str | Path) -> None:
    """Block until no supervisor holds the lock (kernel wakes us; no polling)."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)


def mark_abandoned(path: str | Path) -> None:
    """A state left ``starting``/``running``/``stopping`` by a supervisor that died without
    cleaning up becomes ``failed``, with that as the last exit reason."""
    st = read_state(path)
    if st is not None and st.state in ("starting", "running", "stopping"):
        st.state = "failed"
        st.last_exit = {
            "reason": "supervisor exited without cleanup",
            "cause": "abandoned",
            "clean": False,
            "at": now(),
        }
        st.supervisor_pid = st.vmm_pid = None
        write_state(path, st)
