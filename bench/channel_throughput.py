#!/usr/bin/env python3
"""Throughput through vm-run against a bare copy over the same transport (virtio-serial mux).

Both move N MiB of guest stdout to the host: `vm-run bench head -c N /dev/zero > /dev/null`
(the whole tool, its start-up included) and a bare protocol session doing the same with no
client library (frames in, credits out, bytes dropped), alternating, best of REPEATS each
(the emulated guest's speed drifts between runs). Target: vm-run >= 0.8x the bare copy.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from benchvm import bench_vm, raw_exec

MIB = 64
REPEATS = 5


def main() -> int:
    size = MIB << 20
    argv = ["head", "-c", str(size), "/dev/zero"]
    with bench_vm() as vm:
        vm.start()
        raw_rates, tool_rates = [], []
        for _ in range(REPEATS):
            t = time.perf_counter()
            status, got = asyncio.run(raw_exec(vm.socket, argv))
            raw_rates.append(size / (time.perf_counter() - t) / 1e6)
            assert (status, got) == (0, size)
            t = time.perf_counter()
            p = vm.cmd("vm-run", "bench", *argv, stdout=subprocess.DEVNULL)
            tool_rates.append(size / (time.perf_counter() - t) / 1e6)
            assert p.returncode == 0, p.stderr
        raw, tool = max(raw_rates), max(tool_rates)
        print(f"bare protocol copy: {raw:7.1f} MB/s  (best of {REPEATS}, {MIB} MiB)")
        print(f"vm-run:             {tool:7.1f} MB/s  (best of {REPEATS}, {MIB} MiB)")
        ratio = tool / raw
        print(f"vm-run / bare = {ratio:.2f}  (target >= 0.8)")
    ok = ratio >= 0.8
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
