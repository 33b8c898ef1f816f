#!/usr/bin/env python3
"""vm-run latency on a real guest (QEMU; TCG where KVM cannot run).

1. Warm, in-process: the client library (`run_session`, what vm-run uses) against a bare
   protocol round trip over the same command socket, both running `true` in the guest. The
   difference of medians is vmsilo's host-side overhead (target <= 2 ms).
2. The whole `vm-run bench true` process on a warm VM (Python start, config, plan, session;
   target <= 0.3 s).
3. Cold: `vm-run bench true` on a stopped VM against the VMM's own boot-to-ready measured in the
   same run by the supervisor (target <= +0.3 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from benchvm import bench_vm, median_ms, raw_exec

from vmsilo.channel.client import run_session
from vmsilo.channel.protocol import ExecRequest

N = 40


def main() -> int:
    ok = True
    with bench_vm() as vm:
        vm.start()

        async def inprocess() -> tuple[list[float], list[float]]:
            lib, raw = [], []
            devnull = os.open(os.devnull, os.O_WRONLY)
            for _ in range(N):
                t = time.perf_counter()
                await raw_exec(vm.socket, ["true"])
                raw.append(time.perf_counter() - t)
                t = time.perf_counter()
                status = await run_session(
                    vm.socket,
                    ExecRequest(argv=["true"]),
                    stdin=None,
                    stdout=devnull,
                    stderr=devnull,
                    forward_signals=False,
                )
                lib.append(time.perf_counter() - t)
                assert status == 0
            os.close(devnull)
            return lib, raw

        lib, raw = asyncio.run(inprocess())
        overhead = median_ms(lib) - median_ms(raw)
        print(f"raw protocol round trip (true): median {median_ms(raw):6.2f} ms over {N}")
        print(f"client library run_session(true): median {median_ms(lib):6.2f} ms over {N}")
        print(f"host-side overhead of the client library: {overhead:+.2f} ms (target <= 2 ms)")
        ok &= overhead <= 2.0

        procs = []
        for _ in range(15):
            t = time.perf_counter()
            p = vm.cmd("vm-run", "bench", "true")
            procs.append(time.perf_counter() - t)
            assert p.returncode == 0, p.stderr
        print(
            f"whole `vm-run bench true` process, warm: median {median_ms(procs):6.1f} ms"
            " (target <= 300 ms)"
        )
        ok &= median_ms(procs) <= 300

        vm.stop()
        t = time.perf_counter()
        p = vm.cmd("vm-run", "bench", "true")
        cold = time.perf_counter() - t
        assert p.returncode == 0, p.stderr
        state = json.loads((vm.run_dir / "bench.state.json").read_text())
        boot = state["ready_at"] - state["extra"]["vmm_started_at"]
        print(
            f"cold `vm-run bench true`: {cold:6.2f} s; VMM start to guest ready: {boot:6.2f} s;"
            f" vmsilo's share: {cold - boot:+.2f} s (target <= +0.3 s)"
        )
        ok &= cold - boot <= 0.3
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
