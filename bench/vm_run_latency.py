#!/usr/bin/env python3
"""vm-run latency on a real guest (QEMU; TCG where KVM cannot run).

1. Warm, in-process: the client libraries — `run_session` (asyncio; vm-run's with -t) and
   `run_blocking_session` (vm-run's otherwise) — against a bare protocol round trip over the
   same command socket, all running `true` in the guest. The differences of medians are
   vmsilo's host-side overhead (target <= 2 ms).
2. The whole `vm-run bench true` process on a warm VM beside what it cannot avoid, sampled
   alternately in the same run: the interpreter alone (`python -c pass`, same environment) and
   the bare protocol round trip (in-process, as in 1). The margin — whole process minus both
   medians — is vm-run's own cost: imports, reading the config, connecting, exiting (target
   <= 20 ms; and the whole process <= 0.3 s). vm-run runs as on a desktop: the tree is
   byte-compiled (as an install is) and $XDG_RUNTIME_DIR is set (a private directory), where
   vm-run remembers what it read of an unchanged config.
3. Cold: `vm-run bench true` on a stopped VM against the VMM's own boot-to-ready measured in the
   same run by the supervisor (target <= +0.3 s).
"""

from __future__ import annotations

import asyncio
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from benchvm import bench_vm, median_ms, raw_exec

from vmsilo.channel.blocking_client import run_blocking_session
from vmsilo.channel.client import run_session
from vmsilo.channel.protocol import ChannelError, ExecRequest

N = 100  # alternating samples of each: under emulation single round trips vary by several ms
#: A session is sometimes lost on this loaded machine (the code of main before this bench's
#: changes too: 2 of 100 bare sessions after vm-run processes): an asyncio client gets EOF or a
#: reset instead of the EXIT. Not yet explained; likely: the supervisor closes the connection
#: as soon as the EXIT is relayed, a frame the client sent late (its STDIN_EOF) is then unread,
#: so the kernel resets the connection, and asyncio's StreamReader drops the EXIT it had
#: buffered once the reset is reported. The blocking client reads what arrived first.
LOST = "a pre-existing race, see LOST in this script"
N_PROC = 40  # alternating samples of the interpreter, the bare round trip and the vm-run process


