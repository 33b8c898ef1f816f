"""fastStart under crosvm (SPEC §10) against tests/fake_crosvm: save, restore, fall back.

crosvm cannot run here; the fake checks every argv the supervisor runs against upstream
crosvm's grammar (``run --restore``, ``suspend --full``, ``snapshot take PATH``, ``resume
--full``), stops the guest (the real agent, SIGSTOP) while suspended, writes a snapshot that
records the machine's shape and refuses to restore one of another shape, and plays the
restored agent's memory (its hello held back, the host's restore line answered). What these
tests prove is the supervisor's side: when it saves (after the hello, before any session,
the guest paused while the disk is copied), what it restores (the saved disk, a fresh copy
each time; fresh entropy and the host's clock in the restore line), and that a restore that
fails or hangs ends in a boot, logged, never a hang. The guest agent's side of a restore is
proven on real QEMU in tests/test_fast_start.py; its raw ready tty in test_agent_unit.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crosvm_grammar import assert_valid
from test_crosvm_supervision import VM, CrosvmInstall, make_crosvm_install

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FAST = "fastStart = true"
DIRTY = b"written-by-the-first-restore"
DIRTY_AT = 1 << 20


@pytest.fixture
def fast(tmp_path: Path) -> Iterator[CrosvmInstall]:
    inst = make_crosvm_install(tmp_path / "i", FAST)
    try:
        yield inst
    finally:
        inst.cmd("vmsilo", "stop", VM)
        inst.close()


def saved_dir(cv: CrosvmInstall) -> Path:
    return cv.inst.state_dir / VM / "saved"


def start(cv: CrosvmInstall, **env: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``vmsilo start`` (returns once ready); the fake's launch and booted events."""
    started = cv.cmd("vmsilo", "start", VM, **env)
    assert started.returncode == 0, started.stderr
    launch = cv.next_event("launch")
    return launch, cv.next_event("booted")


def stop(cv: CrosvmInstall) -> None:
    stopped = cv.cmd("vmsilo", "stop", VM)
    assert stopped.returncode == 0, stopped.stderr
    cv.wait_supervisor_gone()


def vm_run(cv: CrosvmInstall, *argv: str) -> bytes:
    p = cv.cmd("vm-run", VM, *argv)
    if p.returncode != 0:
        ps = subprocess.run(["ps", "-eo", "pid,ppid,stat,etimes,args"], capture_output=True)
        agents = [line for line in ps.stdout.decode().splitlines() if "agent" in line]
        vsock = sorted((f.name, f.stat().st_ino) for f in cv.vsock_dir.iterdir())
        pytest.fail(f"{p.stderr!r}\nagents: {agents}\nvsock: {vsock}\n{supervisor_log(cv)}")
    return p.stdout


def supervisor_log(cv: CrosvmInstall) -> str:
    return (cv.inst.run_dir / f"{VM}.supervisor.log").read_text()


