"""A real vmsilo installation for VM tests: its own runtime dir, the session's image, QEMU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VM_DEMO = """
[vms.demo]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
"""

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
class Install:
    config: Path
    run_dir: Path
    state_dir: Path
    launches: Path
    netns: str | None = None  # run every command (and so the VMs' taps) in this namespace

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["VMSILO_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    def cmd(
        self, tool: str, *args: str, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        module = TOOLS[tool]
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return subprocess.run(
            [*prefix, sys.executable, "-m", module, *args],
            capture_output=True,
            input=input,
            timeout=timeout,
            env=self.env(),
        )

    def status(self, vm: str = "demo") -> dict[str, Any]:
        p = self.cmd("vmsilo", "status", vm, "--json")
        assert p.returncode == 0, p.stderr
        data: dict[str, Any] = json.loads(p.stdout)["vms"][0]
        return data

    def launch_count(self) -> int:
        return len(self.launches.read_text().split()) if self.launches.exists() else 0

    def argv(self, tool: str, *args: str) -> list[str]:
        return [sys.executable, "-m", TOOLS[tool], *args]


@contextlib.contextmanager
def qemu_install(state_dir: Path, tag: str, vms: str, netns: bool = False) -> Iterator[Install]:
    """Config + runtime dir; QEMU behind a wrapper that counts launches. Stops VMs after.

    ``netns``: run everything in a fresh network namespace (VMs with interfaces)."""
    run_dir = Path(f"/tmp/vmsilo-{tag}-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    launches = run_dir / "launches"
    wrapper = run_dir / "qemu"
    real = shutil.which("qemu-system-x86_64")
    wrapper.write_text(f'#!/bin/sh\necho $$ >> {launches}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    config = run_dir / "vmsilo.toml"
    config.write_text(
        f"""
user = "root"
stateDir = "{state_dir}"
runtimeDir = "{run_dir}"
startTimeout = 120
stopTimeout = 30
[qemu]
binary = "{wrapper}"
accel = "tcg"
"""
        + vms
    )
    ns = f"vmsilo-{tag}-{os.getpid()}" if netns else None
    if ns:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    install = Install(config, run_dir, state_dir, launches, ns)
    try:
        yield install
    finally:
        for name in json.loads(install.cmd("vmsilo", "plan", "--json").stdout or b"{}").get(
            "vms", {}
        ):
            install.cmd("vmsilo", "stop", "--force", name)
        if ns:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
