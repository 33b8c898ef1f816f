"""Every command, run by the desktop user (not root) against a running VM (issue 15.2).

The config's ``user`` is a real, throw-away host account; the VM is started by root (embedded
supervisor, no systemd here), then each entry point runs under that account's uid/gid, the way
the user would type it. Each either works or fails with one line that says what it needs —
never a Python traceback — and the failures leave the VM running.

(The harness, :mod:`userenv`, runs them with Debian's python3: the test venv's interpreter
lives under root's home, which another account cannot read.)
"""

from __future__ import annotations

import json
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from userenv import Setup, user_vm

pytestmark = [pytest.mark.vm, pytest.mark.root]

VM = "demo"


@pytest.fixture(scope="module")
def setup(image: Any, state_dir: Path, host_user: pwd.struct_passwd) -> Iterator[Setup]:
    with user_vm(state_dir, host_user, "unpriv") as s:
        yield s


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
    # cleanup of a running VM is a no-op for anyone (it runs after a supervisor is gone)
    p = setup.as_user("vmsilo", "service", "cleanup", VM)
    assert (p.returncode, p.stdout) == (0, f"{VM}: supervisor still running; nothing to clean\n")


def test_commands_that_need_root_say_so_in_one_line(setup: Setup) -> None:
    # vm-start-debug keeps the original script's two lines (SPEC §6)
    p = setup.as_user("vm-start-debug", VM)
    assert p.returncode == 1 and p.stderr == (
        f"Error: vm-start-debug requires root privileges\nRun: sudo vm-start-debug {VM}\n"
    )
    needs_root = [
        ("vm-stop", VM),
        ("vm-stop", "--with-clients", VM),  # --force, its old name, adds a deprecation note
        ("vm-stop", "--kill", VM),
        ("vmsilo", "stop", VM),
        ("vmsilo", "stop", "--kill", VM),
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
