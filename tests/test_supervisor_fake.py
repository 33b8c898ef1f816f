"""The supervisor, autostart, relay and stop paths against a fake VMM (fast, no VM).

tests/fake_qemu.py plays QEMU: it connects to the supervisor's sockets like QEMU's chardevs and
runs the real guest agent on the host. The same behaviours are proven on real QEMU in
tests/test_vm_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fakevm import FakeInstall, make_fake_install

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeInstall]:
    inst = make_fake_install(tmp_path / "inst", "[vms.fake]\n@VM@")
    yield inst
    inst.cmd("vmsilo", "stop", "fake", timeout=60)


def test_start_run_status_stop(fake: FakeInstall) -> None:
    assert fake.status("fake")["state"] == "stopped"
    started = fake.cmd("vmsilo", "start", "fake")
    assert started.returncode == 0, started.stderr
    st = fake.status("fake")
    assert st["state"] == "running"
    assert st["pid"] and st["uptime_s"] is not None and st["id"] == 3
    disk = fake.state_dir / "fake-ephemeral.raw"
    assert disk.exists()
    assert disk.stat().st_size == 10 << 30 and disk.stat().st_blocks == 0  # sparse
    run = fake.cmd("vm-run", "fake", "sh", "-c", 'printf "%s|" "$@"; exit 3', "x", "a b", "")
    assert (run.returncode, run.stdout) == (3, b"a b||")
    stop = fake.cmd("vmsilo", "stop", "fake")
    assert stop.returncode == 0, stop.stderr
    st = fake.status("fake")
    assert st["state"] == "stopped" and st["last_exit"]["cause"] == "stop"
    assert st["last_exit"]["reason"] == "stopped on request (power button)"
    assert not disk.exists()
    assert not (fake.run_dir / "fake-command.socket").exists()
    assert not (fake.run_dir / "fake.plan.json").exists()


def test_concurrent_vm_runs_on_a_stopped_vm_start_exactly_one(fake: FakeInstall) -> None:
    def one(i: int) -> tuple[int, bytes]:
        p = fake.cmd("vm-run", "fake", "echo", f"hello {i}")
        return p.returncode, p.stdout + p.stderr

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    assert [r[0] for r in results] == [0] * 10, results
    assert sorted(r[1] for r in results) == sorted(f"hello {i}\n".encode() for i in range(10))
    assert fake.launch_count() == 1


def test_vmm_killed_marks_failed_and_cleans_up(fake: FakeInstall) -> None:
    assert fake.cmd("vmsilo", "start", "fake").returncode == 0
    pid = fake.status("fake")["pid"]
    os.kill(pid, signal.SIGKILL)
    # the supervisor exits after its cleanup; waiting on its lock is how `stop` waits too
    from vmsilo.supervisor.state import wait_unlocked

    wait_unlocked(fake.run_dir / "fake.lock")
    st = fake.status("fake")
    assert st["state"] == "failed"
    assert "SIGKILL" in st["last_exit"]["reason"]
    assert not (fake.state_dir / "fake-ephemeral.raw").exists()
    assert not (fake.run_dir / "fake-channel.socket").exists()


def test_guest_poweroff_is_a_clean_stop(fake: FakeInstall) -> None:
    assert fake.cmd("vmsilo", "start", "fake").returncode == 0
    # the fake guest powers off when its agent exits; make the agent exit
    run = fake.cmd("vm-run", "fake", "sh", "-c", "kill -TERM $PPID")
    from vmsilo.supervisor.state import wait_unlocked

    wait_unlocked(fake.run_dir / "fake.lock")
    st = fake.status("fake")
    assert st["state"] in ("stopped", "failed"), st
    assert run.returncode != 0 or st["state"] == "stopped"
    assert not (fake.state_dir / "fake-ephemeral.raw").exists()


def test_start_failure_is_reported_to_vm_run(tmp_path: Path) -> None:
    inst = make_fake_install(tmp_path / "inst", "[vms.broken]\n@VM@")
    (inst.root / "vmlinuz").unlink()
    run = inst.cmd("vm-run", "broken", "true")
    assert run.returncode == 255
    assert b"missing" in run.stderr and b"vmlinuz" in run.stderr
    assert b"Traceback" not in run.stderr
    assert inst.status("broken")["state"] == "failed"


def test_vmm_crash_at_start_is_reported(tmp_path: Path) -> None:
    inst = make_fake_install(tmp_path / "inst", "[vms.crashy]\n@VM@")
    run = inst.cmd("vm-run", "crashy", "true", env=inst.env(FAKE_QEMU_FAIL="7"))
    assert run.returncode == 255
    assert b"exit status 7" in run.stderr
    st = inst.status("crashy")
    assert st["state"] == "failed" and "exit status 7" in st["last_exit"]["reason"]


def test_vm_run_usage_and_unknown_vm(fake: FakeInstall) -> None:
    p = fake.cmd("vm-run", "nosuch", "true")
    assert p.returncode == 255 and b"Available VMs: fake" in p.stderr
    p = fake.cmd("vm-run", "fake")
    assert p.returncode == 255 and b"expected a VM name and a command" in p.stderr
    p = fake.cmd("vm-run", "--no-autostart", "fake", "true")
    assert p.returncode == 255 and b"not running" in p.stderr
    assert fake.launch_count() == 0


def test_vm_start_and_vm_stop_tools(fake: FakeInstall) -> None:
    p = fake.cmd("vm-start", "fake")
    assert p.returncode == 0, p.stderr
    assert fake.status("fake")["state"] == "running"
    p = fake.cmd("vm-start", "nosuch")
    assert p.returncode == 1 and b"Unknown VM: nosuch" in p.stderr
    p = fake.cmd("vm-stop", "fake")
    assert p.returncode == 0, p.stderr
    assert fake.status("fake")["state"] == "stopped"
    p = fake.cmd("vm-stop")
    assert p.returncode == 1 and b"Usage: vm-stop" in p.stderr


def test_netvm_stop_refused_while_clients_run(tmp_path: Path) -> None:
    inst = make_fake_install(
        tmp_path / "inst",
        "[vms.gw]\n@VM@\nnetwork = { isNetvm = true }\n"
        "[vms.client]\n@VM@\nnetwork = { netvm = 'gw' }\n",
    )
    try:
        p = inst.cmd("vmsilo", "start", "client")
        assert p.returncode == 0, p.stderr
        assert inst.status("gw")["state"] == "running"  # started first, for its client
        p = inst.cmd("vm-stop", "gw")
        assert p.returncode == 1 and b"client" in p.stderr
        p = inst.cmd("vm-stop", "--force", "gw")
        assert p.returncode == 0, p.stderr
        assert inst.status("client")["state"] == "stopped"
        assert inst.status("gw")["state"] == "stopped"
    finally:
        inst.cmd("vmsilo", "stop", "--force", "gw")


def test_escape_sequences_filtered_only_on_a_terminal(fake: FakeInstall) -> None:
    import pty

    p = fake.cmd("vm-run", "fake", "printf", "\\033]0;pwned\\007ok")
    assert p.stdout == b"\x1b]0;pwned\x07ok"  # a pipe gets the exact bytes
    master, slave = pty.openpty()
    try:
        p = fake.cmd("vm-run", "fake", "printf", "\\033]0;pwned\\007ok", stdout=slave)
        assert p.returncode == 0
        os.set_blocking(master, False)
        shown = os.read(master, 4096)
    finally:
        os.close(master)
        os.close(slave)
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert shown.replace(b"\r\n", b"\n") == b"_]0;pwned_ok"


def test_guest_agent_of_another_protocol_version(fake: FakeInstall) -> None:
    env = fake.env(FAKE_AGENT_VERSION="99")
    p = fake.cmd("vm-run", "fake", "true", env=env)
    assert p.returncode == 255
    assert b"rebuild the image" in p.stderr
    assert b"99" in p.stderr


def test_status_flags_a_config_changed_since_start(fake: FakeInstall) -> None:
    assert fake.cmd("vmsilo", "start", "fake").returncode == 0
    assert fake.status("fake")["config_changed"] is False
    fake.config.write_text(fake.config.read_text().replace("memory = 64", "memory = 96"))
    st = fake.status("fake")
    # issue 15.5: what runs is the truth; the config's new value is shown as such
    assert st["config_changed"] is True and st["memory"] == 64
    assert st["config_values"] == {"memory": 96} and "memory" in st["config_changes"]
    # runtime actions still use what runs: stop finds the VM through its snapshot
    assert fake.cmd("vmsilo", "stop", "fake").returncode == 0
    assert fake.status("fake")["state"] == "stopped"


def sharing_install(tmp_path: Path, virtiofsd_script: str) -> tuple[FakeInstall, dict[str, str]]:
    """A fake install with VM ``sharing`` (one share) whose virtiofsd is ``virtiofsd_script``;
    the environment that puts that daemon first in PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    daemon = bin_dir / "virtiofsd"
    daemon.write_text(virtiofsd_script)
    daemon.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    inst = make_fake_install(
        tmp_path / "inst",
        f"[vms.sharing]\n@VM@\n[vms.sharing.sharedDirectories.data]\npath = '{data}'\n"
        "mountPoint = '/mnt/data'\n",
    )
    return inst, inst.env(PATH=f"{bin_dir}:{os.environ['PATH']}")


