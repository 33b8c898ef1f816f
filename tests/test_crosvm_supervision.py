"""The supervisor's crosvm path against tests/fake_crosvm (fast, real processes, no VM).

crosvm cannot run here, so tests/fake_crosvm plays it: it refuses (exit 35) any argv upstream
crosvm's vendored grammar rejects, binds the ``-s`` control socket, connects to the
supervisor's console/ready sockets, answers ``powerbtn``/``stop`` and exits with crosvm's codes
on request, and runs the real guest agent, reached over a Unix socket that stands in for vsock
(``VMSILO_VSOCK_EMULATION_DIR``, honoured by ``vmsilo.channel.relay.connect_vsock``). Every wait
is on an event — the fake's event datagrams, the supervisor's lock, the command socket — and
bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from crosvm_grammar import assert_valid
from fakevm import FakeInstall

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FAKE_CROSVM = Path(__file__).resolve().parent / "fake_crosvm"
FAKE_SOUND = Path(__file__).resolve().parent / "fake_vhost_device_sound"
VM = "cv"
EVENT_TIMEOUT = 30.0
LOCK_TIMEOUT = 30


@dataclass
class CrosvmInstall:
    """A throwaway installation whose VMM is tests/fake_crosvm, plus the fake's event feed.

    The fake sends its events as datagrams without blocking; a Unix datagram queue holds only
    ``net.unix.max_dgram_qlen`` (often 10) of them, so a thread drains the socket into a queue
    at once and no event is ever dropped while a test is busy elsewhere.
    """

    inst: FakeInstall
    events: socket.socket
    vsock_dir: Path
    seen: list[dict[str, Any]] = field(default_factory=list)  # every event received so far
    inbox: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._drain_events, daemon=True).start()

    def _drain_events(self) -> None:
        with contextlib.suppress(OSError):
            while raw := self.events.recv(1 << 20):
                self.inbox.put(json.loads(raw))

    def close(self) -> None:
        self.events.shutdown(socket.SHUT_RDWR)  # wakes the draining thread
        self.events.close()

    def env(self, **extra: str) -> dict[str, str]:
        env = self.inst.env(
            VMSILO_VSOCK_EMULATION_DIR=str(self.vsock_dir),
            FAKE_CROSVM_EVENTS=str(self.inst.root / "events.sock"),
            **extra,
        )
        # the fake's `#!/usr/bin/env python3` finds this venv's interpreter first
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def cmd(self, tool: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess[bytes]:
        return self.inst.cmd(tool, *args, env=self.env(**extra_env), timeout=60)

    def status(self) -> dict[str, Any]:
        proc = self.cmd("vmsilo", "status", VM, "--json")
        assert proc.returncode == 0, proc.stderr
        data: dict[str, Any] = json.loads(proc.stdout)["vms"][0]
        return data

    def next_event(self, kind: str) -> dict[str, Any]:
        """The next event of ``kind`` the fake sent (earlier events of other kinds skipped)."""
        while True:
            try:
                ev = self.inbox.get(timeout=EVENT_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"fake crosvm sent no {kind!r} event within {EVENT_TIMEOUT} s")
            self.seen.append(ev)
            if ev["event"] == kind:
                return ev

    def fake(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run the fake's control CLI against this VM's control socket."""
        control = str(self.inst.run_dir / f"{VM}-crosvm-control.socket")
        return subprocess.run(
            [str(FAKE_CROSVM), *args, control],
            capture_output=True,
            timeout=30,
            env=self.env(),
        )

    def wait_supervisor_gone(self) -> None:
        """Block on the supervisor's lock (the kernel wakes us), at most LOCK_TIMEOUT s."""
        from vmsilo.lifecycle.embedded import wait_unlocked_for

        lock = str(self.inst.run_dir / f"{VM}.lock")
        assert wait_unlocked_for(lock, LOCK_TIMEOUT), f"supervisor still running: {lock}"

    @property
    def disk(self) -> Path:
        return self.inst.state_dir / f"{VM}-ephemeral.raw"


def make_crosvm_install(
    root: Path,
    extra_vm: str = "",
    *,
    sound: str = "sound = { playback = false }",
    sound_device: str | Path = FAKE_SOUND,
) -> CrosvmInstall:
    """``sound``: the VM's sound line (the crosvm default is on, SPEC §2); ``sound_device``:
    crosvm.soundDevice (by default the fake vhost-device-sound)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img", "root.img"):
        (root / name).write_bytes(b"fake")
    vsock_dir = root / "vsock"
    vsock_dir.mkdir()
    config = root / "vmsilo.toml"
    config.write_text(
        f"""
user = "root"
stateDir = "{root}/state"
runtimeDir = "{root}/run"
stopTimeout = 10
startTimeout = 30

[crosvm]
binary = "{FAKE_CROSVM}"
flavor = "upstream"
soundDevice = "{sound_device}"

