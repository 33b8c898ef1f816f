"""Attacks SPEC §11.2 from a real QEMU guest: a flood into a slow reader, and guest root
writing late hellos (and junk) to the ready port.

The in-process suite (test_hostile_agent.py) drives a misbehaving agent frame by frame; these
check the same promises end to end through the product: vm-run's memory stays bounded while
the guest floods a stdout nobody reads, another session is served meanwhile, and a second hello
switches neither transport nor version — the supervisor keeps serving.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmenv import VM_DEMO, Install, qemu_install

FLOOD = 64 << 20  # bytes the guest writes: far more than the window (256 KiB)
#: vm-run's peak RSS may grow this much over its size once the flood began
RSS_SLACK = 16 << 20


@pytest.fixture(scope="module")
def inst(image: Any, state_dir: Path) -> Iterator[Install]:
    with qemu_install(state_dir, "hg", VM_DEMO) as install:
        p = install.cmd("vmsilo", "start", "demo", timeout=300)
        assert p.returncode == 0, p.stderr.decode()
        yield install


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.vm
def test_flood_into_a_slow_reader_keeps_vm_run_small(inst: Install) -> None:
    script = f"head -c {FLOOD} /dev/zero; read line; echo done >&2"
    p = subprocess.Popen(
        inst.argv("vm-run", "demo", "sh", "-c", script),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=inst.env(),
    )
    assert p.stdout is not None and p.stdin is not None and p.stderr is not None
    try:
        first = p.stdout.read(1)  # the flood has begun; nobody reads for a while now
        assert first == b"\0"
        baseline = _kib(p.pid, "VmRSS")
        # the VM serves another session meanwhile
        other = inst.cmd("vm-run", "demo", "echo", "served")
        assert (other.returncode, other.stdout) == (0, b"served\n"), other.stderr
        got = 1
        while got < FLOOD:
            chunk = p.stdout.read(min(1 << 20, FLOOD - got))
            assert chunk, f"vm-run's output ended after {got} bytes"
            got += len(chunk)
        peak = _kib(p.pid, "VmHWM")  # the peak over the whole flood, vm-run still running
        p.stdin.write(b"\n")
        p.stdin.close()
        assert p.wait(timeout=120) == 0
        assert p.stderr.read() == b"done\n"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert got == FLOOD
    assert peak - baseline < RSS_SLACK, f"vm-run grew by {(peak - baseline) >> 20} MiB"


@pytest.mark.vm
def test_late_hello_from_guest_root_changes_nothing(inst: Install) -> None:
    before = inst.status()
    assert before["state"] == "running"
    hellos = [
        {"hello": "vmsilo-agent", "version": 1, "transport": "vsock", "pid": 1},
        {"hello": "vmsilo-agent", "version": 1, "transport": "channel", "pid": 1},
        {"hello": "vmsilo-agent", "version": 99, "transport": "channel", "pid": 1},
    ]
    lines = [json.dumps(h) for h in hellos]
    attack = (
        "import os\n"
        "from vmsilo.guest.ports import find_ready_console, find_virtio_port\n"
        "path = str(find_virtio_port('org.vmsilo.ready') or find_ready_console())\n"
        # the agent holds the port open (a virtio port opens once: EBUSY); guest root takes
        # a copy of the agent's descriptor instead (pidfd_getfd), as an attacker would
        "import ctypes\n"
        "def take():\n"
        "    for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "        for n in os.listdir(f'/proc/{pid}/fd'):\n"
        "            try:\n"
        "                if os.readlink(f'/proc/{pid}/fd/{n}') != path: continue\n"
        "            except OSError: continue\n"
        "            libc = ctypes.CDLL(None, use_errno=True)\n"
        "            fd = libc.syscall(438, os.pidfd_open(int(pid)), int(n), 0)\n"
        "            if fd >= 0: return fd\n"
        "    raise SystemExit('no holder of ' + path)\n"
        "try:\n"
        "    fd = os.open(path, os.O_WRONLY)\n"
        "except OSError as e:\n"
        "    if e.errno != 16: raise\n"
        "    fd = take()\n"
        f"for line in {lines!r}:\n"
        "    os.write(fd, line.encode() + b'\\n')\n"
        "os.write(fd, b'[' * 200000 + b'\\n')\n"
        "os.write(fd, b'x' * (2 << 20) + b'\\n')\n"
        "os.write(fd, b'{\"hello\":\"vmsilo-agent\",\"version\":' + b'9' * 5000 + b'}\\n')\n"
        f"os.write(fd, {lines[0]!r}.encode() + b'\\n')\n"
        "os.close(fd)\n"
        "print('written')\n"
    )
    p = inst.cmd("vm-run", "--root", "demo", "python3", "-c", attack, timeout=300)
    assert (p.returncode, p.stdout) == (0, b"written\n"), p.stderr.decode()
    # the supervisor keeps serving, over the same transport, as the same VM
    for _ in range(3):
        p = inst.cmd("vm-run", "demo", "echo", "still")
        assert (p.returncode, p.stdout) == (0, b"still\n"), p.stderr.decode()
    after = inst.status()
    assert after["state"] == "running" and after["pid"] == before["pid"]
    assert inst.launch_count() == 1
    assert os.path.exists(inst.run_dir)
