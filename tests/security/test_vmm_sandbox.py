"""Attacks SPEC §11.7: the VMM and the VM service run sandboxed.

A guest that escapes into its VMM must land in an unprivileged, seccomp-filtered process, and
the VM service must be hardened: ``systemd-analyze security`` rates the rendered
``vmsilo-<vm>-vm.service`` (for a VM with every host-touching feature there is today: host NAT,
a writable and a read-only share) at an exposure of at most 6.0 — the test reads the number.
On a real QEMU guest started by the supervisor (as root), QEMU runs as the config's ``user``
under seccomp filter mode and the guest still works.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import plan_of
from userenv import desktop_config
from vmsilo.backends.base import HostFacts
from vmsilo.backends.qemu_backend import QEMU
from vmsilo.host.units import SYSTEMD_DIR, render_host_files

MAX_EXPOSURE = 6.0
VM = "boxed"

#: SPEC §11.7: measured on a VM with windows (QEMU's default), sound and fastStart on.
HOSTILE = """
user = "alice"
[vms.exposed]
hypervisor = "qemu"
network.netvm = "host"
fastStart = true
sound.playback = true
[vms.exposed.sharedDirectories.data]
path = "/srv/data"
mountPoint = "/mnt/data"
readOnly = true
"""


def test_qemu_is_seccomp_filtered_and_drops_to_the_user() -> None:
    plan = plan_of(HOSTILE)
    vm = plan.vms["exposed"]
    argv = QEMU.argv(plan, vm, HostFacts(runas=(1000, 1001)))
    sandbox = argv[argv.index("-sandbox") + 1].split(",")
    assert sandbox[0] == "on"
    for group in ("obsolete", "spawn", "resourcecontrol"):
        assert f"{group}=deny" in sandbox
    assert argv[argv.index("-runas") + 1] == "1000:1001"
    # not root: no -runas (an unprivileged QEMU has nothing to drop), still filtered
    plain = QEMU.argv(plan, vm, HostFacts(runas=None))
    assert "-runas" not in plain and "-sandbox" in plain


def exposure(root: Path, unit: str) -> float:
    p = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", unit],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout + p.stderr)
    assert found, p.stdout + p.stderr
    return float(found.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_vm_service_exposure_is_at_most_6(tmp_path: Path) -> None:
    plan = plan_of(HOSTILE)
    root = tmp_path / "root"
    files = render_host_files(plan, ["/usr/local/bin/vmsilo"], "/etc/vmsilo/vmsilo.toml")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    vm = plan.vms["exposed"]
    assert vm.gpu is not None and vm.gpu.wayland and vm.sound.playback and vm.fast_start
    unit = vm.service_unit
    assert (root / SYSTEMD_DIR / unit).exists()
    level = exposure(root, unit)
    print(f"[security] {unit}: exposure {level}")
    assert level <= MAX_EXPOSURE


# --- a real guest -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(image: Any, state_dir: Path, host_user: pwd.struct_passwd) -> Iterator[Path]:
    run_dir = Path(f"/tmp/vmsilo-sb-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    path = run_dir / "vmsilo.toml"
    path.write_text(desktop_config(host_user.pw_name, state_dir, run_dir, VM))
    yield path
    vmsilo(path, "stop", VM)
    shutil.rmtree(run_dir, ignore_errors=True)


def vmsilo(
    config: Path, *args: str, tool: str = "vmsilo.cli.vmsilo"
) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, VMSILO_CONFIG=str(config))
    return subprocess.run(
        [sys.executable, "-m", tool, *args], capture_output=True, timeout=180, env=env
    )


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor drops QEMU's root only as root")
def test_qemu_runs_as_the_user_under_seccomp(config: Path, host_user: pwd.struct_passwd) -> None:
    p = vmsilo(config, "start", VM)
    assert p.returncode == 0, p.stderr.decode()
    p = vmsilo(config, "status", VM, "--json")
    pid = json.loads(p.stdout)["vms"][0]["pid"]
    assert isinstance(pid, int)
    st = proc_status(pid)
    assert "qemu" in Path(f"/proc/{pid}/exe").resolve().name
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    assert uids == {host_user.pw_uid}, st["Uid"]
    assert gids == {host_user.pw_gid}, st["Gid"]
    assert st["Groups"].split() in ([], [str(host_user.pw_gid)])
    assert st["CapEff"] == st["CapPrm"] == "0000000000000000"
    assert st["Seccomp"] == "2"  # filter mode
    # the guest works: commands, and a graceful power-off through QMP
    run = vmsilo(config, VM, "echo", "ok", tool="vmsilo.cli.vm_run")
    assert (run.returncode, run.stdout) == (0, b"ok\n"), run.stderr
    p = vmsilo(config, "stop", VM)
    assert p.returncode == 0, p.stderr.decode()
    p = vmsilo(config, "status", VM, "--json")
    assert json.loads(p.stdout)["vms"][0]["state"] == "stopped"
    assert not Path(f"/proc/{pid}").exists()


def test_writable_paths_keep_awkward_names() -> None:
    """ProtectSystem=strict leaves exactly runtimeDir, stateDir, rw shares and (windows) the
    user's runtime dir writable, even with blanks, ``%`` or ``$`` in their names (a path-list
    setting expands no ``$``)."""
    plan = plan_of(
        """
user = "alice"
runtimeDir = "/run/vm silo %h"
stateDir = "/var/lib/vm silo $HOME"
[vms.work]
"""
    )
    text = render_host_files(plan, ["/usr/bin/vmsilo"], "/x.toml")[
        f"{SYSTEMD_DIR}/{plan.vms['work'].service_unit}"
    ]
    line = next(x for x in text.splitlines() if x.startswith("ReadWritePaths="))
    assert line == (
        'ReadWritePaths="-/run/vm silo %%h" "-/var/lib/vm silo $HOME" -/shared/work -/run/user/1000'
    )


def test_runas_only_from_root_to_someone_else(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsilo.backends import qemu_backend

    plan = plan_of(HOSTILE)
    monkeypatch.setattr(qemu_backend.os, "geteuid", lambda: 0)
    assert qemu_backend.runas_ids(plan) == (plan.user.uid, plan.user.gid)
    monkeypatch.setattr(qemu_backend.os, "geteuid", lambda: 1000)
    assert qemu_backend.runas_ids(plan) is None
    # a root desktop user: QEMU refuses -runas 0:0, and there is nothing to drop to
    monkeypatch.setattr(qemu_backend.os, "geteuid", lambda: 0)
    as_root = dataclasses.replace(plan, user=dataclasses.replace(plan.user, uid=0, gid=0))
    assert qemu_backend.runas_ids(as_root) is None