[vms.{VM}]
hypervisor = "crosvm"
memory = 64
cpus = 1
gpu = false
{sound}
sharedHome = false
kernel = "{root}/vmlinuz"
initramfs = "{root}/initrd.img"
rootDisk = {{ path = "{root}/root.img", ro = true }}
{extra_vm}
"""
    )
    events = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    events.bind(str(root / "events.sock"))
    return CrosvmInstall(FakeInstall(root, config, root / "launches"), events, vsock_dir)


@pytest.fixture
def cv(tmp_path: Path) -> Iterator[CrosvmInstall]:
    inst = make_crosvm_install(tmp_path / "i")
    try:
        yield inst
    finally:
        inst.cmd("vmsilo", "stop", VM)
        inst.close()


def start(cv: CrosvmInstall) -> dict[str, Any]:
    """``vmsilo start`` (returns after READY); the fake's ``booted`` event of that launch."""
    started = cv.cmd("vmsilo", "start", VM)
    assert started.returncode == 0, started.stderr
    return cv.next_event("booted")


def test_vmsilo_argv_is_the_argv_the_supervisor_ran(cv: CrosvmInstall) -> None:
    """`vmsilo argv` and the supervisor build the argv through the same call (crosvm)."""
    start(cv)
    launched = next(ev for ev in cv.seen if ev["event"] == "launch")
    shown = cv.cmd("vmsilo", "argv", VM)
    assert shown.returncode == 0, shown.stderr
    assert launched["argv"] == json.loads(shown.stdout)


def test_start_run_and_powerbtn_stop(cv: CrosvmInstall) -> None:
    """Start → ready → vm-run over (emulated) vsock → graceful stop via ``crosvm powerbtn``."""
    booted = start(cv)
    st = cv.status()
    assert st["state"] == "running" and st["hypervisor"] == "crosvm" and st["id"] == 3
    assert st["pid"] == booted["pid"]
    assert booted["ephemeral"]["marker_found"] is False  # a fresh disk for this boot
    vsock = cv.vsock_dir / "3-5000.sock"
    assert booted["vsock"] == str(vsock) and vsock.is_socket()
    # the fake never touched the channel socket: sessions can only have gone over "vsock"
    run = cv.cmd("vm-run", VM, "sh", "-c", 'printf "%s|" "$@"; exit 3', "x", "a b", "", "-x=1")
    assert (run.returncode, run.stdout) == (3, b"a b||-x=1|"), run.stderr
    run = cv.cmd("vm-run", VM, "sh", "-c", "kill -USR1 $$")
    assert run.returncode == 128 + signal.SIGUSR1, run.stderr
    stop = cv.cmd("vmsilo", "stop", VM)
    assert stop.returncode == 0, stop.stderr
    # the supervisor ran `<binary> powerbtn <control socket>`, and the guest powered off
    assert cv.next_event("control")["command"] == ["powerbtn"]
    assert cv.next_event("exit")["code"] == 0
    st = cv.status()
    assert st["state"] == "stopped", st
    assert st["last_exit"]["reason"] == "stopped on request (power button)"
    assert st["last_exit"]["code"] == 0 and st["last_exit"]["cause"] == "stop"
    assert not cv.disk.exists()
    assert not vsock.exists()
    # the supervisor has read the console to its end: what crosvm's console said is logged
    console_log = cv.inst.state_dir / f"{VM}-console.log"
    assert b"fake-crosvm: booting cv" in console_log.read_bytes()
    for name in ("crosvm-control.socket", "ready.socket", "command.socket", "console"):
        assert not (cv.inst.run_dir / f"{VM}-{name}").exists(), name


def test_supervisor_argv_is_valid_upstream_crosvm(cv: CrosvmInstall) -> None:
    """The argv the supervisor really runs passes the grammar (the fake would exit 35)."""
    booted = start(cv)
    # the fake reports the argv it accepted in its launch event (sent before "booted")
    argv = next(e for e in cv.seen if e["event"] == "launch" and e["pid"] == booted["pid"])["argv"]
    assert_valid(argv)
    assert argv[0] == str(FAKE_CROSVM)
    run_at = argv.index("run")
    assert argv[1:run_at] == ["--log-level=info", "--no-syslog"]
    assert argv[argv.index("--vsock") + 1] == "cid=3"
    assert argv[argv.index("-s") + 1] == str(cv.inst.run_dir / f"{VM}-crosvm-control.socket")
    assert "--cid" not in argv and "--no-timestamps" not in argv


def test_invalid_argv_is_refused_like_crosvm(tmp_path: Path) -> None:
    """An option upstream crosvm lacks makes the fake exit 35; the VM fails with that reason."""
    cv = make_crosvm_install(tmp_path / "i", 'crosvm = { extraRunArgs = ["--no-such-flag"] }')
    try:
        started = cv.cmd("vmsilo", "start", VM)
        assert started.returncode != 0
        assert b"crosvm: invalid arguments before the guest was ready" in started.stderr
        ev = cv.next_event("exit")
        assert ev["code"] == 35
        assert any("Unrecognized argument: --no-such-flag" in p for p in ev["problems"])
        st = cv.status()
        assert st["state"] == "failed"
        assert "crosvm: invalid arguments" in st["last_exit"]["reason"]
        assert st["last_exit"]["code"] == 35
        log = (cv.inst.run_dir / f"{VM}.supervisor.log").read_text()
        assert "Unrecognized argument: --no-such-flag" in log
    finally:
        cv.close()


