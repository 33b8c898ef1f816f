"""vm-clipboard's own failures and nothing-to-do cases (SPEC §9.4): exit 255 with a message for
usage, an unknown VM (listing the VMs), a VM without windows or whose filter is not running;
exit 1 when there is nothing to paste or no VM has focus. The copy and paste themselves run
against real guests in tests/test_vm_wayland.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fleet import USERS
from vmsilo.cli.vm_clipboard import main

CONFIG = """
user = "alice"
stateDir = "{d}/state"
runtimeDir = "{d}/run"
[vms.work]
hypervisor = "qemu"
[vms.plain]
hypervisor = "qemu"
gpu = false
"""


def run(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text(CONFIG.format(d=tmp_path))
    out, err = io.StringIO(), io.StringIO()
    status = main(["-c", str(cfg), *argv], users=USERS, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "status", "said"),
    [
        ((), 255, "usage: vm-clipboard"),
        (("cut", "work"), 255, "usage: vm-clipboard"),
        (("copy", "nosuch"), 255, "Available VMs: plain, work"),
        (("copy", "plain"), 255, "VM plain has no windows"),
        (("copy", "work"), 255, "VM work shows no windows now"),
        (("paste",), 1, "no VM's window has the keyboard focus"),
    ],
)
def test_failures_say_why(tmp_path: Path, argv: tuple[str, ...], status: int, said: str) -> None:
    got, _out, err = run(tmp_path, *argv)
    assert got == status, err
    assert said in err
    assert "Traceback" not in err
