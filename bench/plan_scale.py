#!/usr/bin/env python3
"""How planning scales: config validation + plan + crosvm argv for 10…2000 VMs.

Each VM has two configured interfaces, a link to the host (so three effective interfaces and a
/31 each) and a share. Prints the best of several runs per size and the ratio t(2000)/t(1000):
linear work gives 2.0; the target is <= 2.6, and 1000 VMs under 1 s on the 2-core CI machine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vmsilo.backends.crosvm import crosvm_argv
from vmsilo.config.load import validate_config
from vmsilo.config.users import StaticUsers
from vmsilo.plan.build import build_plan

USERS = StaticUsers.single("alice")
SIZES = (10, 100, 1000, 2000)
REPEATS = 3


def fleet(n: int) -> dict[str, Any]:
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
    return {"user": "alice", "netvmRange": "10.200.0.0/16", "vms": vms}


def once(data: dict[str, Any]) -> float:
    start = time.perf_counter()
    plan = build_plan(validate_config(data, USERS), USERS)
    argvs = [crosvm_argv(plan, vm) for vm in plan.vms.values()]
    elapsed = time.perf_counter() - start
    assert len(argvs) == len(data["vms"])
    return elapsed


def main() -> int:
    times = {}
    for n in SIZES:
        data = fleet(n)
        times[n] = min(once(data) for _ in range(REPEATS))
        print(f"plan+argv {n:5d} VMs: {times[n] * 1000:8.1f} ms  ({times[n] / n * 1e6:6.1f} us/VM)")
    ratio = times[2000] / times[1000]
    print(f"t(2000)/t(1000) = {ratio:.2f}  (linear = 2.00; target <= 2.6)")
    print(f"t(1000) = {times[1000]:.3f} s  (target < 1 s)")
    ok = ratio <= 2.6 and times[1000] < 1.0
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
