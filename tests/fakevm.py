"""A throwaway vmsilo installation whose VMM is tests/fake_qemu.py (no VM boots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent


@dataclass
class FakeInstall:
    root: Path
    config: Path
    launches: Path

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["VMSILO_CONFIG"] = str(self.config)
        env["FAKE_QEMU_LOG"] = str(self.launches)
        env.update(extra)
        return env

    def cmd(
        self, tool: str, *args: str, check: bool = False, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        module = {
            "vmsilo": "vmsilo.cli.vmsilo",
            "vm-run": "vmsilo.cli.vm_run",
            "vm-start": "vmsilo.cli.vm_start",
            "vm-stop": "vmsilo.cli.vm_stop",
        }[tool]
        env = kw.pop("env", None) or self.env()
        if "stdout" not in kw:
            kw["stdout"] = subprocess.PIPE
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=check,
            env=env,
            **kw,
        )

    def status(self, vm: str) -> dict[str, Any]:
        proc = self.cmd("vmsilo", "status", vm, "--json", check=True)
        data: dict[str, Any] = json.loads(proc.stdout)["vms"][0]
        return data

    def launch_count(self) -> int:
        if not self.launches.exists():
            return 0
        return len(self.launches.read_text().split())


def make_fake_install(root: Path, vms: str = "", extra: str = "") -> FakeInstall:
    root.mkdir(parents=True, exist_ok=True)
    wrapper = root / "fake-qemu"
    # $0 is the path the supervisor executed: the fake records it as its argv[0]
    wrapper.write_text(
        '#!/bin/sh\nexport FAKE_QEMU_ARGV0="$0"\n'
        f'exec {sys.executable} {TESTS / "fake_qemu.py"} "$@"\n'
    )
    wrapper.chmod(0o755)
    for name in ("vmlinuz", "initrd.img", "root.img"):
        (root / name).write_bytes(b"fake")
    vm_block = vms or "[vms.fake]\n"
    config = root / "vmsilo.toml"
    config.write_text(
        f"""
user = "root"
stateDir = "{root}/state"
runtimeDir = "{root}/run"
stopTimeout = 10
startTimeout = 30
{extra}
[qemu]
binary = "{wrapper}"
accel = "tcg"
"""
        + vm_block.replace(
            "@VM@",
            f"""hypervisor = "qemu"
memory = 64
cpus = 1
sharedHome = false
kernel = "{root}/vmlinuz"
initramfs = "{root}/initrd.img"
rootDisk = {{ path = "{root}/root.img", ro = true }}
""",
        )
    )
    return FakeInstall(root, config, root / "launches")
