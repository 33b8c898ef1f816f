"""SPEC §11.5: another account on the host can neither deny nor take over a VM.

Attacks: a second account (``nobody``) tries to take a VM's lock (a shared lock held by anyone
used to keep the VM from starting — the lock was 0644), to read its state, plan snapshot and
console log, and to connect to its command and console sockets; it pre-creates a VM's lock in
a runtimeDir it can write to. And ``vmsilo doctor`` must refuse runtime/state directories that
other accounts could write into.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import run_vmsilo
from userenv import VM, Setup, user_vm
from vmsilo.errors import VmsiloError
from vmsilo.host.dirsafety import unsafe_dir
from vmsilo.supervisor.state import VmLock

NOBODY = pwd.getpwnam("nobody")

ATTACK = """
import fcntl, json, os, socket, sys
paths = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "done"
    except OSError as e:
        out[name] = e.__class__.__name__
def lock():
    fd = os.open(paths["lock"], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
def read(key):
    return lambda: open(paths[key], "rb").read(1)
def connect(key):
    def go():
        s = socket.socket(socket.AF_UNIX)
        s.connect(paths[key])
    return go
attempt("lock", lock)
for key in ("state", "snapshot", "console_log"):
    attempt("read " + key, read(key))
for key in ("command", "console"):
    attempt("connect " + key, connect(key))
print(json.dumps(out))
"""


def _attack(s: Setup, uid: int, gid: int, paths: dict[str, str]) -> dict[str, str]:
    code = ATTACK.replace("json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}", repr(paths))
    p = s.as_uid(uid, gid, code)
    assert p.returncode == 0, p.stderr
    result: dict[str, str] = json.loads(p.stdout)
    return result


@pytest.fixture(scope="module")
def setup(image: Any, state_dir: Path, host_user: pwd.struct_passwd) -> Iterator[Setup]:
    with user_vm(state_dir, host_user, "sec-users") as s:
        yield s


def _paths(s: Setup, state_dir: Path) -> dict[str, str]:
    r = s.run_dir
    return {
        "lock": f"{r}/{VM}.lock",
        "state": f"{r}/{VM}.state.json",
        "snapshot": f"{r}/{VM}.plan.json",
        "console_log": f"{state_dir}/{VM}-console.log",
        "command": f"{r}/{VM}-command.socket",
        "console": f"{r}/{VM}-console",
    }


@pytest.mark.vm
@pytest.mark.root
def test_another_account_gets_nothing_of_a_running_vm(setup: Setup, state_dir: Path) -> None:
    paths = _paths(setup, state_dir)
    got = _attack(setup, NOBODY.pw_uid, NOBODY.pw_gid, paths)
    assert got == {
        "lock": "PermissionError",
        "read state": "PermissionError",
        "read snapshot": "PermissionError",
        "read console_log": "PermissionError",
        "connect command": "PermissionError",
        "connect console": "PermissionError",
    }, got
    # the desktop user (the config's `user`) reads status and talks to its VM
    user = setup.user
    mine = _attack(setup, user.pw_uid, user.pw_gid, paths)
    assert mine["read state"] == mine["read snapshot"] == "done", mine
    assert mine["connect command"] == mine["connect console"] == "done", mine
    for key in ("lock", "state", "snapshot"):
        st = os.stat(paths[key])
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, user.pw_gid, 0o640), key
    assert setup.state()["state"] == "running"


@pytest.mark.root
def test_a_lock_file_root_did_not_create_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "vm.lock"
    lock.write_text("")
    os.chown(lock, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(VmsiloError, match=rf"belongs to uid {NOBODY.pw_uid}, not to vmsilo"):
        VmLock(lock).acquire("vm")
    mine = tmp_path / "mine.lock"
    held = VmLock(mine)
    held.acquire("vm", group=NOBODY.pw_gid)
    try:
        st = os.stat(mine)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == NOBODY.pw_gid
    finally:
        held.release()
    held.acquire("vm")
    try:
        assert stat.S_IMODE(os.stat(mine).st_mode) == 0o600  # no group: root only
    finally:
        held.release()


@pytest.mark.root
def test_directories_others_can_write_are_unsafe(tmp_path: Path) -> None:
    base = Path(
        subprocess.run(
            ["mktemp", "-d", "-p", "/tmp"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    try:
        base.chmod(0o755)
        assert unsafe_dir(base) is None
        assert unsafe_dir(base / "not" / "yet") is None  # only root can create them
        assert "another account could create /tmp/vmsilo-nope" in str(
            unsafe_dir("/tmp/vmsilo-nope/run")
        )
        base.chmod(0o777)
        assert unsafe_dir(base) == f"{base} is writable by other users"
        assert unsafe_dir(base / "run") == f"{base} is writable by other users"
        base.chmod(0o755)
        os.chown(base, NOBODY.pw_uid, NOBODY.pw_gid)
        assert unsafe_dir(base / "run") == f"{base} belongs to uid {NOBODY.pw_uid}, not root"
        # doctor fails on it, naming the key
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'user = "alice"\nruntimeDir = "{base}/run"\n[vms.a]\n')
        _, out, _ = run_vmsilo(["-c", str(cfg), "doctor", "--json"])
        finding = {f["check"]: f for f in json.loads(out)["findings"]}["runtimeDir"]
        assert finding["level"] == "fail" and "not safe" in finding["detail"]
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_check_warns_about_a_runtime_dir_others_could_create(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('user = "alice"\nruntimeDir = "/tmp/vmsilo-not-made-yet/run"\n[vms.a]\n')
    status, out, err = run_vmsilo(["-c", str(cfg), "check"])
    assert (status, out) == (0, "ok: 1 VM\n")
    assert err.startswith("warning: runtimeDir: /tmp/vmsilo-not-made-yet/run is not safe")
    assert "another account could create /tmp/vmsilo-not-made-yet first" in err
