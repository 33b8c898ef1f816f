"""vmsilo's host integration under a REAL systemd (PID 1 of a systemd-nspawn container).

One container for the module, booted from a cached Debian root with systemd, dbus, polkitd and
QEMU; this checkout's venv, sources and the test session's guest image are bind-mounted
read-only at the same paths, so the container runs exactly the code under test. Inside it,
``vmsilo install`` writes and starts the units for real, and the tests prove:

* the installed units pass ``systemd-analyze verify`` inside too, the command sockets listen
  from install on, 0600 and owned by ``user``; a second user cannot connect;
* ``vm-run VM uname -a`` as ``user`` starts the VM's service by socket activation and returns
  the guest's output and exit status;
* ``systemctl stop`` stops the guest gracefully (the power button: last exit "stopped on request
  (power button)"), the
  ExecStopPost cleanup runs, the ephemeral disk is gone and the socket keeps listening;
* ``vm-start``/``vm-stop`` go through systemd; the real polkitd lets ``user`` (and nobody else)
  start and stop exactly the vmsilo units with the installed rule;
* a client's start pulls up its netvm's service first, and vm-stop of that netvm is refused
  while the client runs unless ``--force``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import IMAGE_CACHE
from nspawn import Bind, Container, ensure_rootfs, nspawn_blocker

pytestmark = [pytest.mark.systemd, pytest.mark.vm]

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
BIN = VENV / "bin"
USER, OTHER = "alice", "bob"

CONFIG = """
user = "alice"
startTimeout = 120
stopTimeout = 30

[qemu]
accel = "tcg"

[vms.solo]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false

[vms.gate]
hypervisor = "qemu"
memory = 384
cpus = 1
sharedHome = false
network.isNetvm = true

[vms.client]
hypervisor = "qemu"
memory = 384
cpus = 1
sharedHome = false
network.netvm = "gate"
"""


def _base_python() -> Path:
    """The interpreter the venv's python links to (it must be visible in the container too)."""
    real = Path(os.path.realpath(BIN / "python3"))
    return real.parent.parent  # …/versions/3.11.7


