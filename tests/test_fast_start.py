"""fastStart (SPEC §10, issue 14) on real QEMU guests: the first start boots and saves the ready
state, later cold starts restore it — each restore a new machine (its own randomness, a fresh
disposable root, the host's clock), a changed plan or a broken state boots instead."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from userenv import desktop_config
from vmenv import Install, qemu_install

VM_FS = """
[vms.fs]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
fastStart = true
"""


def saved_dirs(inst: Install, vm: str = "fs") -> list[Path]:
    root = inst.state_dir / vm / "saved"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def start(inst: Install, vm: str = "fs") -> dict[str, Any]:
    p = inst.cmd("vmsilo", "start", vm)
    assert p.returncode == 0, p.stderr
    return inst.status(vm)


def stop(inst: Install, vm: str = "fs") -> None:
    p = inst.cmd("vmsilo", "stop", vm)
    assert p.returncode == 0, p.stderr


def run(inst: Install, *argv: str, vm: str = "fs") -> str:
    p = inst.cmd("vm-run", "--root", vm, *argv)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.decode()


@pytest.fixture(scope="module")
def inst(image: Any, state_dir: Path) -> Iterator[Install]:
    with qemu_install(state_dir, "fast", VM_FS) as install:
        yield install


@pytest.mark.vm
def test_each_restore_is_a_new_machine(inst: Install) -> None:
    # the first start (a cold vm-run, whose session waits for it) boots and saves the ready
    # state before it serves that session: the file it writes is not in the saved disk
    p = inst.cmd("vm-run", "--root", "fs", "sh", "-c", "echo boot > /var/tmp/booted")
    assert p.returncode == 0, p.stderr
    st = inst.status("fs")
    assert st["state"] == "running" and st["restored"] is False
    [state] = saved_dirs(inst)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
    for f in state.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert f.stat().st_uid == 0
    meta = json.loads((state / "meta.json").read_text())
    stop(inst)

    seen: list[str] = []
    for _ in range(2):
        before = inst.launch_count()
        st = start(inst)
        assert st["restored"] is True, st
        assert inst.launch_count() == before + 1  # one QEMU: restored, not booted after all
        assert b"running (restored)" in inst.cmd("vmsilo", "status").stdout
        out = run(
            inst,
            "sh",
            "-c",
            "ls /var/tmp; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
            " echo restore > /var/tmp/restored-$$; date +%s.%N",
        )
        host_now = time.time()
        lines = out.splitlines()
        files, rand, guest_now = lines[:-2], lines[-2], float(lines[-1])
        # the disposable root is as saved: nothing of the boot run nor of an earlier restore
        assert not [f for f in files if f == "booted" or f.startswith("restored-")], files
        seen.append(rand)
        # the clock comes from the host, not from the saved state
        assert guest_now - meta["saved_at"] > 0.5
        assert abs(host_now - guest_now) < 2, (host_now, guest_now)
        kernel_log = run(inst, "dmesg")
        assert "EXT4-fs error" not in kernel_log and "EXT4-fs warning" not in kernel_log
        stop(inst)
    # randomness differs between two restores of the same state
    assert len(set(seen)) == 2 and all(len(r) == 64 for r in seen), seen
    assert saved_dirs(inst) == [state]


@pytest.mark.vm
def test_clock_after_a_state_saved_earlier(inst: Install) -> None:
    """A state saved 20 s before: the restored guest's clock is the host's (±2 s)."""
    if not saved_dirs(inst):
        start(inst)
        stop(inst)
    [state] = saved_dirs(inst)
    meta = json.loads((state / "meta.json").read_text())
    wait = 20 - (time.time() - meta["saved_at"])
    if wait > 0:
        time.sleep(wait)
    st = start(inst)
    assert st["restored"] is True
    guest = float(run(inst, "date", "+%s.%N"))
    assert abs(time.time() - guest) < 2
    stop(inst)


@pytest.mark.vm
def test_a_corrupted_state_boots_instead(inst: Install) -> None:
    if not saved_dirs(inst):
        start(inst)
        stop(inst)
    [state] = saved_dirs(inst)
    data = (state / "state").read_bytes()
    with (state / "state").open("r+b") as f:  # garble the middle of the RAM stream
        f.seek(len(data) // 2)
        f.write(os.urandom(1 << 16))
    t0 = time.monotonic()
    st = start(inst)
    assert st["state"] == "running" and st["restored"] is False
    assert time.monotonic() - t0 < 120
    assert run(inst, "echo", "hi") == "hi\n"
    stop(inst)
    # ... and saved anew: the next start restores
    [fresh] = saved_dirs(inst)
    assert (fresh / "state").read_bytes() != data
    st = start(inst)
    assert st["restored"] is True
    stop(inst)


@pytest.mark.vm
def test_a_changed_plan_boots_and_saves_a_new_state(inst: Install) -> None:
    if not saved_dirs(inst):
        start(inst)
        stop(inst)
    [old] = saved_dirs(inst)
    inst.config.write_text(inst.config.read_text().replace("memory = 512", "memory = 448"))
    st = start(inst)
    assert st["restored"] is False and st["memory"] == 448
    assert run(inst, "sh", "-c", "grep MemTotal /proc/meminfo")
    stop(inst)
    [new] = saved_dirs(inst)
    assert new != old and not old.exists()
    st = start(inst)
    assert st["restored"] is True
    stop(inst)


@pytest.mark.vm
def test_an_image_rebuild_boots_and_saves_a_new_state(inst: Install) -> None:
    """A rebuilt image is a new version directory that ``current`` points to (here: the same
    files, hard-linked, so the session's image stays what it was)."""
    if not saved_dirs(inst):
        start(inst)
        stop(inst)
    [old] = saved_dirs(inst)
    images = inst.state_dir / "images" / "default"
    current = images / "current"
    version = current.resolve()
    rebuilt = images / f"{version.name}-rebuilt"
    shutil.copytree(version, rebuilt, copy_function=os.link)
    current.unlink()
    current.symlink_to(rebuilt.name)
    try:
        st = start(inst)
        assert st["restored"] is False
        stop(inst)
        [new] = saved_dirs(inst)
        assert new != old
    finally:
        current.unlink()
        current.symlink_to(version.name)
        shutil.rmtree(rebuilt)


TMPFS_VM = """
[vms.fstmp]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
fastStart = true
rootOverlay.type = "tmpfs"
"""


@pytest.mark.vm
def test_tmpfs_root_and_an_unprivileged_qemu(image: Any, state_dir: Path, host_user: Any) -> None:
    """A tmpfs disposable root (in the saved RAM) starts as saved on every restore, and the
    hardening stays on: QEMU drops to the desktop user (``-runas``) and still saves and loads
    the state through the descriptors the supervisor hands it."""
    with qemu_install(state_dir, "fasttmp", TMPFS_VM) as inst:
        inst.config.write_text(
            inst.config.read_text().replace('user = "root"', f'user = "{host_user.pw_name}"')
        )
        start(inst, "fstmp")
        pid = inst.status("fstmp")["pid"]
        assert os.stat(f"/proc/{pid}").st_uid == host_user.pw_uid
        stop(inst, "fstmp")
        for _ in range(2):
            st = start(inst, "fstmp")
            log = (inst.run_dir / "fstmp.supervisor.log").read_text()
            assert st["restored"] is True, log[-2000:]
            pid = inst.status("fstmp")["pid"]
            assert os.stat(f"/proc/{pid}").st_uid == host_user.pw_uid
            out = run(inst, "sh", "-c", "ls /var/tmp; echo x > /var/tmp/mark-$$", vm="fstmp")
            assert "mark-" not in out
            stop(inst, "fstmp")


NET_VM = """
[vms.fsnet]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
fastStart = true
network.netvm = "host"
"""


@pytest.mark.vm
def test_network_after_a_restore(image: Any, state_dir: Path) -> None:
    with qemu_install(state_dir, "fastnet", NET_VM, netns=True) as inst:
        assert inst.netns is not None
        start(inst, "fsnet")
        stop(inst, "fsnet")
        st = start(inst, "fsnet")
        assert st["restored"] is True
        link = inst.cmd("vmsilo", "plan", "--json")
        plan = json.loads(link.stdout)
        [up] = plan["vms"]["fsnet"]["interfaces"]
        guest_ip = up["addresses"][0].split("/")[0]
        host_ip = up["routes"][0]["via"]
        ping = ["busybox", "ping", "-c", "1", "-W", "5"]
        p = inst.cmd("vm-run", "--root", "fsnet", *ping, host_ip)
        assert p.returncode == 0, p.stdout + p.stderr
        p = subprocess.run(
            ["ip", "netns", "exec", inst.netns, *ping, guest_ip], capture_output=True
        )
        assert p.returncode == 0, p.stdout + p.stderr
        stop(inst, "fsnet")


@pytest.mark.vm
def test_shares_are_plugged_in_after_every_start(
    image: Any, state_dir: Path, host_user: Any
) -> None:
    """QEMU 7.2 cannot migrate virtiofs devices: the saved machine has none, and after the
    boot (after the save) and after every restore the shares are hot-plugged and mounted
    before the VM is ready — the default shared home and a read-only share."""
    with qemu_install(state_dir, "fastshare", "") as inst:
        data = inst.run_dir / "data"
        data.mkdir()
        (data / "hello.txt").write_text("read-only hello\n")
        home = inst.run_dir / "shared" / "fsshare"
        inst.config.write_text(
            desktop_config(
                host_user.pw_name,
                state_dir,
                inst.run_dir,
                "fsshare",
                more="fastStart = true\n"
                f"[vms.fsshare.sharedDirectories.data]\n"
                f'path = "{data}"\nmountPoint = "/mnt/data"\nreadOnly = true\n',
            )
        )
        st = start(inst, "fsshare")
        assert st["restored"] is False
        (home / "one.txt").write_text("one\n")
        assert run(inst, "cat", "/home/user/one.txt", "/mnt/data/hello.txt", vm="fsshare") == (
            "one\nread-only hello\n"
        )
        stop(inst, "fsshare")
        for n in range(2):
            st = start(inst, "fsshare")
            log = (inst.run_dir / "fsshare.supervisor.log").read_text()
            assert st["restored"] is True, log[-3000:]
            (home / f"restore-{n}.txt").write_text(f"restore {n}\n")
            p = inst.cmd("vm-run", "fsshare", "sh", "-c", f"cat /home/user/restore-{n}.txt; id -u")
            assert p.stdout == f"restore {n}\n{host_user.pw_uid}\n".encode(), p.stderr
            p = inst.cmd("vm-run", "fsshare", "sh", "-c", "echo x > /mnt/data/new")
            assert p.returncode != 0  # still read-only
            p = inst.cmd("vm-run", "fsshare", "sh", "-c", f"echo g > /home/user/guest-{n}")
            assert p.returncode == 0, p.stderr
            assert (home / f"guest-{n}").stat().st_uid == host_user.pw_uid
            stop(inst, "fsshare")


def test_fast_start_refusals_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "vmsilo.toml"
    config.write_text(
        f"""
user = "root"
stateDir = "{tmp_path}"
runtimeDir = "{tmp_path}"
[vms.a]
hypervisor = "qemu"
fastStart = true
[vms.c]
fastStart = true
sharedHome = false
[vms.d]
hypervisor = "qemu"
fastStart = true
sharedHome = false
additionalDisks = [{{ path = "/srv/data.img" }}, {{ path = "/srv/ro.img", ro = true }}]
"""
    )
    p = subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vmsilo", "-c", str(config), "check"],
        capture_output=True,
    )
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert "vms.a" not in err  # shares are plugged in after the start
    # crosvm saves states too, but not its default sound device (its snapshot has none)
    assert "vms.c.sound.playback: fastStart with crosvm cannot save a VM with sound" in err
    assert "vms.d.additionalDisks[0]: fastStart cannot restore a VM with a writable disk" in err
    assert "additionalDisks[1]" not in err
    assert err.count("hint:") == 2