FAILING_VIRTIOFSD = """#!/bin/sh
case "$*" in *--help*) echo "--shared-dir --fd --readonly --translate-uid --translate-gid"
    exit 0;; esac
echo "fuse: unknown option(s): -o bogus" >&2
exit 1
"""


def test_a_share_daemon_that_dies_fails_the_start_with_its_message(tmp_path: Path) -> None:
    """virtiofsd starts after the VMM (which waits on the share's pre-bound socket): if it dies,
    the start fails with the daemon's own words and the waiting VMM is not left behind."""
    inst, env = sharing_install(tmp_path, FAILING_VIRTIOFSD)
    run = inst.cmd("vm-run", "sharing", "true", env=env)
    assert run.returncode == 255, run.stderr
    assert b"virtiofsd for share data of VM sharing" in run.stderr
    assert b"unknown option" in run.stderr and b"Traceback" not in run.stderr
    # vm-run hears the failure as soon as it is known; the supervisor then cleans up and
    # ends (bounded): what it leaves is checked once it is gone
    from vmsilo.lifecycle.embedded import wait_unlocked_for

    assert wait_unlocked_for(str(inst.run_dir / "sharing.lock"), 30), "supervisor still running"
    st = inst.status("sharing")
    assert st["state"] == "failed" and "unknown option" in st["last_exit"]["reason"]
    # the VMM had started (and waited on the share's socket); it is gone with the supervisor
    raw = json.loads((inst.run_dir / "sharing.state.json").read_text())
    assert "vmm_started_at" in raw["extra"] and raw["vmm_pid"] is None
    assert not processes_mentioning(str(inst.run_dir))


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_a_hello_before_the_channel_is_connected_waits_for_the_channel(tmp_path: Path) -> None:
    """The VMM connects the ready and the channel socket separately; the supervisor may accept
    them in either order. A hello seen first must not let sessions through to a channel that
    is not there yet."""
    inst = make_fake_install(tmp_path / "inst", "[vms.early]\n@VM@")
    try:
        run = inst.cmd("vm-run", "early", "echo", "hi", env=inst.env(FAKE_HELLO_FIRST="1"))
        assert run.returncode == 0, run.stderr
        assert run.stdout == b"hi\n"
    finally:
        inst.cmd("vmsilo", "stop", "early", timeout=60)


