#!/usr/bin/env python3
"""vm-copy's throughput against the plain pipe between two vm-runs, in one run.

Two QEMU guests (the bench VM and a second one, `bench2`); a file of MIB MiB of random bytes in
the first. Alternating, best of REPEATS each (the emulated guests' speed drifts): the whole
``vm-copy bench bench2 F`` process, and the shell pipeline
``vm-run bench cat F | vm-run bench2 sh -c 'cat > F'`` — the same bytes over the same two
channels, without vm-copy's packing, checks and unpacking. Target: vm-copy >= 0.9x the pipe.
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchvm import bench_vm

MIB = 64
REPEATS = 3
SECOND = """
[vms.bench2]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
"""


def main() -> int:
    size = MIB << 20
    with bench_vm(more=SECOND) as vm:
        try:
            vm.start()
            if vm.cmd("vmsilo", "start", "bench2").returncode != 0:
                raise SystemExit("bench2 did not start")
            p = vm.cmd("vm-run", "bench", "sh", "-c", f"head -c {size} /dev/urandom > F")
            assert p.returncode == 0, p.stderr
            copy_rates, pipe_rates = [], []
            for _ in range(REPEATS):
                vm.cmd("vm-run", "bench2", "rm", "-rf", "Incoming", "F")
                t = time.perf_counter()
                p = vm.cmd("vm-copy", "bench", "bench2", "F")
                copy_rates.append(size / (time.perf_counter() - t) / 1e6)
                assert p.returncode == 0, p.stderr
                t = time.perf_counter()
                src = subprocess.Popen(
                    [sys.executable, "-m", "vmsilo.cli.vm_run", "bench", "cat", "F"],
                    env=vm.env,
                    stdout=subprocess.PIPE,
                )
                p = vm.cmd("vm-run", "bench2", "sh", "-c", "cat > F", stdin=src.stdout)
                assert src.stdout is not None
                src.stdout.close()
                assert src.wait() == 0 and p.returncode == 0, p.stderr
                pipe_rates.append(size / (time.perf_counter() - t) / 1e6)
            sums = vm.cmd(
                "vm-run", "bench2", "sh", "-c", "sha256sum F Incoming/bench/F | cut -c1-64"
            ).stdout.split()
            assert len(sums) == 2 and sums[0] == sums[1], sums
        finally:
            vm.cmd("vmsilo", "stop", "bench2")
    copy, pipe = max(copy_rates), max(pipe_rates)
    print(f"vm-copy:                     {copy:7.1f} MB/s  (best of {REPEATS}, {MIB} MiB)")
    print(f"vm-run cat | vm-run 'cat >': {pipe:7.1f} MB/s  (best of {REPEATS}, {MIB} MiB)")
    print(
        f"all runs, MB/s: vm-copy {[round(r, 1) for r in copy_rates]},"
        f" pipe {[round(r, 1) for r in pipe_rates]}"
    )
    ratio = copy / pipe
    print(f"vm-copy / pipe = {ratio:.2f}  (target >= 0.9)")
    ok = ratio >= 0.9
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
