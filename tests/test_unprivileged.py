"""Every command, run by the desktop user (not root) against a running VM (issue 15.2).

The config's ``user`` is a real, throw-away host account; the VM is started by root (embedded
supervisor, no systemd here), then each entry point runs under that account's uid/gid, the way
the user would type it. Each either works or fails with one line that says what it needs —
never a Python traceback — and the failures leave the VM running.

The interpreter is Debian's ``/usr/bin/python3`` with the checkout on ``PYTHONPATH``: the test
venv's own interpreter lives under root's home, which another account cannot read.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import vmsilo

pytestmark = [pytest.mark.vm, pytest.mark.root]

VM = "demo"
SRC = Path(vmsilo.__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
TOOLS = {
    "vmsilo": "vmsilo.cli.vmsilo",
    "vm-run": "vmsilo.cli.vm_run",
    "vm-start": "vmsilo.cli.vm_start",
    "vm-stop": "vmsilo.cli.vm_stop",
    "vm-shell": "vmsilo.cli.vm_shell",
    "vm-start-debug": "vmsilo.cli.vm_start_debug",
}


@dataclass
class Setup:
    config: Path
    run_dir: Path
    user: pwd.struct_passwd

    def _argv(self, tool: str, args: tuple[str, ...], python: str) -> list[str]:
        return [python, "-m", TOOLS[tool], *args]

    def as_root(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, VMSILO_CONFIG=str(self.config))
        argv = self._argv(tool, args, sys.executable)
        return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)

    def as_user(
        self, tool: str, *args: str, stdin: str | None = ""
    ) -> subprocess.CompletedProcess[str]:
        site = sysconfig.get_paths()["purelib"]  # pydantic, rich, pyroute2 of the test venv
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
            "VMSILO_CONFIG": str(self.config),
            "PYTHONPATH": f"{SRC}:{site}",
        }
        argv = [
            "setpriv",
            f"--reuid={self.user.pw_uid}",
            f"--regid={self.user.pw_gid}",
            "--clear-groups",
            "--",
            *self._argv(tool, args, SYSTEM_PYTHON),
        ]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=180, env=env, input=stdin
        )

    def state(self) -> dict[str, Any]:
        p = self.as_root("vmsilo", "status", VM, "--json")
        assert p.returncode == 0, p.stderr
        row: dict[str, Any] = json.loads(p.stdout)["vms"][0]
        return row


@pytest.fixture(scope="module")
def setup(image: Any, state_dir: Path, host_user: pwd.struct_passwd) -> Iterator[Setup]:
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail("setpriv and /usr/bin/python3 are part of Debian's base system")
    run_dir = Path(f"/tmp/vmsilo-unpriv-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o755)
    config = run_dir / "vmsilo.toml"
    config.write_text(
        f"""
user = "{host_user.pw_name}"
stateDir = "{state_dir}"
runtimeDir = "{run_dir}"
startTimeout = 120
stopTimeout = 30
[qemu]
accel = "tcg"
[vms.{VM}]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
"""
    )
    config.chmod(0o644)
    s = Setup(config, run_dir, host_user)
    p = s.as_root("vmsilo", "start", VM)
    assert p.returncode == 0, p.stderr
    try:
        yield s
    finally:
        s.as_root("vmsilo", "stop", VM)
        shutil.rmtree(run_dir, ignore_errors=True)


def _one_clear_line(p: subprocess.CompletedProcess[str]) -> str:
    """The failure is one line that says what is needed (root, or the systemd units)."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert "root" in lines[0] or "vmsilo install" in lines[0], lines[0]
    return lines[0]


def test_commands_that_work_for_the_desktop_user(setup: Setup) -> None:
    p = setup.as_user("vm-run", VM, "id", "-un")
    assert (p.returncode, p.stdout, p.stderr) == (0, "user\n", "")
    p = setup.as_user("vm-run", VM, "sh", "-c", "exit 7")
    assert p.returncode == 7, p.stderr
    p = setup.as_user("vm-start", VM)
    assert p.returncode == 0, p.stderr
    for args in (("check",), ("plan", VM), ("argv", VM)):
        p = setup.as_user("vmsilo", *args)
        assert p.returncode == 0 and "Traceback" not in p.stderr, (args, p.stderr)
    p = setup.as_user("vmsilo", "status", VM, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["vms"][0]["state"] == "running"
    p = setup.as_user("vmsilo", "status")
    assert p.returncode == 0 and VM in p.stdout, p.stderr


def test_commands_that_need_root_say_so_in_one_line(setup: Setup) -> None:
    needs_root = [
        ("vm-stop", VM),
        ("vm-stop", "--with-clients", VM),  # --force, its old name, adds a deprecation note
        ("vm-stop", "--kill", VM),
        ("vmsilo", "stop", VM),
        ("vmsilo", "stop", "--kill", VM),
        ("vm-start-debug", VM),
        ("vmsilo", "service", "cleanup", VM),
        ("vmsilo", "image", "build"),
        ("vmsilo", "image", "gc"),
        ("vmsilo", "install"),
        ("vmsilo", "uninstall"),
    ]
    for tool, *args in needs_root:
        p = setup.as_user(tool, *args)
        assert p.returncode != 0, (tool, args, p.stdout)
        _one_clear_line(p)
        assert setup.state()["state"] == "running", (tool, args)


def test_no_command_prints_a_traceback(setup: Setup) -> None:
    """What may work or not for a user (logs live in the root-only state dir; doctor probes
    root-only devices) still never shows a traceback."""
    for tool, *args in (
        ("vmsilo", "logs", VM),
        ("vmsilo", "doctor"),
        ("vmsilo", "image", "list"),
        ("vm-shell", "--ssh", VM),
        ("vm-shell", VM),
    ):
        p = setup.as_user(tool, *args)
        assert "Traceback" not in p.stderr, (tool, args, p.stderr)
        if p.returncode != 0:
            assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1, (tool, p.stderr)
    assert setup.state()["state"] == "running"
