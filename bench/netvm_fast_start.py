#!/usr/bin/env python3
"""fastStart (SPEC §10) behind a netvm (SPEC §3): a cold `vm-run CLIENT true` while both the
client and its netvm are stopped — both restored from their saved states, next to both booted,
measured alternately in the same run (QEMU; TCG where KVM cannot run).

Two pairs with the same plans but for ``fastStart``: ``nfgate``/``nfclient`` (fastStart on both)
and ``nbgate``/``nbclient`` (boot). Everything runs in a network namespace of its own (the
netvm's uplink is the host's NAT there), so no tap or nft table touches the host's.
1. The first cold start of ``nfclient`` (no states yet): both boot and save; what it costs.
2. N times each, alternately: stop both VMs of a pair, then a cold `vm-run CLIENT true`
   (which starts the netvm first: its restore, its routing set-up, then the client's restore);
   medians, and the split (the netvm until ready, of which its routing set-up; then the client
   until ready; ready to vm-run's exit).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchvm import STATE, TOOLS, BenchVM, bench_vm

N = 5

PAIRS = """
[vms.{gate}]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
{fast}network = {{ isNetvm = true, netvm = "host" }}
[vms.{client}]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
{fast}network = {{ netvm = "{gate}" }}
"""
FAST = ("nfgate", "nfclient")
BOOT = ("nbgate", "nbclient")


class NetnsBench:
    """The bench VMs' commands, all run inside one network namespace."""

    def __init__(self, vm: BenchVM, netns: str) -> None:
        self.vm, self.netns = vm, netns

    def cmd(self, tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-m", TOOLS[tool], *args]
        return subprocess.run(argv, env=self.vm.env, capture_output=True)

    def state(self, name: str) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.vm.run_dir / f"{name}.state.json").read_text())
        return data

    def cold(self, gate: str, client: str) -> tuple[float, dict[str, float | bool]]:
        """Both stopped, then a cold `vm-run CLIENT true`: its time and the split."""
        self.cmd("vmsilo", "stop", client)
        self.cmd("vmsilo", "stop", gate)
        t0 = time.time()
        p = self.cmd("vm-run", client, "true")
        t1 = time.time()
        if p.returncode != 0:
            raise SystemExit(p.stderr.decode())
        g, c = self.state(gate), self.state(client)
        gx, cx = g["extra"], c["extra"]
        assert isinstance(gx, dict) and isinstance(cx, dict)
        split: dict[str, float | bool] = {
            "netvm": float(g["ready_at"]) - t0,  # type: ignore[arg-type]
            "client": float(c["ready_at"]) - float(g["ready_at"]),  # type: ignore[arg-type]
            "after": t1 - float(c["ready_at"]),  # type: ignore[arg-type]
            "restored": gx.get("start") == "restored" and cx.get("start") == "restored",
            "netvm_setup": float(gx.get("netvm_setup_s", 0.0)),
            "gate_save_s": (gx.get("saved") or {}).get("save_s", 0.0),
            "client_save_s": (cx.get("saved") or {}).get("save_s", 0.0),
        }
        return t1 - t0, split


def main() -> int:
    more = PAIRS.format(gate=FAST[0], client=FAST[1], fast="fastStart = true\n")
    more += PAIRS.format(gate=BOOT[0], client=BOOT[1], fast="")
    netns = f"vmsilo-bench-{os.getpid()}"
    with bench_vm(more=more) as vm:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        bench = NetnsBench(vm, netns)
        try:
            for name in FAST:
                shutil.rmtree(STATE / name / "saved", ignore_errors=True)
            first, fsplit = bench.cold(*FAST)
            if fsplit["restored"]:
                raise SystemExit("the first start restored: no fresh states")
            boot0, _ = bench.cold(*BOOT)
            print(
                f"first cold `vm-run {FAST[1]} true` (netvm and client boot and save):"
                f" {first:5.2f} s, of which saving {fsplit['gate_save_s']:.3f} s (netvm) +"
                f" {fsplit['client_save_s']:.3f} s (client); both booted without fastStart in"
                f" the same minute: {boot0:5.2f} s"
            )
            restores, boots, splits, bsplits = [], [], [], []
            for _ in range(N):
                t, split = bench.cold(*FAST)
                if not split["restored"]:
                    raise SystemExit("a cold start booted instead of restoring")
                restores.append(t)
                splits.append(split)
                t, split = bench.cold(*BOOT)
                boots.append(t)
                bsplits.append(split)
            med_r, med_b = statistics.median(restores), statistics.median(boots)
            print(
                f"cold `vm-run {FAST[1]} true`, netvm and client restored: "
                + ", ".join(f"{t:.3f}" for t in restores)
                + f" s; median {med_r:.3f} s"
            )
            print(
                f"cold `vm-run {BOOT[1]} true`, netvm and client booted: "
                + ", ".join(f"{t:.2f}" for t in boots)
                + f" s; median {med_b:.2f} s; ratio boot/restore {med_b / med_r:.1f}"
            )
            for label, ss in (("restored", splits), ("booted", bsplits)):

                def med(key: str, ss: list[dict[str, float | bool]] = ss) -> float:
                    return statistics.median(float(s[key]) for s in ss)

                print(
                    f"split, {label} (medians): the netvm until ready {med('netvm'):.3f} (of which"
                    f" its routing set-up {med('netvm_setup'):.3f}) + the client until ready"
                    f" {med('client'):.3f} + ready"
                    f" to vm-run's exit {med('after'):.3f} s"
                )
        finally:
            for name in (FAST[1], BOOT[1], FAST[0], BOOT[0]):
                bench.cmd("vmsilo", "stop", name)
            subprocess.run(["ip", "netns", "del", netns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
