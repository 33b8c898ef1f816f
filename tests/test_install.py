"""``vmsilo install``/``uninstall`` into a temporary root, and the systemd dispatch of start/stop.

Proves: a reinstall changes nothing; ``--root DIR`` writes nowhere but DIR (every file-system
write is watched with a Python audit hook) and calls no systemctl; removing a VM from the config
and reinstalling leaves nothing of it; uninstall restores the root to exactly what it was; a
file vmsilo did not write is never overwritten; against a live systemd the right systemctl
calls happen in the right order; and vm-stop of a netvm in use is refused under systemd too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import USERS, plan_of, run_vmsilo
from strict import StrictRun, Unordered
from vmsilo.errors import VMInUseError, VmsiloError
from vmsilo.host import install as install_mod
from vmsilo.host import systemd as host_systemd
from vmsilo.host.install import install, uninstall
from vmsilo.host.manifest import MANIFEST, read_manifest
from vmsilo.lifecycle import systemd as systemd_lifecycle
from vmsilo.lifecycle.app import open_app
from vmsilo.lifecycle.embedded import EmbeddedApp
from vmsilo.lifecycle.systemd import SystemdApp

FLEET = """
user = "alice"
[vms.netvm]
network.isNetvm = true
network.netvm = "host"
[vms.work]
network.netvm = "netvm"
[vms.banking]
network.netvm = "netvm"
"""
WITHOUT_BANKING = FLEET.split("[vms.banking]")[0]


def snapshot(root: Path) -> dict[str, Any]:
    """Every path below root with its kind and content (links: their target)."""
    tree: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                tree[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                tree[rel] = ("dir", p.stat().st_mode & 0o7777)
            else:
                tree[rel] = ("file", p.read_bytes(), p.stat().st_mode & 0o7777)
    return tree


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "vmsilo.toml"
    path.write_text(FLEET)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc" / "systemd" / "system").mkdir(parents=True)
    (r / "etc" / "systemd" / "system" / "sshd.service").write_text("[Service]\n")
    return r


class WriteWatch:
    """Records every file-system mutation Python performs outside ``allowed`` while active."""

    def __init__(self) -> None:
        self.active = False
        self.allowed: list[str] = []
        self.outside: list[tuple[str, str]] = []
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        paths: list[Any] = []
        if event == "open":
            mode, flags = args[1], args[2]
            writing = mode is not None and any(c in str(mode) for c in "wax+")
            if writing or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)):
                paths = [args[0]]
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown"):
            paths = [args[0]]
        elif event in ("os.symlink", "os.link"):
            paths = [args[1]]
        elif event == "os.rename":
            paths = [args[0], args[1]]
        elif event == "subprocess.Popen":
            self.outside.append((event, repr(args[1])))
        for p in paths:
            if isinstance(p, int):
                continue
            full = os.path.abspath(os.fsdecode(p))
            if not any(full == a or full.startswith(a + "/") for a in self.allowed):
                self.outside.append((event, full))


_WATCH: WriteWatch | None = None


@pytest.fixture
def watch() -> Iterator[WriteWatch]:
    global _WATCH
    if _WATCH is None:
        _WATCH = WriteWatch()  # audit hooks cannot be removed: install one, toggle it
    _WATCH.outside.clear()
    yield _WATCH
    _WATCH.active = False


def vmsilo(*args: str) -> str:
    status, out, err = run_vmsilo(list(args))
    assert status == 0, err
    return out


def test_install_writes_only_below_root_and_is_idempotent(
    cfg: Path, root: Path, watch: WriteWatch
) -> None:
    before = snapshot(root)
    watch.allowed = [str(root)]
    watch.active = True
    out = vmsilo("-c", str(cfg), "install", "--root", str(root))
    watch.active = False
    assert watch.outside == []
    assert "written" in out
    first = snapshot(root)
    manifest = read_manifest(root)
    assert manifest.config == str(cfg.resolve())
    units = root / "etc/systemd/system"
    for vm in ("netvm", "work", "banking"):
        assert (units / f"vmsilo-{vm}-vm.service").is_file()
        assert (units / f"vmsilo-{vm}-command.socket").is_file()
        link = units / "sockets.target.wants" / f"vmsilo-{vm}-command.socket"
        assert os.readlink(link) == f"../vmsilo-{vm}-command.socket"
    assert (root / "etc/polkit-1/rules.d/50-vmsilo.rules").is_file()
    assert (root / "etc/tmpfiles.d/vmsilo.conf").is_file()
    assert (root / "etc/bash_completion.d/vmsilo").is_file()
    assert (units / "sshd.service").read_text() == "[Service]\n"
    # everything new is in the manifest, and nothing else
    new = set(first) - set(before)
    listed = set(manifest.files) | set(manifest.links) | set(manifest.dirs) | {MANIFEST}
    assert new == listed
    # a second install changes nothing at all
    watch.active = True
    out = vmsilo("-c", str(cfg), "install", "--root", str(root))
    watch.active = False
    assert watch.outside == []
    assert "(0 written" in out and "0 removed)" in out
    assert snapshot(root) == first


def test_reinstall_without_a_vm_leaves_nothing_of_it(cfg: Path, root: Path) -> None:
    vmsilo("-c", str(cfg), "install", "--root", str(root))
    cfg.write_text(WITHOUT_BANKING)
    out = vmsilo("-c", str(cfg), "install", "--root", str(root))
    assert "removed etc/systemd/system/vmsilo-banking-vm.service" in out
    for rel, kind in snapshot(root).items():
        assert "banking" not in rel
        assert b"banking" not in kind[1] if kind[0] == "file" else True, rel
    assert "vmsilo-banking-vm.service" not in read_manifest(root).units
    # and a fresh install of the smaller config gives the same tree
    fresh = root.parent / "fresh"
    fresh.mkdir()
    (fresh / "etc/systemd/system").mkdir(parents=True)
    (fresh / "etc/systemd/system/sshd.service").write_text("[Service]\n")
    vmsilo("-c", str(cfg), "install", "--root", str(fresh))
    assert snapshot(root) == snapshot(fresh)


def test_uninstall_removes_exactly_what_was_installed(cfg: Path, root: Path) -> None:
    (root / "etc/tmpfiles.d").mkdir()
    (root / "etc/tmpfiles.d/other.conf").write_text("d /run/other 0755 root root -\n")
    before = snapshot(root)
    vmsilo("-c", str(cfg), "install", "--root", str(root))
    assert snapshot(root) != before
    cfg.unlink()  # uninstall needs no config
    vmsilo("uninstall", "--root", str(root))
    assert snapshot(root) == before
    # a second uninstall is a no-op
    vmsilo("uninstall", "--root", str(root))
    assert snapshot(root) == before


def test_foreign_files_are_never_overwritten(cfg: Path, root: Path) -> None:
    foreign = root / "etc/systemd/system/vmsilo.slice"
    foreign.write_text("[Slice]\nCPUWeight=10\n")
    status, _out, err = run_vmsilo(["-c", str(cfg), "install", "--root", str(root)])
    assert status == 2
    assert "exists and was not installed by vmsilo" in err
    assert foreign.read_text() == "[Slice]\nCPUWeight=10\n"
    assert not (root / MANIFEST).exists()


def test_a_missing_root_is_created_and_an_impossible_one_is_an_error(
    cfg: Path, tmp_path: Path
) -> None:
    status, _out, err = run_vmsilo(["-c", str(cfg), "install", "--root", str(tmp_path / "no")])
    assert status == 0, err
    assert (tmp_path / "no" / MANIFEST).is_file()
    (tmp_path / "file").write_text("")
    status, _out, err = run_vmsilo(
        ["-c", str(cfg), "install", "--root", str(tmp_path / "file" / "x")]
    )
    assert status == 2 and "cannot create" in err and "Traceback" not in err


def test_live_install_reloads_starts_sockets_and_stops_removed_units(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctl = StrictRun(monkeypatch, install_mod)
    plan = plan_of(FLEET)
    sockets = [
        "vmsilo-banking-command.socket",
        "vmsilo-netvm-command.socket",
        "vmsilo-work-command.socket",
    ]
    ctl.expect(["systemctl", "daemon-reload"]).expect(Unordered(["systemctl", "start"], sockets))
    install(plan, "/etc/vmsilo/vmsilo.toml", root, ["/usr/bin/vmsilo"], live=True)
    ctl.done()
    assert ctl.calls[0] == ["systemctl", "daemon-reload"]
    assert ctl.calls[1][:2] == ["systemctl", "start"] and sorted(ctl.calls[1][2:]) == sockets
    ctl.calls.clear()
    ctl.expect(Unordered(["systemctl", "start"], sockets))
    install(plan, "/etc/vmsilo/vmsilo.toml", root, ["/usr/bin/vmsilo"], live=True)
    ctl.done()
    assert ctl.calls == [["systemctl", "start", *ctl.calls[0][2:]]]  # no reload: unchanged
    ctl.calls.clear()
    stop = ["systemctl", "stop", "vmsilo-banking-command.socket", "vmsilo-banking-vm.service"]
    ctl.expect(stop).expect(["systemctl", "daemon-reload"])
    ctl.expect(Unordered(["systemctl", "start"], sockets[1:]))
    install(plan_of(WITHOUT_BANKING), "/etc/vmsilo/vmsilo.toml", root, ["/x"], live=True)
    ctl.done()
    assert ctl.calls[0] == stop  # before its unit files disappear
    assert ctl.calls[1] == ["systemctl", "daemon-reload"]
    ctl.calls.clear()
    units = [
        f"vmsilo-{vm}-{kind}"
        for vm in ("netvm", "work")
        for kind in ("command.socket", "vm.service")
    ]
    ctl.expect(Unordered(["systemctl", "stop"], units)).expect(["systemctl", "daemon-reload"])
    uninstall(root, live=True)
    ctl.done()
    assert ctl.calls[0][:2] == ["systemctl", "stop"] and len(ctl.calls[0]) == 2 + 4
    assert ctl.calls[-1] == ["systemctl", "daemon-reload"]


def test_systemd_is_used_only_when_units_are_installed_for_this_config(
    cfg: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_of(FLEET)
    vm = plan.vms["work"]
    monkeypatch.setattr(host_systemd, "systemd_running", lambda: True)
    assert not host_systemd.units_installed(vm.service_unit, cfg, root)  # nothing installed
    assert isinstance(open_app(cfg, root), EmbeddedApp)
    install(plan, str(cfg), root, ["/usr/bin/vmsilo"], live=False)
    assert host_systemd.units_installed(vm.service_unit, cfg, root)
    app = open_app(cfg, root)
    assert isinstance(app, SystemdApp) and app.manages(vm)
    other = cfg.parent / "other.toml"
    other.write_text(FLEET)
    assert not host_systemd.units_installed(vm.service_unit, other, root)  # another config's
    assert isinstance(open_app(other, root), EmbeddedApp)
    monkeypatch.setattr(host_systemd, "systemd_running", lambda: False)
    assert not host_systemd.units_installed(vm.service_unit, cfg, root)  # systemd is not PID 1
    assert isinstance(open_app(cfg, root), EmbeddedApp)


def test_a_vm_without_installed_units_runs_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM added to the config after `vmsilo install` is started by the embedded app."""
    plan = plan_of(FLEET)
    StrictRun(monkeypatch, systemd_lifecycle)  # no systemctl call at all
    app = SystemdApp("/etc/vmsilo/vmsilo.toml", ["vmsilo-netvm-vm.service"])
    calls: list[tuple[str, str]] = []

    def embedded_stop(
        _plan: object, vm: Any, *, with_clients: bool = False, kill: bool = False
    ) -> bool:
        calls.append(("stop", vm.name))
        return False

    monkeypatch.setattr(app.embedded, "stop", embedded_stop)
    assert not app.manages(plan.vms["work"])
    assert app.stop(plan, plan.vms["work"]) is False
    assert calls == [("stop", "work")]


