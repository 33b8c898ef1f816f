"""Attacks SPEC §11.4: guest root is not host root in a share.

Guest root tries to plant privilege on the host through the shared home: device nodes
(``mknod``), a setuid/setgid copy of a shell it creates itself, and the guest user's own file
chowned to root and made setuid/setgid. Afterwards no device node and no setuid/setgid file
owned by anyone but the config's ``user`` exists in the share on the host; the guest user's
files still belong to ``user``.

The jail the C virtiofsd runs in (:mod:`vmsilo.host.userns`) is first attacked directly, without
a VM: the same operations, as the daemon would do them, from inside it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from userenv import desktop_config

VM = "rooter"
#: ids for the VM-less jail test: need not exist in /etc/passwd
JAIL_UID, JAIL_GID = 41234, 41235


def planted(tree: Path, uid: int, gid: int) -> list[str]:
    """Every host-side privilege a guest could have planted under ``tree``."""
    found = []
    for path in [tree, *tree.rglob("*")]:
        st = path.lstat()
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            found.append(f"{path}: device node {os.major(st.st_rdev)},{os.minor(st.st_rdev)}")
        if st.st_mode & stat.S_ISUID and st.st_uid != uid:
            found.append(f"{path}: setuid, owned by uid {st.st_uid}")
        if st.st_mode & stat.S_ISGID and not stat.S_ISDIR(st.st_mode) and st.st_gid != gid:
            found.append(f"{path}: setgid, group {st.st_gid}")
        if st.st_uid == 0 or st.st_gid == 0:
            found.append(f"{path}: owned by {st.st_uid}:{st.st_gid}")
    return found


# --- the jail itself, without a VM --------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user namespaces with foreign ids)")
def test_jail_is_the_user_and_only_over_the_users_files() -> None:
    d = Path(tempfile.mkdtemp(prefix="jail-", dir="/tmp"))
    try:
        d.chmod(0o755)  # the user must be able to reach the share, as on a real host
        share = d / "share"
        share.mkdir()
        os.chown(share, JAIL_UID, JAIL_GID)
        (d / "root-only").write_text("secret\n")
        (d / "root-only").chmod(0o600)
        script = f"""
set -u
cd {share}
echo "ids $(id -u):$(id -g)"
echo "map $(cat /proc/self/uid_map)"
cat {d}/root-only && echo "READ root-only"
touch mine && echo "made mine"
mknod dev-c c 1 1 && echo "MADE dev-c"
mknod dev-b b 8 0 && echo "MADE dev-b"
cp /bin/sh sh-copy && chmod 6755 sh-copy && echo "made setuid sh-copy"
chown 0:0 mine && echo "CHOWNED mine"
chown {JAIL_UID + 1} mine && echo "CHOWNED mine to a neighbour"
true
"""
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "vmsilo.host.virtiofsd",
                "jail",
                "--as",
                f"{JAIL_UID}:{JAIL_GID}",
                str(share),
                "--",
                "/bin/sh",
                "-c",
                script,
            ],
            capture_output=True,
            timeout=30,
        )
        out = p.stdout.decode()
        assert p.returncode == 0, p.stderr.decode()
        assert f"ids {JAIL_UID}:{JAIL_GID}" in out
        assert out.split("map ", 1)[1].split()[:3] == [str(JAIL_UID), str(JAIL_UID), "1"]
        assert "made mine" in out and "made setuid sh-copy" in out
        for refused in ("READ", "MADE", "CHOWNED"):
            assert refused not in out, out
        assert planted(share, JAIL_UID, JAIL_GID) == []
        st = (share / "mine").stat()
        assert (st.st_uid, st.st_gid) == (JAIL_UID, JAIL_GID)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- a real guest -------------------------------------------------------------------------------


@dataclass
class Install:
    config: Path
    run_dir: Path
    home: Path
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

    def as_root(self, script: str) -> subprocess.CompletedProcess[bytes]:
        return self.cmd("vm-run", "--root", VM, "sh", "-c", script)


@pytest.fixture(scope="module")
def inst(image: Any, state_dir: Path, host_user: pwd.struct_passwd) -> Iterator[Install]:
    run_dir = Path(f"/tmp/vmsilo-sr-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    shared_root = run_dir / "shared"
    config = run_dir / "vmsilo.toml"
    config.write_text(desktop_config(host_user.pw_name, state_dir, run_dir, VM))
    install = Install(config, run_dir, shared_root / VM, host_user.pw_uid, host_user.pw_gid)
    yield install
    install.cmd("vmsilo", "stop", VM)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.vm
def test_guest_root_plants_nothing_privileged_in_the_share(inst: Install) -> None:
    p = inst.cmd("vmsilo", "start", VM)
    assert p.returncode == 0, p.stderr.decode()
    h = "/home/user"

    # the guest user's own file, the target of the chown attack
    p = inst.cmd("vm-run", VM, "sh", "-c", f"echo mine > {h}/mine && id -u")
    assert (p.returncode, p.stdout) == (0, f"{inst.uid}\n".encode()), p.stderr

    attacks = [
        f"mknod {h}/dev-mem c 1 1",
        f"mknod {h}/dev-disk b 8 0",
        f"cat /bin/sh > {h}/rootshell; chmod 4755 {h}/rootshell",
        f"cat /bin/sh > {h}/rootgroup; chmod 2755 {h}/rootgroup",
        f"chown 0:0 {h}/mine; chmod 6755 {h}/mine",
        f"chmod u+s,g+s {h}/mine",
        f"mkdir {h}/d && chown 0:0 {h}/d && mknod {h}/d/null c 1 3",
    ]
    for script in attacks:
        inst.as_root(script)  # each may fail in the guest; only the host's view counts
    p = inst.as_root(f"ls -ln {h}")
    print(p.stdout.decode())

    assert inst.home.is_dir()
    assert planted(inst.home, inst.uid, inst.gid) == []
    st = (inst.home / "mine").stat()
    assert (st.st_uid, st.st_gid) == (inst.uid, inst.gid)
    assert (inst.home / "mine").read_text() == "mine\n"

    # the share still works for the guest user afterwards
    p = inst.cmd("vm-run", VM, "sh", "-c", f"echo after > {h}/after && cat {h}/after")
    assert (p.returncode, p.stdout) == (0, b"after\n"), p.stderr
    assert (inst.home / "after").stat().st_uid == inst.uid
