"""Shared set-up for the VM benchmarks: one QEMU guest from the default image, in /tmp.

Run as root. The image is built (or reused) in $VMSILO_BENCH_STATE (default
/var/lib/vmsilo), the same place `make demo` builds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vmsilo.channel.mux import StreamLink
from vmsilo.channel.protocol import (
    WINDOW,
    ExecRequest,
    FrameType,
    decode_exit,
    encode_u32,
)

STATE = Path(os.environ.get("VMSILO_BENCH_STATE", "/var/lib/vmsilo"))
TOOLS = {
    "vmsilo": "vmsilo.cli.vmsilo",
    "vm-run": "vmsilo.cli.vm_run",
    "vm-copy": "vmsilo.cli.vm_copy",
}


class BenchVM:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.config = run_dir / "vmsilo.toml"
        self.env = dict(os.environ, VMSILO_CONFIG=str(self.config))
        self.socket = str(run_dir / "bench-command.socket")

    def cmd(self, tool: str, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        """Run a vmsilo tool on the bench config; its stdout and stderr are captured unless
        ``stdout=``/``stderr=`` say otherwise."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.run(
            [sys.executable, "-m", TOOLS[tool], *args],
            env=self.env,
            **kw,  # type: ignore[arg-type]
        )

    def start(self) -> None:
        p = self.cmd("vmsilo", "start", "bench")
        if p.returncode != 0:
            raise SystemExit(p.stderr.decode())

    def stop(self) -> None:
        self.cmd("vmsilo", "stop", "bench")


@contextlib.contextmanager
def bench_vm(user: str = "root", more: str = "") -> Iterator[BenchVM]:
    """The bench VM (built, not started) for desktop ``user``, ``more`` keys appended to it."""
    if os.geteuid() != 0:
        raise SystemExit("run as root (it boots a VM)")
    run_dir = Path(f"/tmp/vmsilo-bench-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    vm = BenchVM(run_dir)
    vm.config.write_text(
        f"""
user = "{user}"
stateDir = "{STATE}"
runtimeDir = "{run_dir}"
[qemu]
accel = "auto"
[vms.bench]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
"""
        + more
    )
    p = vm.cmd("vmsilo", "image", "build")
    if p.returncode != 0:
        raise SystemExit(p.stderr.decode())
    try:
        yield vm
    finally:
        vm.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


async def raw_exec(socket_path: str, argv: list[str], consume: bool = True) -> tuple[int, int]:
    """The bare protocol, no client library: OPEN, return credit for output, wait for EXIT.

    Returns (exit status, output bytes)."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    link = StreamLink(reader, writer)
    try:
        await link.send(FrameType.OPEN, ExecRequest(argv=argv).encode())
        await link.send(FrameType.STDIN_EOF)
        received = 0
        pending = 0
        while True:
            frame = await link.recv()
            if frame is None:
                raise SystemExit("channel closed")
            if frame.type in (FrameType.STDOUT, FrameType.STDERR):
                received += len(frame.payload)
                pending += frame.cost
                if pending >= WINDOW // 2:
                    await link.send(FrameType.CREDIT, encode_u32(pending))
                    pending = 0
            elif frame.type == FrameType.EXIT:
                return decode_exit(frame.payload)[0], received
            elif frame.type == FrameType.ERROR:
                raise SystemExit(f"error frame: {frame.payload!r}")
    finally:
        await link.aclose()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t