def test_systemd_stop_refuses_a_netvm_in_use_unless_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = plan_of(FLEET)
    ctl = StrictRun(monkeypatch, systemd_lifecycle)
    app = SystemdApp("/etc/vmsilo/vmsilo.toml", [vm.service_unit for vm in plan.vms.values()])
    monkeypatch.setattr(app, "running_clients", lambda _p, _v: ["banking", "work"])
    monkeypatch.setattr(app, "is_running", lambda _v: True)
    with pytest.raises(VMInUseError, match="banking, work"):
        app.stop(plan, plan.vms["netvm"])
    assert ctl.calls == []
    ctl.expect(["systemctl", "stop", "vmsilo-banking-vm.service"])
    ctl.expect(["systemctl", "stop", "vmsilo-work-vm.service"])
    ctl.expect(["systemctl", "stop", "vmsilo-netvm-vm.service"])
    assert app.stop(plan, plan.vms["netvm"], with_clients=True)
    ctl.done()
    assert ctl.calls == [
        ["systemctl", "stop", "vmsilo-banking-vm.service"],
        ["systemctl", "stop", "vmsilo-work-vm.service"],
        ["systemctl", "stop", "vmsilo-netvm-vm.service"],
    ]


def test_systemd_start_failure_is_a_vmsilo_error(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_of(FLEET)
    ctl = StrictRun(monkeypatch, systemd_lifecycle)
    ctl.expect(
        ["systemctl", "start", "vmsilo-work-vm.service"],
        returncode=1,
        stderr=b"Job failed. See journalctl.",
    )
    app = SystemdApp("/etc/vmsilo/vmsilo.toml", ["vmsilo-work-vm.service"])
    with pytest.raises(VmsiloError, match="Job failed") as e:
        app.start(plan, plan.vms["work"])
    ctl.done()
    assert e.value.hint is not None and "journalctl -u vmsilo-work-vm.service" in e.value.hint


def test_completion_lists_verbs_and_vms(cfg: Path, tmp_path: Path) -> None:
    """Source the installed completion and complete like bash would (real vmsilo helper)."""
    root = tmp_path / "croot"
    root.mkdir()
    vmsilo("-c", str(cfg), "install", "--root", str(root))
    script = root / "etc/bash_completion.d/vmsilo"
    # the helper runs the real vmsilo; its users come from the host, so use root's config
    root_cfg = tmp_path / "root.toml"
    root_cfg.write_text(FLEET.replace('user = "alice"', 'user = "root"'))
    probe = f"""
source {script}
COMP_WORDS=(vm-run --root ba); COMP_CWORD=2; _vmsilo_vm_tool; echo "run: ${{COMPREPLY[*]}}"
COMP_WORDS=(vm-run banking ech); COMP_CWORD=2; _vmsilo_vm_tool; echo "cmd: ${{COMPREPLY[*]}}"
COMP_WORDS=(vmsilo st); COMP_CWORD=1; _vmsilo; echo "verbs: ${{COMPREPLY[*]}}"
COMP_WORDS=(vmsilo -c {root_cfg} stop n); COMP_CWORD=4; _vmsilo; echo "vms: ${{COMPREPLY[*]}}"
COMP_WORDS=(vm-copy ba); COMP_CWORD=1; _vmsilo_vm_copy; echo "src: ${{COMPREPLY[*]}}"
COMP_WORDS=(vm-copy banking n); COMP_CWORD=2; _vmsilo_vm_copy; echo "dst: ${{COMPREPLY[*]}}"
COMP_WORDS=(vm-copy banking netvm n); COMP_CWORD=3; _vmsilo_vm_copy; echo "path: ${{COMPREPLY[*]}}"
COMP_WORDS=(vm-clipboard p); COMP_CWORD=1; _vmsilo_vm_clipboard; echo "clip: ${{COMPREPLY[*]}}"
COMP_WORDS=(vm-clipboard paste b); COMP_CWORD=2; _vmsilo_vm_clipboard
echo "into: ${{COMPREPLY[*]}}"
"""
    env = {**os.environ, "VMSILO_CONFIG": str(root_cfg)}
    p = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines())
    assert lines["run"] == "banking"
    assert "echo" in lines["cmd"].split()
    assert set(lines["verbs"].split()) == {"start", "stop", "status"}
    assert lines["vms"] == "netvm"
    assert (lines["src"], lines["dst"], lines["path"]) == ("banking", "netvm", "")
    assert (lines["clip"], lines["into"]) == ("paste", "banking")
    assert USERS("alice") is not None  # the in-process installs above planned for alice


def test_the_manifest_lives_in_the_configs_state_dir(tmp_path: Path, root: Path) -> None:
    """Issue 15.10: installed.json used to go to /var/lib/vmsilo whatever stateDir said."""
    cfg = tmp_path / "state.toml"
    cfg.write_text(FLEET.replace('user = "alice"', 'user = "alice"\nstateDir = "/srv/vmsilo"', 1))
    before = snapshot(root)
    vmsilo("-c", str(cfg), "install", "--root", str(root))
    assert (root / "srv/vmsilo/installed.json").is_file()
    assert not (root / MANIFEST).exists() and not (root / "var").exists()
    assert read_manifest(root, "/srv/vmsilo").config == str(cfg.resolve())
    vmsilo("-c", str(cfg), "uninstall", "--root", str(root))
    assert snapshot(root) == before