def main() -> int:
    ok = True
    with bench_vm() as vm:
        vm.start()

        lost: dict[str, int] = {}

        async def sample(kind: str, samples: list[float], session: Awaitable[object]) -> None:
            """Time one session; one whose connection the supervisor dropped is counted, not
            timed (see LOST)."""
            t = time.perf_counter()
            try:
                await session
            except (ChannelError, SystemExit) as e:
                lost[kind] = lost.get(kind, 0) + 1
                print(f"lost a {kind} session: {e}", file=sys.stderr)
                return
            samples.append(time.perf_counter() - t)

        async def blocking_session(devnull: int) -> None:
            status = run_blocking_session(  # (blocks this loop: nothing else runs on it)
                vm.socket,
                ExecRequest(argv=["true"]),
                stdin=None,
                stdout=devnull,
                stderr=devnull,
                forward_signals=False,
            )
            assert status == 0

        async def inprocess() -> tuple[list[float], list[float], list[float]]:
            lib: list[float] = []
            blocking: list[float] = []
            raw: list[float] = []
            devnull = os.open(os.devnull, os.O_WRONLY)
            for _ in range(N):
                await sample("bare", raw, raw_exec(vm.socket, ["true"]))
                await sample(
                    "run_session",
                    lib,
                    run_session(
                        vm.socket,
                        ExecRequest(argv=["true"]),
                        stdin=None,
                        stdout=devnull,
                        stderr=devnull,
                        forward_signals=False,
                    ),
                )
                await sample("blocking", blocking, blocking_session(devnull))
            os.close(devnull)
            return lib, blocking, raw

        lib, blocking, raw = asyncio.run(inprocess())
        overhead = median_ms(lib) - median_ms(raw)
        overhead_blocking = median_ms(blocking) - median_ms(raw)
        print(f"raw protocol round trip (true): median {median_ms(raw):6.2f} ms over {N}")
        print(f"client library run_session(true): median {median_ms(lib):6.2f} ms over {N}")
        print(f"blocking client (vm-run's, but -t): median {median_ms(blocking):6.2f} ms over {N}")
        print(
            f"host-side overhead of the client library: {overhead:+.2f} ms, of the blocking"
            f" client: {overhead_blocking:+.2f} ms (target <= 2 ms)"
        )
        ok &= overhead <= 2.0 and overhead_blocking <= 2.0

        compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "src"), quiet=1, workers=1)
        xdg = tempfile.mkdtemp(prefix="vmsilo-bench-xdg-")  # mode 0700
        vm.env["XDG_RUNTIME_DIR"] = xdg
        vm.cmd("vm-run", "bench", "true")  # remembers the config (see cli/quick_look.py)

        async def bare(samples: list[float]) -> None:
            await sample("bare", samples, raw_exec(vm.socket, ["true"]))

        # the installed command (a console script: no runpy), when this venv has one
        script = Path(sys.executable).with_name("vm-run")
        interp: list[float] = []
        bare_rt: list[float] = []
        procs: list[float] = []
        scripts: list[float] = []
        for _ in range(N_PROC):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=vm.env, check=True)
            interp.append(time.perf_counter() - t)
            asyncio.run(bare(bare_rt))
            t = time.perf_counter()
            p = vm.cmd("vm-run", "bench", "true")
            procs.append(time.perf_counter() - t)
            assert p.returncode == 0, p.stderr
            if script.exists():
                t = time.perf_counter()
                subprocess.run([str(script), "bench", "true"], env=vm.env, check=True)
                scripts.append(time.perf_counter() - t)
        base = median_ms(interp) + median_ms(bare_rt)
        margin = median_ms(procs) - base
        print(f"interpreter alone (python -c pass): median {median_ms(interp):6.1f} ms")
        print(f"bare protocol round trip (true):    median {median_ms(bare_rt):6.1f} ms")
        print(
            f"whole `vm-run bench true` process (python -m), warm: median {median_ms(procs):6.1f}"
            f" ms over {N_PROC} (target <= 300 ms)"
        )
        print(
            f"vm-run's own margin (process - interpreter - round trip): {margin:+.1f} ms"
            " (target <= +20 ms)"
        )
        if scripts:
            print(
                f"the installed `vm-run` command, warm: median {median_ms(scripts):6.1f} ms,"
                f" margin {median_ms(scripts) - base:+.1f} ms"
            )
        ok &= median_ms(procs) <= 300 and margin <= 20
        if lost:
            print(f"sessions lost (not timed): {lost} — {LOST}")
        shutil.rmtree(xdg)

        shares, parts = [], []
        for _ in range(3):
            vm.stop()
            t0 = time.time()
            p = vm.cmd("vm-run", "bench", "true")
            t1 = time.time()
            assert p.returncode == 0, p.stderr
            st = json.loads((vm.run_dir / "bench.state.json").read_text())
            vmm_at, ready_at = st["extra"]["vmm_started_at"], st["ready_at"]
            shares.append((t1 - t0) - (ready_at - vmm_at))
            parts.append((st["started_at"] - t0, vmm_at - st["started_at"], t1 - ready_at))
            print(
                f"cold `vm-run bench true`: {t1 - t0:5.2f} s, VMM start to guest ready"
                f" {ready_at - vmm_at:5.2f} s; vmsilo's share {shares[-1]:+.3f} s = until the"
                f" supervisor runs {parts[-1][0]:.3f} + until the VMM runs {parts[-1][1]:.3f}"
                f" + after ready {parts[-1][2]:.3f}"
            )
        share = statistics.median(shares)
        print(f"median share of a cold vm-run: {share:+.3f} s (target <= +0.3 s)")
        ok &= share <= 0.3
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