def first_start_saves(cv: CrosvmInstall) -> Path:
    """Boot, check the save the supervisor made before it called the VM ready; its state."""
    launch, booted = start(cv)
    assert "--restore" not in launch["argv"]
    assert booted["restored"] is False and booted["ephemeral"]["marker_found"] is False
    assert cv.next_event("suspend")["full"] is True
    snapshot = cv.next_event("snapshot")
    assert snapshot["suspended"] is True  # the guest was paused while its state was written
    assert cv.next_event("resume")["full"] is True
    (key,) = [d for d in saved_dir(cv).iterdir()]
    state = key / "state"
    assert Path(snapshot["path"]).name == "state"  # written beside, renamed into place
    assert (state / "fake-snapshot.json").is_file()
    for path in (saved_dir(cv), key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for name in ("meta.json", "ephemeral.raw"):
        assert stat.S_IMODE((key / name).stat().st_mode) == 0o600, name
    meta = json.loads((key / "meta.json").read_text())
    assert meta["state_bytes"] > 0 and meta["key"] == key.name
    # the disk was copied as the guest had it when saved (the fake's mark on its first block)
    with open(key / "ephemeral.raw", "rb") as f:
        assert f.read(21) == b"FAKE-CROSVM-EPHEMERAL"
    st = cv.status()
    assert st["state"] == "running" and st["restored"] is False
    return state


def test_first_start_saves_and_later_starts_restore_each_a_new_machine(
    fast: CrosvmInstall,
) -> None:
    state = first_start_saves(fast)
    assert vm_run(fast, "echo", "booted") == b"booted\n"
    stop(fast)

    entropies = []
    for n in (1, 2):
        before = time.time_ns()
        launch, booted = start(fast)
        argv = launch["argv"]
        assert_valid(argv)  # (the fake refused it otherwise; here: the restore is in it)
        assert argv[argv.index("--restore") + 1] == str(state)
        assert argv[-1] == str(fast.inst.root / "vmlinuz")
        assert booted["restored"] is True
        # the disposable disk is a fresh copy of the saved one, never what a restore left
        assert booted["ephemeral"]["marker_found"] is True
        with open(fast.disk, "rb") as f:
            f.seek(DIRTY_AT)
            assert f.read(len(DIRTY)) != DIRTY, f"restore {n} got the previous run's disk"
        restored = fast.next_event("restored")
        assert len(bytes.fromhex(restored["entropy"])) == 32
        assert before <= restored["time_ns"] <= time.time_ns()  # the host's clock, now
        entropies.append(restored["entropy"])
        st = fast.status()
        assert st["state"] == "running" and st["restored"] is True, st
        assert st["fast_start_note"] is None
        assert vm_run(fast, "echo", f"restored {n}") == f"restored {n}\n".encode()
        # a restore saves nothing: the state is the first boot's
        assert not [e for e in fast.seen if e["event"] == "snapshot" and e["pid"] == booted["pid"]]
        with open(fast.disk, "r+b") as f:  # what the guest writes to its disposable root
            f.seek(DIRTY_AT)
            f.write(DIRTY)
        listed = fast.cmd("vmsilo", "status", VM)
        assert b"running (restored)" in listed.stdout, listed.stdout
        stop(fast)
    assert entropies[0] != entropies[1]


def test_a_snapshot_that_does_not_restore_boots_and_saves_anew(fast: CrosvmInstall) -> None:
    state = first_start_saves(fast)
    stop(fast)
    (state / "fake-snapshot.json").write_text('{"shape": "another machine"}')
    started = fast.cmd("vmsilo", "start", VM)
    assert started.returncode == 0, started.stderr
    assert "--restore" in fast.next_event("launch")["argv"]
    assert fast.next_event("exit")["code"] == 1  # crosvm could not restore it
    launch, booted = start_events_only(fast)
    assert "--restore" not in launch["argv"]
    assert booted["restored"] is False and booted["ephemeral"]["marker_found"] is False
    assert fast.next_event("snapshot")["suspended"] is True  # saved anew
    assert vm_run(fast, "echo", "ok") == b"ok\n"
    st = fast.status()
    assert st["state"] == "running" and st["restored"] is False
    assert "did not restore (crosvm exit status 1): booted instead" in st["fast_start_note"]
    log = supervisor_log(fast)
    assert "restoring the saved state failed" in log and "booting instead" in log
    assert (state / "fake-snapshot.json").read_text() != '{"shape": "another machine"}'


def start_events_only(cv: CrosvmInstall) -> tuple[dict[str, Any], dict[str, Any]]:
    """The launch and booted events of the VMM started next (the start already returned)."""
    return cv.next_event("launch"), cv.next_event("booted")


def test_a_restore_that_hangs_boots_within_the_start_timeout(tmp_path: Path) -> None:
    cv = make_crosvm_install(tmp_path / "i", f"{FAST}\nstartTimeout = 4")
    try:
        first_start_saves(cv)
        stop(cv)
        t0 = time.monotonic()
        started = cv.cmd("vmsilo", "start", VM, FAKE_CROSVM_RESTORE_HANG="1")
        took = time.monotonic() - t0
        assert started.returncode == 0, started.stderr
        hung = cv.next_event("booted")
        assert hung["restored"] is True
        asked = [cv.next_event("restored")]
        launch, booted = start_events_only(cv)
        asked += [e for e in cv.seen if e["event"] == "restored" and e is not asked[0]]
        assert all(e["hang"] for e in asked)
        # the restore line was said again while unanswered (every 3 s within the 4 s)
        assert len(asked) >= 2, asked
        assert "--restore" not in launch["argv"] and booted["restored"] is False
        assert vm_run(cv, "echo", "booted") == b"booted\n"
        assert "not ready within 4 s" in supervisor_log(cv)
        # never a hang: the restore's 4 s, then a boot (the fake's is quick), not more
        assert took < 4 + 25, took
        st = cv.status()
        assert st["restored"] is False and st["state"] == "running"
        assert "did not restore (not ready within 4 s)" in st["fast_start_note"]
    finally:
        cv.cmd("vmsilo", "stop", VM)
        cv.close()


def test_a_changed_plan_boots_and_replaces_the_state(fast: CrosvmInstall) -> None:
    first_start_saves(fast)
    (old,) = list(saved_dir(fast).iterdir())
    stop(fast)
    config = fast.inst.config
    config.write_text(config.read_text().replace("memory = 64", "memory = 96"))
    launch, booted = start(fast)
    assert "--restore" not in launch["argv"] and booted["restored"] is False
    fast.next_event("snapshot")
    (new,) = list(saved_dir(fast).iterdir())
    assert new.name != old.name


def test_restore_argv_is_upstream_crosvm(tmp_path: Path) -> None:
    """``--restore`` goes before the kernel; the rest is the booting argv, unchanged."""
    cv = make_crosvm_install(tmp_path / "i", FAST)
    try:
        shown = cv.cmd("vmsilo", "argv", VM)
        assert shown.returncode == 0, shown.stderr
        boot = json.loads(shown.stdout)
        from vmsilo.backends.crosvm import crosvm_argv
        from vmsilo.config.load import load_config
        from vmsilo.plan.build import build_plan

        plan = build_plan(load_config(cv.inst.config))
        restore = crosvm_argv(plan, plan.vms[VM], restore="/s/state")
        assert_valid(restore)
        assert restore == [*boot[:-1], "--restore", "/s/state", boot[-1]]
    finally:
        cv.close()


def test_crosvm_fast_start_refuses_what_its_snapshot_cannot_hold(tmp_path: Path) -> None:
    config = tmp_path / "vmsilo.toml"
    config.write_text(
        f"""
user = "root"
stateDir = "{tmp_path}"
runtimeDir = "{tmp_path}"
[vms.ok]
fastStart = true
sharedHome = false
sound = {{ playback = false }}
[vms.home]
fastStart = true
sound = {{ playback = false }}
[vms.dirs]
fastStart = true
sharedHome = false
sound = {{ playback = false }}
sharedDirectories.docs = {{ path = "{tmp_path}", mountPoint = "/mnt/docs" }}
[vms.snd]
fastStart = true
sharedHome = false
"""
    )
    p = subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vmsilo", "-c", str(config), "check"],
        capture_output=True,
    )
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert "vms.ok" not in err
    assert "vms.home.sharedHome: fastStart with crosvm cannot keep the share 'home'" in err
    assert "vms.dirs.sharedDirectories.docs: fastStart with crosvm cannot keep the share" in err
    assert "vms.snd.sound.playback: fastStart with crosvm cannot save a VM with sound" in err
    assert "(crosvm's default)" in err
    assert err.count("hint:") == 3


