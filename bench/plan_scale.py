#!/usr/bin/env python3
"""How planning scales: config validation + plan + crosvm argv for 10…2000 VMs.

Each VM has two configured interfaces, a link to the host (so three effective interfaces and a
/31 each) and a share. Two measurements:

- in-process: validation + plan + every VM's crosvm argv, best of several runs per size;
- the CLI path a user or a tool pays: a subprocess ``vmsilo -c FILE plan --json`` on the same
  fleet written as TOML (reading, TOML parsing, validation, plan, JSON out), minus the start-up
  of the same command on a one-VM config (interpreter, imports, argparse), so that the figure
  is the part that grows with the fleet.

Prints the ratio t(2000)/t(1000) of both: linear work gives 2.0; the target is <= 2.6, and 1000
VMs under 1 s above start-up on the 2-core reference machine.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vmsilo.backends.crosvm import crosvm_argv
from vmsilo.config.load import validate_config
from vmsilo.config.users import StaticUsers
from vmsilo.plan.build import build_plan

ROOT = Path(__file__).resolve().parents[1]
USERS = StaticUsers.single("alice")
SIZES = (10, 100, 1000, 2000)
CLI_SIZES = (1000, 2000)
REPEATS = 3
CLI_REPEATS = 5


def fleet(n: int, user: str = "alice") -> dict[str, Any]:
    vms = {}
    for i in range(n):
        vms[f"vm{i:05d}"] = {
            "network": {
                "netvm": "host",
                "interfaces": {
                    "eth0": {"addresses": [f"192.168.{i % 250}.2/24"]},
                    "eth1": {"dhcp": True},
                },
            },
            "sharedDirectories": {"data": {"path": f"/srv/data/{i}", "mountPoint": "/data"}},
        }
    return {"user": user, "netvmRange": "10.200.0.0/16", "vms": vms}


def fleet_toml(n: int, user: str, runtime: Path) -> str:
    """The same fleet as :func:`fleet`, written as a user would (an existing host user, and
    runtime/state dirs in a scratch directory so nothing real is touched)."""
    lines = [
        f'user = "{user}"',
        'netvmRange = "10.200.0.0/16"',
        f'runtimeDir = "{runtime}"',
        f'stateDir = "{runtime}"',
    ]
    for i in range(n):
        name = f"vm{i:05d}"
        lines += [
            f"[vms.{name}.network]",
            'netvm = "host"',
            f'interfaces.eth0.addresses = ["192.168.{i % 250}.2/24"]',
            "interfaces.eth1.dhcp = true",
            f"[vms.{name}.sharedDirectories.data]",
            f'path = "/srv/data/{i}"',
            'mountPoint = "/data"',
        ]
    return "\n".join(lines) + "\n"


def once(data: dict[str, Any]) -> float:
    start = time.perf_counter()
    plan = build_plan(validate_config(data, USERS), USERS)
    argvs = [crosvm_argv(plan, vm) for vm in plan.vms.values()]
    elapsed = time.perf_counter() - start
    assert len(argvs) == len(data["vms"])
    return elapsed


def cli_once(config: Path) -> float:
    """Wall time of one ``vmsilo -c config plan --json`` (output read and dropped)."""
    argv = [sys.executable, "-m", "vmsilo.cli.vmsilo", "-c", str(config), "plan", "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def cli_times() -> tuple[float, dict[int, float]]:
    """(start-up, {size: time above start-up}), best of CLI_REPEATS, sizes alternating."""
    user = pwd.getpwuid(os.getuid()).pw_name
    with tempfile.TemporaryDirectory() as tmp:
        runtime = Path(tmp)
        configs = {}
        for n in (1, *CLI_SIZES):
            configs[n] = runtime / f"fleet{n}.toml"
            configs[n].write_text(fleet_toml(n, user, runtime))
        best = {n: float("inf") for n in configs}
        for _ in range(CLI_REPEATS):
            for n, path in configs.items():
                best[n] = min(best[n], cli_once(path))
    return best[1], {n: best[n] - best[1] for n in CLI_SIZES}


def main() -> int:
    times = {}
    for n in SIZES:
        data = fleet(n)
        times[n] = min(once(data) for _ in range(REPEATS))
        print(f"plan+argv {n:5d} VMs: {times[n] * 1000:8.1f} ms  ({times[n] / n * 1e6:6.1f} us/VM)")
    ratio = times[2000] / times[1000]
    print(f"t(2000)/t(1000) = {ratio:.2f}  (linear = 2.00; target <= 2.6)")
    print(f"t(1000) = {times[1000]:.3f} s  (target < 1 s)")

    startup, cli = cli_times()
    print(f"CLI start-up (plan --json of 1 VM): {startup * 1000:8.1f} ms")
    for n in CLI_SIZES:
        print(f"CLI plan --json {n:5d} VMs: {cli[n] * 1000:8.1f} ms above start-up")
    cli_ratio = cli[2000] / cli[1000]
    print(f"CLI t(2000)/t(1000) = {cli_ratio:.2f}  (target <= 2.6)")
    print(f"CLI t(1000) = {cli[1000]:.3f} s above start-up  (target < 1 s)")

    ok = ratio <= 2.6 and times[1000] < 1.0 and cli_ratio <= 2.6 and cli[1000] < 1.0
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
