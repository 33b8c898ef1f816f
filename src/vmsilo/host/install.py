"""``vmsilo install`` / ``vmsilo uninstall``: write and remove the host integration files.

What was installed is recorded in a manifest (``<root>/var/lib/vmsilo/installed.json``) —
files, enablement symlinks, directories vmsilo had to create, and units. That record is what
makes the operations exact: a reinstall removes the units of VMs that left the config, and an
uninstall removes precisely what an install wrote (no config needed, so it works even after the
config is gone) and never a file vmsilo did not create.

Against the live system (root ``/`` with systemd as PID 1) the unit changes are applied too:
units of removed VMs are stopped first, then ``daemon-reload``, then the command sockets are
started. With ``--root DIR`` nothing outside DIR is touched and systemd is not called.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmsilo.contracts.fs import atomic_write
from vmsilo.defaults import STATE_DIR
from vmsilo.errors import VmsiloError
from vmsilo.host.manifest import Manifest, manifest_rel, read_manifest
from vmsilo.host.menu import render_menu_files
from vmsilo.host.systemd import systemd_running
from vmsilo.host.units import enable_links, render_host_files
from vmsilo.plan.model import HostUserPlan, Plan
from vmsilo.runcmd import run


def vmsilo_exe() -> list[str]:
    """The absolute argv prefix that runs ``vmsilo`` (what the units put in ExecStart=).

    The script beside the running interpreter first (a venv's ``bin/vmsilo``), then ``vmsilo``
    on PATH, and the module itself as the fallback — never a bare name, since systemd and
    completion run without the caller's PATH."""
    beside = Path(sys.executable).parent / "vmsilo"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    found = shutil.which("vmsilo")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "vmsilo.cli.vmsilo"]


def exe_notes(exe: Sequence[str], user: HostUserPlan) -> list[str]:
    """Why the units' ``ExecStart=`` may be a poor target: a vmsilo that runs from a source
    checkout (the units break when it moves, and it is easy to edit by accident), or one the
    desktop user cannot run (``vm-run`` is theirs)."""
    notes = []
    program = Path(exe[0]).resolve()
    checkout = next((d for d in program.parents if (d / ".git").exists()), None)
    if checkout is not None:
        notes.append(
            f"vmsilo runs from the source checkout {checkout}: the units point into it"
            " (hint: `make install` puts it under /opt/vmsilo with the commands on PATH)"
        )
    blocked = _unreachable_for(program, user)
    interpreter = _shebang(program)
    if blocked is None and interpreter is not None:
        blocked = _unreachable_for(Path(interpreter).resolve(), user)
    if blocked is not None:
        notes.append(
            f"user {user.name} cannot run vmsilo's commands: {blocked} is not readable by them"
            " (hint: `make install` builds them with Debian's python3 under /opt/vmsilo)"
        )
    return notes