def test_crosvm_stop_command_is_a_clean_stop(cv: CrosvmInstall) -> None:
    """``crosvm stop`` ends the VMM at once with 0: the supervisor records a clean stop."""
    start(cv)
    p = cv.fake("stop")
    assert p.returncode == 0, p.stderr
    assert cv.next_event("control")["command"] == ["stop"]
    cv.wait_supervisor_gone()
    st = cv.status()
    # crosvm exits 0 for a guest poweroff and for `crosvm stop` alike; nobody asked us to stop
    assert st["state"] == "stopped" and st["last_exit"]["cause"] == "guest-poweroff"
    assert st["last_exit"]["reason"] == "guest powered off (or crosvm stop)"
    assert not cv.disk.exists()


def test_reset_restarts_with_a_fresh_ephemeral_disk(cv: CrosvmInstall) -> None:
    """Exit 32 (reset): the supervisor boots crosvm again on a new, empty ephemeral disk."""
    first = start(cv)
    assert first["ephemeral"]["marker_found"] is False
    # keep the first boot's disk open: its inode cannot be reused by the next one
    with open(cv.disk, "rb") as old:
        assert os.fstat(old.fileno()).st_ino == first["ephemeral"]["inode"]
        assert old.read(21) == b"FAKE-CROSVM-EPHEMERAL"  # the "guest" wrote to it
        run = cv.cmd("vm-run", VM, "true")
        assert run.returncode == 0, run.stderr

        p = cv.fake("fake-exit", "32")
        assert p.returncode == 0, p.stderr
        assert cv.next_event("exit")["code"] == 32
        second = cv.next_event("booted")  # the supervisor launched crosvm again
        assert second["pid"] != first["pid"]
        assert second["ephemeral"]["marker_found"] is False  # nothing of the first boot
        assert second["ephemeral"]["inode"] != first["ephemeral"]["inode"]
        assert os.stat(cv.disk).st_ino == second["ephemeral"]["inode"]

    again = cv.cmd("vmsilo", "start", VM)  # returns once the new guest is ready
    assert again.returncode == 0, again.stderr
    st = cv.status()
    assert st["state"] == "running" and st["pid"] == second["pid"]
    assert st["last_exit"]["code"] == 32 and st["last_exit"]["reason"] == "crosvm: reset"
    run = cv.cmd("vm-run", VM, "sh", "-c", "echo second boot")
    assert (run.returncode, run.stdout) == (0, b"second boot\n"), run.stderr
    # the console log separates the two boots
    log = (cv.inst.state_dir / f"{VM}-console.log").read_bytes()
    assert log.count(b"\n-- vmsilo: boot at ") + log.startswith(b"-- vmsilo: boot at ") == 2


@pytest.mark.parametrize(
    ("code", "reason"), [(33, "crash"), (34, "guest panic"), (36, "watchdog reset")]
)
def test_crash_codes_mark_the_vm_failed(cv: CrosvmInstall, code: int, reason: str) -> None:
    """33 crash, 34 guest panic, 36 watchdog: no restart; ``failed`` with the reason."""
    start(cv)
    p = cv.fake("fake-exit", str(code))
    assert p.returncode == 0, p.stderr
    cv.wait_supervisor_gone()
    st = cv.status()
    assert st["state"] == "failed", st
    assert st["last_exit"]["reason"] == f"crosvm: {reason}"
    assert st["last_exit"]["code"] == code and st["last_exit"]["cause"] == "crash"
    assert not cv.disk.exists()
    assert not (cv.vsock_dir / "3-5000.sock").exists()
    assert not (cv.inst.run_dir / f"{VM}-crosvm-control.socket").exists()
    run = cv.cmd("vm-run", "--no-autostart", VM, "true")
    assert run.returncode == 255


def test_crash_before_ready_is_reported(cv: CrosvmInstall) -> None:
    """A crosvm that dies before the guest's hello fails the start, reason included."""
    started = cv.cmd("vm-run", VM, "true", FAKE_CROSVM_EXIT="33")
    assert started.returncode == 255
    assert b"crosvm: crash before the guest was ready" in started.stderr
    cv.wait_supervisor_gone()
    st = cv.status()
    assert st["state"] == "failed" and "crosvm: crash" in st["last_exit"]["reason"]
    assert st["last_exit"]["code"] == 33


def test_fake_control_cli_is_checked_too(tmp_path: Path) -> None:
    """The control CLI shape is validated like ``run``'s: a missing socket is exit 35."""
    p = subprocess.run([str(FAKE_CROSVM), "powerbtn"], capture_output=True, timeout=30)
    assert p.returncode == 35, p.stderr
    p = subprocess.run(
        [str(FAKE_CROSVM), "powerbtn", str(tmp_path / "nothing.sock")],
        capture_output=True,
        timeout=30,
    )
    assert p.returncode == 1 and b"failed to connect" in p.stderr