def test_a_share_daemon_that_dies_while_the_vm_runs_is_shown_in_status(tmp_path: Path) -> None:
    fifo = tmp_path / "die"
    os.mkfifo(fifo)
    inst, env = sharing_install(
        tmp_path,
        "#!/bin/sh\n"
        'case "$*" in *--help*) echo "--shared-dir --fd --readonly --translate-uid"\n'
        '    echo "--translate-gid"; exit 0;; esac\n'
        'echo "[INFO virtiofsd] Waiting for vhost-user socket connection..." >&2\n'
        f"read _ < {fifo}\n"
        'echo "lost the shared directory" >&2\n'
        "exit 3\n",
    )
    try:
        run = inst.cmd("vm-run", "sharing", "true", env=env)
        assert run.returncode == 0, run.stderr
        assert inst.status("sharing")["detail"] is None
        with open(fifo, "w") as f:  # the daemon dies now
            f.write("go\n")
        for _ in range(100):  # the supervisor notices at once; give a loaded machine 10 s
            st = inst.status("sharing")
            if st["detail"] is not None:
                break
            time.sleep(0.1)
        assert st["state"] == "running"  # the VM goes on; its share is what broke
        assert "virtiofsd for share data of VM sharing" in st["detail"]
        assert "exit status 3" in st["detail"] and "lost the shared directory" in st["detail"]
    finally:
        inst.cmd("vmsilo", "stop", "sharing", timeout=60)


