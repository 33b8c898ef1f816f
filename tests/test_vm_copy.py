"""vm-copy between two real QEMU guests (SPEC §9.4): a tree arrives intact, a hostile stream
piped into DST's unpacker leaves nothing outside ``~/Incoming/<SRC>/`` and nothing dangerous
inside, nothing is overwritten, and a VM that is not running fails with 255."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmenv import Install, qemu_install

pytestmark = pytest.mark.vm

VMS = """
[vms.alpha]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false

[vms.beta]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
"""
UNICODE = "ünïcødé ✓ name"
#: Each entry as `type path link-target mode`, and the hash of every file, under a directory.
LISTING = (
    "cd \"$1\" && find . -printf '%y %p %l %m\\n' | LC_ALL=C sort"
    " && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum"
)


@pytest.fixture(scope="module")
def inst(image: Any, state_dir: Path) -> Iterator[Install]:
    with qemu_install(state_dir, "copy", VMS) as install:
        yield install


def sh(inst: Install, vm: str, script: str, *args: str, input: bytes | None = None) -> str:
    p = inst.cmd("vm-run", vm, "sh", "-c", script, "sh", *args, input=input, timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def test_tree_arrives_intact_and_is_never_overwritten(inst: Install) -> None:
    sh(
        inst,
        "alpha",
        "set -e; mkdir -p ~/tree/sub ~/tree/empty; cd ~/tree"
        '; head -c 52428800 /dev/urandom > sub/big; printf unicode > "$1"'
        "; ln -s sub/big link; ln -s ../link sub/up; chmod 4755 sub/big",
        UNICODE,
    )
    p = inst.cmd("vm-copy", "alpha", "beta", "tree", timeout=900)
    assert p.returncode == 0, p.stderr
    assert p.stderr == b"", p.stderr  # no progress bar when not on a terminal
    sent = sh(inst, "alpha", LISTING, "/root/tree")
    arrived = sh(inst, "beta", LISTING, "/root/Incoming/alpha/tree")
    # the setuid bit is dropped on the way; everything else is the same
    assert arrived == sent.replace("f ./sub/big  4755", "f ./sub/big  755")
    assert f"f ./{UNICODE}  " in arrived and "l ./link sub/big" in arrived
    assert "d ./empty" in arrived and "l ./sub/up ../link" in arrived

    # a second copy is refused, naming the file; the first stays as it was
    sh(inst, "alpha", "echo changed > ~/tree/sub/big")
    p = inst.cmd("vm-copy", "alpha", "beta", "tree", timeout=600)
    assert p.returncode == 1, p.stderr
    assert b"~/Incoming/alpha/tree: already exists" in p.stderr
    assert sh(inst, "beta", LISTING, "/root/Incoming/alpha/tree") == arrived


SHADOW = (
    "set -e; mkdir -p ~/vmsilo/guest; touch ~/vmsilo/__init__.py ~/vmsilo/guest/__init__.py"
    "; for m in copy_pack copy_unpack; do"
    ' echo \'open("/tmp/shadowed", "w").close()\' > ~/vmsilo/guest/$m.py; done'
)


def test_a_vmsilo_directory_in_a_home_does_not_replace_the_guest_code(inst: Install) -> None:
    """The packer and unpacker run with ``python3 -I``: a ``vmsilo`` directory in the user's
    home (the working directory) is not imported instead of the image's modules."""
    for vm in ("alpha", "beta"):
        sh(inst, vm, SHADOW)
    sh(inst, "alpha", "echo small > ~/small")
    p = inst.cmd("vm-copy", "alpha", "beta", "small", timeout=600)
    assert p.returncode == 0, p.stderr
    assert sh(inst, "beta", "cat ~/Incoming/alpha/small") == "small\n"
    for vm in ("alpha", "beta"):
        assert sh(inst, vm, "ls /tmp/shadowed 2>/dev/null; rm -rf ~/vmsilo; true") == ""