def test_a_save_that_fails_leaves_the_vm_running_and_resumed(fast: CrosvmInstall) -> None:
    """crosvm refuses the snapshot (upstream's is experimental: a device may not support
    it): the guest is resumed at once, the VM serves sessions, nothing is saved, the next
    start boots (and tries again) — logged and shown in ``status``, never a paused VM."""
    for _ in range(2):
        launch, _ = start(fast, FAKE_CROSVM_SNAPSHOT_FAIL="1")
        assert "--restore" not in launch["argv"]
        assert fast.next_event("suspend")["full"] is True
        assert fast.next_event("snapshot-failed")["suspended"] is True
        assert fast.next_event("resume")["full"] is True
        assert vm_run(fast, "echo", "running") == b"running\n"
        assert not list(saved_dir(fast).iterdir())
        assert "saving the ready state failed" in supervisor_log(fast)
        st = fast.status()
        assert st["state"] == "running" and st["restored"] is False
        assert st["fast_start_note"].startswith("saving the ready state failed"), st
        listed = fast.cmd("vmsilo", "status", VM).stdout.decode()
        assert f"! {VM}: fastStart: saving the ready state failed" in listed, listed
        stop(fast)


def test_a_failed_resume_is_reported_with_the_failure_before_it() -> None:
    from vmsilo.backends.vmm import ResumeFailed, resumed_after

    def resume_fails() -> None:
        raise OSError("resume refused")

    failed = pytest.raises(ResumeFailed, match=r"resume refused \(after: snapshot refused\)")
    with failed, resumed_after(resume_fails, (OSError,)):
        raise OSError("snapshot refused")
    with (
        pytest.raises(ResumeFailed, match=r"^resume refused$"),
        resumed_after(resume_fails, (OSError,)),
    ):
        pass
    resumed: list[bool] = []
    not_saved = pytest.raises(ValueError, match="snapshot refused")
    with not_saved, resumed_after(lambda: resumed.append(True), (OSError,)):
        raise ValueError("snapshot refused")
    assert resumed == [True]