def test_vmsilo_argv_is_the_argv_the_supervisor_ran(fake: FakeInstall) -> None:
    """`vmsilo argv` and the supervisor build the argv through the same call (QEMU)."""
    record = fake.root / "argv.jsonl"
    started = fake.cmd("vmsilo", "start", "fake", env=fake.env(FAKE_QEMU_ARGV=str(record)))
    assert started.returncode == 0, started.stderr
    ran = [json.loads(line) for line in record.read_text().splitlines()]
    shown = fake.cmd("vmsilo", "argv", "fake", check=True)
    assert ran == [json.loads(shown.stdout)]


# ---------------------------------------------------------------- issue 15.5 / 15.8: why it ended


def test_stop_kill_kills_at_once_and_says_so(fake: FakeInstall) -> None:
    """`vmsilo stop --kill`: no power button (SIGQUIT to the supervisor), cleanup still runs."""
    assert fake.cmd("vmsilo", "start", "fake").returncode == 0
    disk = fake.state_dir / "fake-ephemeral.raw"
    assert disk.exists()
    stop = fake.cmd("vmsilo", "stop", "--kill", "fake")
    assert (stop.returncode, stop.stdout) == (0, b"fake: stopped\n"), stop.stderr
    st = fake.status("fake")
    assert st["state"] == "stopped" and st["last_exit"]["cause"] == "kill"
    assert st["last_exit"]["reason"] == "killed on request (stop --kill)"
    # the fake QEMU says so on its console when it gets the power button: it never did
    log = (fake.state_dir / "fake-console.log").read_bytes()
    assert b"fake-qemu: booting" in log and b"fake-qemu: power button" not in log
    assert not disk.exists() and not (fake.run_dir / "fake-command.socket").exists()
    # vm-stop reports like vmsilo stop
    again = fake.cmd("vm-stop", "--kill", "fake")
    assert (again.returncode, again.stdout) == (0, b"fake: not running\n"), again.stderr


def test_auto_shutdown_is_told_apart_from_a_stop(tmp_path: Path) -> None:
    """The agent powers the guest off after its idle timeout and says so first."""
    inst = make_fake_install(
        tmp_path / "inst", "[vms.idle]\nautoShutdown = { enable = true, after = 1 }\n@VM@"
    )
    try:
        start = inst.cmd("vm-start", "idle")
        assert (start.returncode, start.stdout) == (0, b"idle: running\n"), start.stderr
        from vmsilo.supervisor.state import wait_unlocked

        wait_unlocked(inst.run_dir / "idle.lock")  # the supervisor ends with the guest
        st = inst.status("idle")
        assert st["state"] == "stopped", st
        assert st["last_exit"]["cause"] == "auto-shutdown"
        assert st["last_exit"]["reason"] == "auto-shutdown: idle for 1 s"
        assert st["last_exit"]["clean"] is True
    finally:
        inst.cmd("vmsilo", "stop", "idle", timeout=60)


def test_a_failed_start_does_not_stick_after_a_good_one(tmp_path: Path) -> None:
    inst = make_fake_install(tmp_path / "inst", "[vms.flaky]\n@VM@")
    try:
        bad = inst.cmd("vmsilo", "start", "flaky", env=inst.env(FAKE_QEMU_FAIL="7"))
        assert bad.returncode == 2
        st = inst.status("flaky")
        assert st["state"] == "failed" and st["last_exit"]["cause"] == "start-failure"
        assert "exit status 7" in st["last_exit"]["reason"]
        good = inst.cmd("vmsilo", "start", "flaky")
        assert good.returncode == 0, good.stderr
        st = inst.status("flaky")
        assert st["state"] == "running" and st["last_exit"] is None, st
        human = inst.cmd("vmsilo", "status", "flaky").stdout.decode()
        assert "exit status 7" not in human and "running" in human
    finally:
        inst.cmd("vmsilo", "stop", "flaky", timeout=60)