@pytest.fixture(scope="module")
def box(image: Any, state_dir: Path) -> Iterator[Container]:
    why = nspawn_blocker()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"systemd tests cannot run: {why}")
        pytest.skip(why)
    t0 = time.monotonic()
    rootfs = ensure_rootfs(IMAGE_CACHE)
    t_root = time.monotonic() - t0
    work = Path(tempfile.mkdtemp(prefix="vmsilo-nspawn-", dir="/tmp"))
    etc = work / "etc-vmsilo"
    etc.mkdir(mode=0o755)
    (etc / "vmsilo.toml").write_text(CONFIG)
    os.chmod(etc / "vmsilo.toml", 0o644)
    python_home = _base_python()
    binds = [
        Bind(str(VENV), str(VENV), read_only=True),
        Bind(str(REPO / "src"), str(REPO / "src"), read_only=True),
        Bind(str(python_home), str(python_home), read_only=True),
        Bind(str(etc), "/etc/vmsilo", read_only=True),
        Bind(str(state_dir / "images"), "/var/lib/vmsilo/images", read_only=True),
        Bind("/dev/net/tun", "/dev/net/tun"),
    ]
    box = Container(rootfs, binds, work)
    box.boot(timeout=60)
    try:
        state = box.run("systemctl", "is-system-running", "--wait", timeout=60)
        assert state.stdout.strip() in (b"running", b"degraded"), state
        # the venv's python lives under /root (0700): let the users reach it, as a real
        # install under /usr would be reachable
        box.check("chmod", "0755", "/root")
        for name in (USER, OTHER):
            box.check("useradd", "--create-home", name)
        p = box.run(str(BIN / "vmsilo"), "install", timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        print(
            f"[nspawn] root {t_root:.1f} s, boot {box.boot_s:.2f} s,"
            f" ready+install {time.monotonic() - t0 - t_root:.1f} s"
        )
        yield box
    finally:
        box.run(str(BIN / "vmsilo"), "uninstall", timeout=180)
        box.stop()
        shutil.rmtree(work, ignore_errors=True)


def state_of(box: Container, vm: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(box.check("cat", f"/run/vmsilo/{vm}.state.json"))
    return data


def active(box: Container, *units: str) -> list[str]:
    return box.run("systemctl", "is-active", *units).stdout.decode().split()


def test_installed_units_verify_and_sockets_listen(box: Container) -> None:
    units = [
        f"/etc/systemd/system/vmsilo-{vm}-{kind}"
        for vm in ("solo", "gate", "client")
        for kind in ("vm.service", "command.socket")
    ]
    p = box.run("systemd-analyze", "verify", "--man=no", *units)
    assert (p.returncode, p.stderr) == (0, b""), p.stderr.decode()
    assert active(box, "vmsilo-solo-command.socket", "vmsilo-solo-vm.service") == [
        "active",
        "inactive",
    ]
    assert box.check("stat", "-c", "%a %U", "/run/vmsilo/solo-command.socket").split() == [
        "600",
        USER,
    ]
    assert box.check("systemctl", "is-enabled", "vmsilo-solo-command.socket").strip() == "enabled"


def test_vm_run_starts_the_vm_by_socket_activation(box: Container) -> None:
    t = time.monotonic()
    p = box.run(str(BIN / "vm-run"), "solo", "uname", "-a", user=USER, timeout=180)
    first = time.monotonic() - t
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().startswith("Linux solo "), p.stdout
    assert active(box, "vmsilo-solo-vm.service") == ["active"]
    p = box.run(str(BIN / "vm-run"), "solo", "sh", "-c", "echo out; exit 7", user=USER)
    assert (p.returncode, p.stdout) == (7, b"out\n"), p.stderr.decode()
    # the supervisor systemd started is the one serving (no embedded twin beside it)
    main_pid = box.check("systemctl", "show", "-p", "MainPID", "--value", "vmsilo-solo-vm.service")
    assert state_of(box, "solo")["supervisor_pid"] == int(main_pid)
    print(f"[nspawn] first vm-run (activation + boot + uname): {first:.1f} s")


def test_second_user_cannot_connect(box: Container) -> None:
    probe = (
        "import socket,sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect('/run/vmsilo/solo-command.socket')\n"
        "except PermissionError:\n    sys.exit(3)\n"
    )
    assert box.run("python3", "-c", probe, user=OTHER).returncode == 3
    assert box.run("python3", "-c", probe, user=USER).returncode == 0
    p = box.run(str(BIN / "vm-run"), "solo", "true", user=OTHER)
    assert p.returncode == 255, p


def test_systemctl_stop_is_graceful_and_cleans_up(box: Container) -> None:
    box.run(str(BIN / "vm-run"), "solo", "true", user=USER, timeout=180)
    assert box.run("test", "-e", "/var/lib/vmsilo/solo-ephemeral.raw").returncode == 0
    t = time.monotonic()
    box.check("systemctl", "stop", "vmsilo-solo-vm.service", timeout=120)
    took = time.monotonic() - t
    st = state_of(box, "solo")
    assert st["state"] == "stopped"
    assert st["last_exit"]["reason"] == "stopped on request (power button)"  # not a kill
    assert took < 30, took  # well within stopTimeout: the guest powered off by itself
    assert box.run("test", "-e", "/var/lib/vmsilo/solo-ephemeral.raw").returncode == 1
    assert box.run("test", "-e", "/run/vmsilo/solo-qmp.socket").returncode == 1
    result = box.check(
        "systemctl", "show", "-p", "Result", "--value", "vmsilo-solo-vm.service"
    ).strip()
    assert result == "success"
    # the socket keeps listening: the next vm-run starts the VM again
    assert active(box, "vmsilo-solo-command.socket", "vmsilo-solo-vm.service") == [
        "active",
        "inactive",
    ]


def test_vm_start_and_stop_go_through_systemd_with_polkit(box: Container) -> None:
    p = box.run(str(BIN / "vm-start"), "solo", user=USER, timeout=180)
    assert p.returncode == 0, p.stderr.decode()
    assert active(box, "vmsilo-solo-vm.service") == ["active"]
    assert state_of(box, "solo")["state"] == "running"
    # polkit: the other user may not, and the user may not touch other units
    p = box.run("systemctl", "stop", "vmsilo-solo-vm.service", user=OTHER)
    assert p.returncode != 0 and active(box, "vmsilo-solo-vm.service") == ["active"]
    p = box.run("systemctl", "stop", "dbus.service", user=USER)
    assert p.returncode != 0 and active(box, "dbus.service") == ["active"]
    p = box.run(str(BIN / "vm-stop"), "solo", user=USER, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert active(box, "vmsilo-solo-vm.service") == ["inactive"]
    assert state_of(box, "solo")["last_exit"]["reason"] == "stopped on request (power button)"


def test_vm_run_with_the_socket_unit_stopped_starts_through_systemd(box: Container) -> None:
    """No socket to activate (the socket unit was stopped): vm-run asks systemd, as vm-start
    does, instead of starting a supervisor of its own beside systemd's."""
    box.check("systemctl", "stop", "vmsilo-solo-command.socket", timeout=120)
    assert active(box, "vmsilo-solo-command.socket", "vmsilo-solo-vm.service") == [
        "inactive",
        "inactive",
    ]
    p = box.run(str(BIN / "vm-run"), "solo", "echo", "via systemd", user=USER, timeout=180)
    assert (p.returncode, p.stdout) == (0, b"via systemd\n"), p.stderr.decode()
    assert active(box, "vmsilo-solo-command.socket", "vmsilo-solo-vm.service") == [
        "active",
        "active",
    ]
    main_pid = box.check("systemctl", "show", "-p", "MainPID", "--value", "vmsilo-solo-vm.service")
    assert state_of(box, "solo")["supervisor_pid"] == int(main_pid)
    box.check("systemctl", "stop", "vmsilo-solo-vm.service", timeout=120)


def test_reinstall_restarts_a_changed_socket_of_a_stopped_vm(box: Container) -> None:
    """A socket unit keeps its old owner until restarted: reinstalling a config whose user
    changed must hand the stopped VM's command socket to the new user."""

    def owner() -> str:
        return box.check("stat", "-c", "%U", "/run/vmsilo/solo-command.socket").strip()

    assert active(box, "vmsilo-solo-vm.service") == ["inactive"]
    assert owner() == USER
    other = box.workdir / "etc-vmsilo" / "other.toml"
    other.write_text(CONFIG.replace(f'user = "{USER}"', f'user = "{OTHER}"'))
    os.chmod(other, 0o644)
    try:
        # a running VM keeps the socket it was handed; the report says how to finish
        p = box.run(str(BIN / "vm-start"), "solo", user=USER, timeout=180)
        assert p.returncode == 0, p.stderr.decode()
        p = box.run(str(BIN / "vmsilo"), "-c", "/etc/vmsilo/other.toml", "install", timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        assert b"systemctl restart vmsilo-solo-command.socket" in p.stdout + p.stderr, p
        assert owner() == USER
        assert active(box, "vmsilo-solo-vm.service") == ["active"]
        box.check("systemctl", "stop", "vmsilo-solo-vm.service", timeout=120)
        # stopped: the next install restarts it at once
        p = box.run(str(BIN / "vmsilo"), "install", timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        p = box.run(str(BIN / "vmsilo"), "-c", "/etc/vmsilo/other.toml", "install", timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        assert owner() == OTHER
    finally:
        p = box.run(str(BIN / "vmsilo"), "install", timeout=120)
        assert p.returncode == 0, p.stderr.decode()
    assert owner() == USER


def test_client_pulls_up_its_netvm_and_the_netvm_is_protected(box: Container) -> None:
    requires = box.check(
        "systemctl", "show", "-p", "Requires", "-p", "After", "vmsilo-client-vm.service"
    )
    assert requires.count("vmsilo-gate-vm.service") == 2, requires
    p = box.run(str(BIN / "vm-start"), "client", timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    assert active(box, "vmsilo-gate-vm.service", "vmsilo-client-vm.service") == [
        "active",
        "active",
    ]
    gate_ready = state_of(box, "gate")["ready_at"]
    client_started = state_of(box, "client")["started_at"]
    assert gate_ready <= client_started  # After=: the netvm was ready before the client began
    p = box.run(
        str(BIN / "vm-run"), "client", "cat", "/sys/class/net/upstream/operstate", user=USER
    )
    assert (p.returncode, p.stdout) == (0, b"up\n"), p
    p = box.run(str(BIN / "vm-stop"), "gate", timeout=60)
    assert p.returncode == 1 and b"client" in p.stderr, p
    assert active(box, "vmsilo-gate-vm.service") == ["active"]
    p = box.run(str(BIN / "vm-stop"), "--force", "gate", timeout=180)
    assert p.returncode == 0, p.stderr.decode()
    assert active(box, "vmsilo-gate-vm.service", "vmsilo-client-vm.service") == [
        "inactive",
        "inactive",
    ]
    assert state_of(box, "client")["last_exit"]["reason"] == "stopped on request (power button)"
