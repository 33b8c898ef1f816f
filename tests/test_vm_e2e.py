"""vmsilo end to end on real QEMU guests (TCG): the supervisor, channel, agent and vm-run.

Every test here boots the image built from Debian packages (see conftest.image) through the
product's own code paths: `vmsilo start`/`vm-run` autostart → supervisor → QEMU → guest init →
agent → virtio-serial mux → relay → client.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from vmenv import VM_DEMO, Install, qemu_install

pytestmark = pytest.mark.vm

WEIRD_ARGS = [
    "two words",
    "it's",
    '"double"',
    "$HOME",
    "a;b",
    "*",
    "new\nline",
    "",
    "-n",
    "--flag=1",
    "ünïcødé ✓",
    "tab\there",
    "back\\slash",
]


@pytest.fixture(scope="module")
def inst(image: Any, state_dir: Path) -> Iterator[Install]:
    with qemu_install(state_dir, "e2e", VM_DEMO) as install:
        yield install


@pytest.fixture
def running(inst: Install) -> Install:
    if inst.status()["state"] != "running":
        p = inst.cmd("vmsilo", "start", "demo")
        assert p.returncode == 0, p.stderr
    return inst


def test_arguments_arrive_byte_for_byte(running: Install) -> None:
    p = running.cmd("vm-run", "demo", "printf", "%s\\0", *WEIRD_ARGS)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"".join(a.encode() + b"\0" for a in WEIRD_ARGS)


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["true"], 0),
        (["sh", "-c", "exit 3"], 3),
        (["no-such-program-xyz"], 127),
        (["sh", "-c", "kill -TERM $$"], 143),
        (["/etc/hostname"], 126),
    ],
)
def test_exit_statuses_propagate(running: Install, argv: list[str], status: int) -> None:
    p = running.cmd("vm-run", "demo", *argv)
    assert p.returncode == status, p.stderr


def test_binary_stdin_and_separate_streams(running: Install) -> None:
    data = os.urandom(10 * 1024 * 1024)
    p = running.cmd("vm-run", "demo", "sha256sum", input=data)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    p = running.cmd("vm-run", "demo", "sh", "-c", "echo out; echo err >&2; echo out2")
    assert (p.returncode, p.stdout, p.stderr) == (0, b"out\nout2\n", b"err\n")


def test_twenty_concurrent_runs(running: Install) -> None:
    def one(i: int) -> tuple[int, bytes]:
        p = running.cmd("vm-run", "demo", "sh", "-c", f"echo {i}; exit {i % 5}")
        return p.returncode, p.stdout

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert results == [(i % 5, f"{i}\n".encode()) for i in range(20)]


def test_guest_identity_and_status(running: Install) -> None:
    p = running.cmd("vm-run", "demo", "hostname")
    assert p.stdout == b"demo\n"
    p = running.cmd("vm-run", "demo", "id", "-u")
    assert p.stdout == b"0\n"  # vmsilo.user = root's ids here
    st = running.status()
    assert st["state"] == "running" and st["hypervisor"] == "qemu" and st["memory"] == 512
    assert st["pid"] > 0 and st["uptime_s"] >= 0 and st["config_changed"] is False


def test_ephemeral_disk_lifecycle_and_root_is_disposable(inst: Install) -> None:
    disk = inst.state_dir / "demo-ephemeral.raw"
    inst.cmd("vmsilo", "stop", "demo")
    assert not disk.exists()
    assert inst.cmd("vmsilo", "start", "demo").returncode == 0
    assert disk.exists()
    assert disk.stat().st_blocks * 512 < 64 << 20 < disk.stat().st_size  # sparse
    p = inst.cmd("vm-run", "--root", "demo", "sh", "-c", "echo x > /marker && cat /marker")
    assert p.stdout == b"x\n", p.stderr
    # stop: graceful, disk gone
    p = inst.cmd("vmsilo", "stop", "demo")
    assert p.returncode == 0, p.stderr
    assert inst.status()["last_exit"]["reason"] == "stopped on request (power button)"
    assert not disk.exists()
    # restart: the file written to / is gone
    assert inst.cmd("vmsilo", "start", "demo").returncode == 0
    p = inst.cmd("vm-run", "demo", "test", "-e", "/marker")
    assert p.returncode == 1
    # guest poweroff: disk gone, state stopped
    p = inst.cmd("vm-run", "--root", "demo", "poweroff")
    assert p.returncode in (0, 255), p.stderr  # 255: the channel went away with the guest
    from vmsilo.supervisor.state import wait_unlocked

    wait_unlocked(inst.run_dir / "demo.lock")
    st = inst.status()
    assert st["state"] == "stopped" and st["last_exit"]["reason"] == "guest powered off"
    assert not disk.exists()


def test_kill_9_of_the_vmm(inst: Install) -> None:
    from vmsilo.supervisor.state import wait_unlocked

    if inst.status()["state"] != "running":
        assert inst.cmd("vmsilo", "start", "demo").returncode == 0
    disk = inst.state_dir / "demo-ephemeral.raw"
    assert disk.exists()
    os.kill(inst.status()["pid"], signal.SIGKILL)
    wait_unlocked(inst.run_dir / "demo.lock")
    st = inst.status()
    assert st["state"] == "failed" and "SIGKILL" in st["last_exit"]["reason"]
    assert not disk.exists()
    assert not (inst.run_dir / "demo-command.socket").exists()


def test_states_starting_then_running(inst: Install) -> None:
    inst.cmd("vmsilo", "stop", "demo")
    assert inst.status()["state"] in ("stopped", "failed")
    p = inst.cmd("vmsilo", "start", "--no-wait", "demo")
    assert p.returncode == 0, p.stderr
    assert inst.status()["state"] == "starting"  # the guest takes seconds to boot under TCG
    p = inst.cmd("vm-run", "demo", "true")  # waits for readiness
    assert p.returncode == 0
    assert inst.status()["state"] == "running"


def test_ten_concurrent_runs_on_a_stopped_vm_start_one(inst: Install) -> None:
    inst.cmd("vmsilo", "stop", "demo")
    before = inst.launch_count()

    def one(i: int) -> tuple[int, bytes]:
        p = inst.cmd("vm-run", "demo", "echo", str(i))
        return p.returncode, p.stdout

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    assert results == [(0, f"{i}\n".encode()) for i in range(10)]
    assert inst.launch_count() == before + 1