def test_progress_bar_on_a_terminal(inst: Install) -> None:
    """On a terminal, rich draws the bar (bytes and a rate) on standard error."""
    import os
    import subprocess
    import sys

    sh(inst, "alpha", "head -c 4000000 /dev/urandom > ~/shown")
    master, slave = os.openpty()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "vmsilo.cli.vm_copy", "alpha", "beta", "shown"],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            env=inst.env(TERM="xterm", COLUMNS="100"),
            timeout=600,
        )
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: no writer left
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert p.returncode == 0, shown
    assert b"vm-copy" in shown and b"4.0" in shown and b"MB" in shown, shown


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in kw.items():
        setattr(info, key, value)
    return info


HOSTILE: dict[str, list[tuple[tarfile.TarInfo, bytes | None]]] = {
    "dotdot": [(_info("ok/../../../escaped", size=1), b"x")],
    "absolute": [(_info("/root/escaped", size=1), b"x")],
    "device": [(_info("ok/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)],
    "fifo": [(_info("ok/fifo", tarfile.FIFOTYPE), None)],
    "link-out": [(_info("ok/out", tarfile.SYMTYPE, linkname="../../.."), None)],
    "link-abs": [(_info("ok/abs", tarfile.SYMTYPE, linkname="/root"), None)],
    "through-link": [  # a link to a directory of the copy, then a file through it
        (_info("ok/sub", tarfile.DIRTYPE, mode=0o755), None),
        (_info("ok/via", tarfile.SYMTYPE, linkname="sub"), None),
        (_info("ok/via/escaped", size=1), b"x"),
    ],
    "hardlink": [(_info("ok/hard", tarfile.LNKTYPE, linkname="/etc/shadow"), None)],
}
#: What arrives before the hostile member: a directory, a file, a setuid file (bits dropped).
ARRIVED = ["d . 700", "d ./ok 755", "f ./ok/good 644", "f ./ok/setuid 755"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_stream_leaves_nothing_outside_and_nothing_dangerous(
    inst: Install, case: str
) -> None:
    stream = _tar(
        (_info("ok", tarfile.DIRTYPE, mode=0o755), None),
        (_info("ok/good", size=2, mode=0o644), b"ok"),
        (_info("ok/setuid", size=2, mode=0o6755), b"#!"),
        *HOSTILE[case],
    )
    src = f"evil-{case}"
    p = inst.cmd(
        "vm-run",
        "beta",
        "python3",
        "-I",
        "-m",
        "vmsilo.guest.copy_unpack",
        f"--src={src}",
        "--max-bytes=1000000",
        "--max-files=100",
        input=stream,
        timeout=300,
    )
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"~/Incoming/{src}".encode() in p.stderr, p.stderr  # the refusal names the file
    found = sh(inst, "beta", "cd ~/Incoming/$1 && find . -printf '%y %p %m\\n'", src)
    lines = sorted(found.splitlines())
    extra = ["d ./ok/sub 755", "l ./ok/via 777"] if case == "through-link" else []
    assert lines == sorted(ARRIVED + extra), found
    outside = sh(
        inst,
        "beta",
        "for f in /root/escaped /escaped /root/Incoming/escaped"
        ' "$HOME/Incoming/$1/ok/sub/escaped"; do test -e "$f" && echo "$f"; done; true',
        src,
    )
    assert outside == ""


def test_stopped_vm_with_no_autostart_and_unknown_vm_exit_255(inst: Install) -> None:
    if inst.status("alpha")["state"] != "running":
        assert inst.cmd("vmsilo", "start", "alpha").returncode == 0
    inst.cmd("vmsilo", "stop", "beta")  # DST stopped, SRC running
    p = inst.cmd("vm-copy", "--no-autostart", "alpha", "beta", "tree")
    assert p.returncode == 255
    assert b"VM beta is not running" in p.stderr and b"vm-start beta" in p.stderr
    inst.cmd("vmsilo", "stop", "alpha")  # both stopped: SRC is named first
    p = inst.cmd("vm-copy", "--no-autostart", "alpha", "beta", "tree")
    assert p.returncode == 255
    assert b"VM alpha is not running" in p.stderr and b"vm-start alpha" in p.stderr
    p = inst.cmd("vm-copy", "alpha", "nosuch", "tree")
    assert p.returncode == 255
    assert b"unknown VM: nosuch" in p.stderr and b"alpha, beta" in p.stderr
    assert inst.status("alpha")["state"] != "running"  # refused before starting anything
