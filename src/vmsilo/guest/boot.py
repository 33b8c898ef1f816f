"""Applying the guest init's boot actions (stdlib only): the part of boot that touches the system.

:mod:`vmsilo.guest.actions` decides what to do; this module does it, one action after the
other, logging a failure and going on (a VM that boots with one share missing is more use than
one that does not boot). Also the small boot chores that are not actions: loading modules, the
/dev links, and the init's log line format.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vmsilo.contracts import spawn
from vmsilo.contracts.fs import atomic_write
from vmsilo.contracts.mount import sys_mount
from vmsilo.guest.actions import (
    BUSYBOX,
    Action,
    MakeDir,
    Mount,
    RenameLink,
    Run,
    SetHostname,
    Spawn,
    WriteFile,
)

#: Signals PID 1 catches (each shuts the VM down cleanly).
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPWR)
#: Signals a child gets back at their default disposition (PID 1 catches or ignores them).
CHILD_DEFAULT_SIGNALS = (signal.SIGPIPE, *SHUTDOWN_SIGNALS, signal.SIGCHLD)

_T0 = time.monotonic()


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _T0


def log(msg: str) -> None:
    line = f"vmsilo-init: [{_uptime():8.2f}] {msg}\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode(errors="replace"))


def mounted_targets() -> set[str]:
    try:
        with open("/proc/self/mounts") as f:
            return {line.split()[1] for line in f if len(line.split()) > 2}
    except OSError:
        return set()


def run_argv(argv: Sequence[str], timeout: float = 30.0) -> int:
    """Run a command (stdio on the console); returns its exit status (-signal if killed)."""
    return spawn.run(argv, timeout, reset_signals=CHILD_DEFAULT_SIGNALS)


def spawn_argv(argv: Sequence[str]) -> int:
    """Start a long-running daemon in its own session; its pid (PID 1 reaps it)."""
    return spawn.spawn_session(argv, reset_signals=CHILD_DEFAULT_SIGNALS)


def write_file(path: str, content: str, mode: int = 0o644) -> None:
    """Replace ``path`` atomically (in /proc/sys: a plain write)."""
    if path.startswith("/proc/"):
        with open(path, "w") as f:
            f.write(content)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, content, mode)


def _mac_map() -> dict[str, str]:
    out: dict[str, str] = {}
    base = Path("/sys/class/net")
    for d in base.iterdir() if base.is_dir() else ():
        try:
            out[(d / "address").read_text().strip().lower()] = d.name
        except OSError:
            continue
    return out


def rename_links(renames: list[RenameLink], timeout: float = 5.0) -> None:
    """Rename NICs by MAC, collision-safe (through temporary names when needed)."""
    deadline = time.monotonic() + timeout
    while True:
        macs = _mac_map()
        missing = [r for r in renames if r.mac not in macs]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # sleep-ok: no udev in the guest; NICs appear during probe (bounded)
    for r in missing:
        log(f"no network interface with MAC {r.mac} (for {r.name})")
    todo = [r for r in renames if r.mac in macs and macs[r.mac] != r.name]
    targets = {r.name for r in todo}
    for i, r in enumerate(todo):
        if macs[r.mac] in targets:  # its current name is someone else's target
            tmp = f"vmsilotmp{i}"
            if run_argv([BUSYBOX, "ip", "link", "set", "dev", macs[r.mac], "name", tmp]) == 0:
                macs[r.mac] = tmp
    for r in todo:
        rc = run_argv([BUSYBOX, "ip", "link", "set", "dev", macs[r.mac], "name", r.name])
        if rc != 0:
            log(f"renaming {macs[r.mac]} ({r.mac}) to {r.name} failed")
        else:
            log(f"network interface {r.mac} is {r.name}")


def make_dir(a: MakeDir) -> None:
    fresh = not os.path.isdir(a.path)
    os.makedirs(a.path, mode=a.mode, exist_ok=True)
    if fresh or a.uid or a.gid:
        os.chown(a.path, a.uid, a.gid)
        os.chmod(a.path, a.mode)
    if fresh and a.skel and os.path.isdir("/etc/skel"):
        for name in os.listdir("/etc/skel"):
            src, dst = os.path.join("/etc/skel", name), os.path.join(a.path, name)
            if os.path.isfile(src) and not os.path.exists(dst):
                with open(src, "rb") as fi, open(dst, "wb") as fo:
                    fo.write(fi.read())
                os.chown(dst, a.uid, a.gid)


def apply(actions: Sequence[Action], spawned: Callable[[int, str], None]) -> None:
    """Apply actions in order; a failure is logged and the next action runs."""
    renames = [a for a in actions if isinstance(a, RenameLink)]
    if renames:
        rename_links(renames)
    for a in actions:
        try:
            if isinstance(a, RenameLink):
                continue
            if isinstance(a, Run):
                rc = run_argv(a.argv)
                if rc != 0:
                    log(f"{' '.join(a.argv[1:] if a.argv[0] == BUSYBOX else a.argv)}: status {rc}")
            elif isinstance(a, Spawn):
                pid = spawn_argv(a.argv)
                spawned(pid, " ".join(a.argv[1:3]))
            elif isinstance(a, WriteFile):
                write_file(a.path, a.content, a.mode)
            elif isinstance(a, MakeDir):
                make_dir(a)
            elif isinstance(a, Mount):
                if a.target in mounted_targets():
                    continue
                os.makedirs(a.target, exist_ok=True)
                sys_mount(a.source, a.target, a.fstype, a.flags, a.data)
                if a.fstype == "virtiofs":
                    log(f"share {a.source} mounted on {a.target}")
            elif isinstance(a, SetHostname):
                socket.sethostname(a.name)
        except OSError as e:
            log(f"{type(a).__name__} {a}: {e}")


def read_text(path: str) -> str:
    """The text of ``path``; "" when it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def load_modules(names: Sequence[str]) -> None:
    missing = [m for m in names if not os.path.isdir(f"/sys/module/{m}")]
    if missing and run_argv([BUSYBOX, "modprobe", "-a", *missing]) != 0:
        log(f"modprobe {' '.join(missing)} failed")


def setup_dev_links() -> None:
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        path = f"/dev/{name}"
        if not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.symlink(target, path)
