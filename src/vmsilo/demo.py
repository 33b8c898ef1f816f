"""``make demo``: build the small guest image, boot the example VM, run commands in it, stop it.

Every step runs the real command-line tools (printed before they run) and reports how long it
took, so the demo doubles as a smoke test of a fresh installation.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ARGS_SHOWN = ["two words", "it's", "$HOME", "", "a;b", "*", "-n", "ünïcødé"]


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def step(title: str, argv: list[str], *, input: bytes | None = None, expect: int = 0) -> bytes:
    print(f"\n== {title}")
    print("$ " + shlex.join([Path(argv[0]).name, *argv[1:]]), flush=True)
    t = time.monotonic()
    proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE)
    took = time.monotonic() - t
    sys.stdout.write(proc.stdout.decode(errors="replace"))
    print(f"-> exit status {proc.returncode} in {took:.2f} s", flush=True)
    TIMES.append((title, took))
    if proc.returncode != expect:
        raise SystemExit(f"demo: {title!r} exited {proc.returncode}, expected {expect}")
    return proc.stdout


TIMES: list[tuple[str, float]] = []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = os.path.abspath(args[0] if args else "examples/demo.toml")
    if os.geteuid() != 0:
        print("demo: run as root (it creates a VM, its disk and sockets)", file=sys.stderr)
        return 1
    os.environ["VMSILO_CONFIG"] = config
    vmsilo, vm_run = tool("vmsilo"), tool("vm-run")
    step("check the configuration", [vmsilo, "check"])
    step("build the guest image (cached after the first run)", [vmsilo, "image", "build"])
    subprocess.run([vmsilo, "stop", "demo"], stdout=subprocess.DEVNULL)
    step("boot the VM (QEMU; TCG where KVM cannot run)", [vmsilo, "start", "demo"])
    step("run a command", [vm_run, "demo", "uname", "-a"])
    out = step("exact argument passing", [vm_run, "demo", "printf", "[%s]\\n", *ARGS_SHOWN])
    assert out == "".join(f"[{a}]\n" for a in ARGS_SHOWN).encode(), out
    step("exit status propagation", [vm_run, "demo", "sh", "-c", "exit 3"], expect=3)
    step("a program that does not exist", [vm_run, "demo", "no-such-program"], expect=127)
    data = os.urandom(4 << 20)
    out = step("4 MiB of binary stdin through sha256sum", [vm_run, "demo", "sha256sum"], input=data)
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    print(f"   host sha256: {hashlib.sha256(data).hexdigest()} (same)")
    step("status", [vmsilo, "status"])
    step("stop the VM (power button, then wait)", [vmsilo, "stop", "demo"])
    print("\n== timings")
    for title, took in TIMES:
        print(f"  {took:7.2f} s  {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
