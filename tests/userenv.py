"""A running VM whose desktop ``user`` is a real, throw-away non-root account, and a way to run
vmsilo's commands (or any code) as that account or as yet another one.

The interpreter for other accounts is Debian's ``/usr/bin/python3`` with the checkout and the
test venv's site-packages on ``PYTHONPATH``: the venv's own interpreter lives under root's home,
which another account cannot read.
"""

from __future__ import annotations

import contextlib
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

VM = "demo"
SRC = Path(vmsilo.__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
TOOLS = {
    "vmsilo": "vmsilo.cli.vmsilo",
    "vm-run": "vmsilo.cli.vm_run",
    "vm-copy": "vmsilo.cli.vm_copy",
    "vm-clipboard": "vmsilo.cli.vm_clipboard",
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

    def as_uid(self, uid: int, gid: int, code: str) -> subprocess.CompletedProcess[str]:
        """Python ``code`` run by Debian's interpreter as ``uid``/``gid`` with no other groups."""
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        return subprocess.run(
            [*argv, SYSTEM_PYTHON, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        )

    def state(self) -> dict[str, Any]:
        p = self.as_root("vmsilo", "status", VM, "--json")
        assert p.returncode == 0, p.stderr
        row: dict[str, Any] = json.loads(p.stdout)["vms"][0]
        return row


def desktop_config(
    user: str, state_dir: Path, run_dir: Path, vm: str = VM, *, more: str = ""
) -> str:
    """A config whose desktop ``user`` is ``user``: one small QEMU/TCG VM ``vm`` with its
    shared home under ``run_dir/shared``, then ``more`` (extra keys and tables) appended."""
    return (
        f"""
user = "{user}"
stateDir = "{state_dir}"
runtimeDir = "{run_dir}"
sharedRoot = "{run_dir}/shared"
startTimeout = 120
stopTimeout = 30
[qemu]
accel = "tcg"
[vms.{vm}]
hypervisor = "qemu"
memory = 512
cpus = 1
"""
        + more
    )


@contextlib.contextmanager
def user_vm(state_dir: Path, host_user: pwd.struct_passwd, tag: str) -> Iterator[Setup]:
    """A started VM ``demo`` whose config names ``host_user``; stopped afterwards."""
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail("setpriv and /usr/bin/python3 are part of Debian's base system")
    run_dir = Path(f"/tmp/vmsilo-{tag}-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o755)
    config = run_dir / "vmsilo.toml"
    config.write_text(
        desktop_config(host_user.pw_name, state_dir, run_dir, more="sharedHome = false\n")
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
