"""virtiofs shares on a real QEMU guest: the shared home and a read-only share.

Driven through the product CLI (`vmsilo start`, `vm-run`, `vmsilo stop`) like test_vm_e2e.
The config's `user` is a throw-away host account created here (uid != 0), so "files the guest
creates belong to `user` on the host" is a real check and not root-owns-everything.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from userenv import desktop_config

pytestmark = pytest.mark.vm

VM = "sharer"


@dataclass
class Install:
    config: Path
    run_dir: Path
    home: Path  # host side of the shared home
    data: Path  # host side of the read-only share
    uid: int
    gid: int

    def cmd(
        self, tool: str, *args: str, timeout: float = 180
    ) -> subprocess.CompletedProcess[bytes]:
        module = {"vmsilo": "vmsilo.cli.vmsilo", "vm-run": "vmsilo.cli.vm_run"}[tool]
        env = dict(os.environ, VMSILO_CONFIG=str(self.config))
        return subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, timeout=timeout, env=env
        )

    def start(self) -> float:
        t = time.monotonic()
        p = self.cmd("vmsilo", "start", VM)
        assert p.returncode == 0, p.stderr.decode()
        return time.monotonic() - t

    def status(self) -> dict[str, Any]:
        p = self.cmd("vmsilo", "status", VM, "--json")
        assert p.returncode == 0, p.stderr
        data: dict[str, Any] = json.loads(p.stdout)["vms"][0]
        return data


@pytest.fixture(scope="module")
def inst(image: Any, state_dir: Path, host_user: pwd.struct_passwd) -> Iterator[Install]:
    run_dir = Path(f"/tmp/vmsilo-sh-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    shared_root = run_dir / "shared"
    data = run_dir / "data"
    data.mkdir()
    (data / "hello.txt").write_text("read-only hello\n")
    config = run_dir / "vmsilo.toml"
    config.write_text(
        desktop_config(
            host_user.pw_name,
            state_dir,
            run_dir,
            VM,
            more=f"[vms.{VM}.sharedDirectories.data]\n"
            f'path = "{data}"\nmountPoint = "/mnt/data"\nreadOnly = true\n',
        )
    )
    install = Install(config, run_dir, shared_root / VM, data, host_user.pw_uid, host_user.pw_gid)
    yield install
    install.cmd("vmsilo", "stop", VM)
    shutil.rmtree(run_dir, ignore_errors=True)


def test_shared_home_and_read_only_share(inst: Install) -> None:
    # a file the host user left in the home before the VM existed
    inst.home.mkdir(parents=True)
    os.chown(inst.home, inst.uid, inst.gid)
    (inst.home / "from-host.txt").write_text("host says hi\n")
    os.chown(inst.home / "from-host.txt", inst.uid, inst.gid)

    took = inst.start()
    print(f"[shares] boot with two shares: {took:.1f} s")

    # reads through both shares
    p = inst.cmd("vm-run", VM, "cat", "/home/user/from-host.txt")
    assert (p.returncode, p.stdout) == (0, b"host says hi\n"), p.stderr
    p = inst.cmd("vm-run", VM, "cat", "/mnt/data/hello.txt")
    assert (p.returncode, p.stdout) == (0, b"read-only hello\n"), p.stderr

    # the read-only share refuses writes, even from guest root after a rw remount: the host
    # side (virtiofsd --readonly, or a read-only bind in its mount namespace) enforces it
    p = inst.cmd("vm-run", VM, "sh", "-c", "echo x > /mnt/data/new")
    assert p.returncode != 0
    p = inst.cmd(
        "vm-run",
        "--root",
        VM,
        "sh",
        "-c",
        "busybox mount -o remount,rw /mnt/data; echo x > /mnt/data/new2",
    )
    assert p.returncode != 0, p.stdout
    p = inst.cmd("vm-run", "--root", VM, "touch", "/mnt/data/hello.txt")
    assert p.returncode != 0
    assert sorted(os.listdir(inst.data)) == ["hello.txt"]

    # what the guest user creates in the home is the host user's
    p = inst.cmd("vm-run", VM, "sh", "-c", "echo made > /home/user/made-in-guest && id -u")
    assert (p.returncode, p.stdout) == (0, f"{inst.uid}\n".encode()), p.stderr
    made = inst.home / "made-in-guest"
    assert made.read_text() == "made\n"
    st = made.stat()
    assert (st.st_uid, st.st_gid) == (inst.uid, inst.gid)
    assert st.st_uid != 0

    # the home survives a restart, the root file system does not
    p = inst.cmd("vm-run", "--root", VM, "sh", "-c", "echo x > /marker")
    assert p.returncode == 0, p.stderr
    p = inst.cmd("vmsilo", "stop", VM)
    assert p.returncode == 0, p.stderr
    assert inst.status()["state"] == "stopped"
    assert not list(inst.run_dir.glob(f"{VM}-virtiofsd-*.socket"))
    inst.start()
    p = inst.cmd("vm-run", VM, "cat", "/home/user/made-in-guest")
    assert (p.returncode, p.stdout) == (0, b"made\n"), p.stderr
    p = inst.cmd("vm-run", VM, "test", "-e", "/marker")
    assert p.returncode == 1


def test_no_virtiofsd_left_after_stop(inst: Install) -> None:
    if inst.status()["state"] != "running":
        inst.start()
    sup = inst.status()
    assert sup["state"] == "running"
    daemons = _virtiofsd_pids(str(inst.run_dir))
    assert daemons, "a running VM with shares has virtiofsd processes"
    p = inst.cmd("vmsilo", "stop", VM)
    assert p.returncode == 0, p.stderr
    assert not [pid for pid in daemons if Path(f"/proc/{pid}").exists()]
    assert _virtiofsd_pids(str(inst.run_dir)) == []  # nor any respawned at shutdown


def _virtiofsd_pids(marker: str) -> list[int]:
    """virtiofsd processes serving a share under ``marker`` (their argv names the dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"virtiofsd" in a for a in argv[:4]) and any(marker.encode() in a for a in argv):
            pids.append(int(d.name))
    return pids