def _shebang(program: Path) -> str | None:
    """The interpreter a script names on its first line (a venv's ``bin/vmsilo``)."""
    try:
        with program.open("rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words else None


def _unreachable_for(path: Path, user: HostUserPlan) -> Path | None:
    """The first of ``path`` and its parents that ``user`` cannot traverse or read (by its
    mode bits, owner and primary group), or None."""

    def allowed(st: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if st.st_uid == user.uid:
            return bool(st.st_mode & bits[0])
        if st.st_gid == user.gid:
            return bool(st.st_mode & bits[1])
        return bool(st.st_mode & bits[2])

    try:
        for parent in reversed(path.parents):  # from / down, so the blocking one is named
            if not allowed(parent.stat(), (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
                return parent
        if not allowed(path.stat(), (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
            return path
    except OSError:
        return path
    return None


@dataclass
class Report:
    """What an install/uninstall did, for the user and for tests."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _safe_rel(rel: str) -> str:
    """Manifest entries are relative paths below the root; refuse anything else."""
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts:
        raise VmsiloError(f"refusing manifest entry {rel!r}", "the manifest was edited by hand")
    return rel


def _same(path: Path, data: str | bytes) -> bool:
    """``path`` is a regular file holding exactly ``data``."""
    if not path.is_file() or path.is_symlink():
        return False
    return path.read_bytes() == (data.encode() if isinstance(data, str) else data)


def _mkdirs(root: Path, rel_dir: str, created: list[str]) -> None:
    """Create ``root/rel_dir`` and its missing parents, recording each one created."""
    missing = []
    d = Path(rel_dir)
    while d != Path(".") and not (root / d).exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        (root / d).mkdir(mode=0o755)
        created.append(str(d))


def _systemctl(*args: str) -> None:
    run(["systemctl", *args], hint="see `journalctl -xe` and `systemctl status vmsilo.slice`")


def install(
    plan: Plan,
    config: str,
    root: Path,
    exe: Sequence[str] | None = None,
    *,
    live: bool | None = None,
) -> Report:
    """Write the host files for ``plan`` below ``root``; idempotent.

    ``live`` (default: root is ``/`` and systemd runs) also reloads systemd, stops the units of
    VMs no longer configured and starts the command sockets."""
    root = root.absolute()
    if live is None:
        live = root == Path("/") and systemd_running()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VmsiloError(
            f"cannot create {root}: {e.strerror}", "pass an existing directory as --root"
        ) from None
    exe = list(exe) if exe is not None else vmsilo_exe()
    files: dict[str, str | bytes] = dict(render_host_files(plan, exe, config))
    files.update(render_menu_files(plan))  # reads the images' kept entries (SPEC §9.3)
    links = enable_links(plan)
    manifest = manifest_rel(plan.state_dir)
    old = read_manifest(root, plan.state_dir)
    report = Report()
    report.notes += exe_notes(exe, plan.user)
    new = Manifest(
        config=config,
        files=sorted(files),
        links=sorted(links),
        dirs=list(old.dirs),
        units=[u for vm in plan.vms.values() for u in (vm.socket_unit, vm.service_unit)],
        sockets=[vm.socket_unit for vm in plan.vms.values()],
    )
    owned = set(old.files) | set(old.links)
    for rel, text in files.items():
        path = root / rel
        if path.is_symlink() or (path.exists() and rel not in owned):
            if _same(path, text):
                report.unchanged.append(rel)
                continue
            raise VmsiloError(
                f"{path} exists and was not installed by vmsilo",
                "move it away (vmsilo will not overwrite files it does not own)",
            )
    gone_units = [u for u in old.units if u not in new.units]
    if live and gone_units:
        # stop before the unit files disappear, or systemd loses track of the running VM
        _systemctl("stop", *gone_units)
    try:
        for rel, text in files.items():
            path = root / rel
            _mkdirs(root, str(Path(rel).parent), new.dirs)
            if _same(path, text):
                if rel not in report.unchanged:
                    report.unchanged.append(rel)
                continue
            atomic_write(path, text)
            report.written.append(rel)
        for rel, target in links.items():
            path = root / rel
            _mkdirs(root, str(Path(rel).parent), new.dirs)
            if path.is_symlink() and os.readlink(path) == target:
                report.unchanged.append(rel)
                continue
            if path.is_symlink() or path.exists():
                if rel not in owned:
                    raise VmsiloError(
                        f"{path} exists and was not installed by vmsilo", "move it away"
                    )
                path.unlink()
            os.symlink(target, path)
            report.written.append(rel)
        for rel in sorted(owned - set(files) - set(links)):
            path = root / _safe_rel(rel)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                report.removed.append(rel)
        _mkdirs(root, str(Path(manifest).parent), new.dirs)
        keep = {str(Path(r).parent) for r in [*files, *links, manifest]}
        new.dirs = _prune_dirs(root, new.dirs, keep)
        atomic_write(root / manifest, json.dumps(new.to_json(), indent=2) + "\n")
    except PermissionError as e:
        raise VmsiloError(f"cannot write {e.filename}: permission denied", "run as root") from None
    if live:
        if report.written or report.removed:
            _systemctl("daemon-reload")
        _restart_changed_sockets(plan, old, report)
        if new.sockets:
            _systemctl("start", *new.sockets)
    elif root == Path("/"):
        report.notes.append("systemd is not running here: units written, not started")
    return report


def _restart_changed_sockets(plan: Plan, old: Manifest, report: Report) -> None:
    """A listening socket keeps its old path, owner and mode until it is restarted.

    A changed socket unit whose VM is stopped is restarted now. One whose VM runs is left to
    the running supervisor (it serves the socket it was handed; restarting it would strand
    the VM) and the report says how to finish once the VM is stopped."""
    by_socket = {vm.socket_unit: vm for vm in plan.vms.values()}
    changed = [
        Path(rel).name
        for rel in report.written
        if rel.endswith(".socket") and Path(rel).name in old.sockets
    ]
    for unit in changed:
        vm = by_socket.get(unit)
        if vm is None:
            continue
        running = run(["systemctl", "is-active", "--quiet", vm.service_unit], check=False)
        if running.returncode == 0:
            report.notes.append(
                f"VM {vm.name} runs with its old command socket: after `vm-stop {vm.name}`,"
                f" run `systemctl restart {unit}`"
            )
        else:
            _systemctl("restart", unit)


def _prune_dirs(root: Path, dirs: list[str], keep: set[str]) -> list[str]:
    """Remove directories vmsilo created that are now empty; return those that remain."""
    remaining = []
    for rel in sorted(dirs, key=lambda d: -len(Path(d).parts)):
        path = root / _safe_rel(rel)
        if not any(k == rel or k.startswith(rel + "/") for k in keep):
            with contextlib.suppress(FileNotFoundError, OSError):
                path.rmdir()
        if path.is_dir():
            remaining.append(rel)
    return sorted(remaining)


def uninstall(root: Path, state_dir: str = STATE_DIR, *, live: bool | None = None) -> Report:
    """Remove everything the manifest lists (and the manifest); the config is not needed."""
    root = root.absolute()
    if live is None:
        live = root == Path("/") and systemd_running()
    manifest = manifest_rel(state_dir)
    old = read_manifest(root, state_dir)
    report = Report()
    if not (root / manifest).exists():
        report.notes.append(f"nothing installed below {root}")
        return report
    if live and old.units:
        _systemctl("stop", *old.units)
    try:
        for rel in [*old.links, *old.files]:
            path = root / _safe_rel(rel)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                report.removed.append(rel)
        (root / manifest).unlink()
    except PermissionError as e:
        raise VmsiloError(f"cannot remove {e.filename}: permission denied", "run as root") from None
    leftover = _prune_dirs(root, old.dirs, keep=set())
    for rel in leftover:
        report.notes.append(f"kept {root / rel}: not empty")
    if live:
        _systemctl("daemon-reload")
    return report
