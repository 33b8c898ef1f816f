"""fastStart's pure parts (SPEC §10): the host's restore line, QEMU's argv, the state's key,
the sparse disk copy. The real saves and restores are in tests/test_fast_start.py."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from fleet import plan_of
from vmsilo.backends.base import HostFacts
from vmsilo.backends.qemu import qemu_argv
from vmsilo.backends.registry import get
from vmsilo.channel.protocol import encode_restored, parse_ready, parse_restored
from vmsilo.host.disks import sparse_copy
from vmsilo.supervisor.saved import state_key

CONFIG = """
user = "alice"
[qemu]
accel = "tcg"
[vms.fast]
hypervisor = "qemu"
sharedHome = false
memory = {memory}
fastStart = {fast}
"""


def test_restore_line_round_trip_and_junk() -> None:
    line = encode_restored(1_800_000_000_123_456_789, b"\x01" * 32)
    notice = parse_restored(line)
    assert notice.time_ns == 1_800_000_000_123_456_789 and notice.entropy == b"\x01" * 32
    with pytest.raises(ValueError):  # the guest's hello is not a restore line, and back
        parse_ready(line)
    for junk in (
        b"",
        b"{}",
        b'{"restored":"vmsilo-agent","time_ns":-1,"entropy":""}',
        b'{"restored":"vmsilo-agent","time_ns":true,"entropy":""}',
        b'{"restored":"vmsilo-agent","time_ns":5,"entropy":"xyz"}',
        b'{"restored":"other","time_ns":5,"entropy":"00"}',
        b"\xff\xfe",
    ):
        with pytest.raises(ValueError):
            parse_restored(junk)


def test_qemu_argv_gets_vmgenid_and_incoming_only_when_asked() -> None:
    plan = plan_of(CONFIG.format(memory=512, fast="true"))
    vm = plan.vms["fast"]
    plain = qemu_argv(plan, vm)
    assert "vmgenid" not in " ".join(plain) and "-incoming" not in plain
    argv = qemu_argv(plan, vm, generation_id="1-2-3", incoming=True)
    assert argv[: len(plain)] == plain
    assert argv[len(plain) :] == ["-device", "vmgenid,guid=1-2-3", "-incoming", "defer"]
    # the backend gives every start of a fastStart VM a new generation id, others none
    qemu = get("qemu")
    a, b = (qemu.host_facts(plan, vm, probe=False) for _ in range(2))
    assert a.generation_id and b.generation_id and a.generation_id != b.generation_id
    other = plan_of(CONFIG.format(memory=512, fast="false"))
    assert qemu.host_facts(other, other.vms["fast"], probe=False).generation_id is None


def test_state_key_follows_the_plan_not_the_generation_id() -> None:
    qemu = get("qemu")
    plan = plan_of(CONFIG.format(memory=512, fast="true"))
    vm = plan.vms["fast"]
    facts = HostFacts(generation_id="a")
    key = state_key(plan, vm, qemu, facts)
    assert (
        state_key(plan, vm, qemu, replace(facts, generation_id="b", restore_from="/x/state")) == key
    )
    assert state_key(plan, vm, qemu, replace(facts, accel="kvm")) != key
    bigger = plan_of(CONFIG.format(memory=1024, fast="true"))
    assert state_key(bigger, bigger.vms["fast"], qemu, facts) != key


def test_sparse_copy_keeps_holes_and_can_drop_zeros(tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    with src.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(8 << 20)
        f.write(b"data" * 1024)
        f.seek(32 << 20)
        f.write(bytes(4 << 20))  # written zeros
    copy = tmp_path / "copy.raw"
    sparse_copy(str(src), str(copy))
    assert copy.read_bytes() == src.read_bytes()
    assert oct(copy.stat().st_mode & 0o777) == "0o600"
    assert copy.stat().st_blocks * 512 <= src.stat().st_blocks * 512
    lean = tmp_path / "lean.raw"
    written = sparse_copy(str(src), str(lean), skip_zeros=True)
    assert lean.read_bytes() == src.read_bytes()
    assert written < 2 << 20 and lean.stat().st_blocks * 512 < 2 << 20
    assert not os.path.exists(str(lean) + ".new")


SHARED = """
user = "alice"
[qemu]
accel = "tcg"
[vms.fast]
hypervisor = "qemu"
fastStart = {fast}
sharedDirectories.docs = {{ path = "/srv/docs", mountPoint = "/mnt/docs" }}
"""


def test_shares_of_a_fast_start_vm_wait_for_hot_plug() -> None:
    """The saved machine has a root port per share and no virtiofs device; the guest is told
    to leave the shares to the agent (``vmsilo.sharesLater=1``). Without fastStart nothing
    changes."""
    plan = plan_of(SHARED.format(fast="true"))
    argv = qemu_argv(plan, plan.vms["fast"])
    text = " ".join(argv)
    assert "vhost-user-fs-pci" not in text and "id=fs-" not in text
    assert "pcie-root-port,id=fsport0,chassis=1" in argv
    assert "pcie-root-port,id=fsport1,chassis=2" in argv
    assert argv[argv.index("-append") + 1].endswith(" vmsilo.sharesLater=1")
    assert "memory-backend-memfd,id=mem,size=2048M,share=on" in argv  # vhost-user needs it
    plain = plan_of(SHARED.format(fast="false"))
    argv = qemu_argv(plain, plain.vms["fast"])
    assert "pcie-root-port" not in " ".join(argv) and "vmsilo.sharesLater" not in " ".join(argv)
    assert "vhost-user-fs-pci,chardev=fs-docs,tag=docs" in argv


def test_guest_leaves_shares_to_the_agent_when_told() -> None:
    from vmsilo.contracts.cmdline import parse_cmdline

    later = parse_cmdline("vmsilo.share=docs,/mnt/docs vmsilo.sharesLater=1")
    assert later.shares_later and [s.tag for s in later.shares] == ["docs"]
    assert not parse_cmdline("vmsilo.share=docs,/mnt/docs").shares_later


def test_mount_lines() -> None:
    from vmsilo.channel.protocol import (
        encode_mount,
        encode_mounted,
        is_mount_request,
        parse_mounted,
    )

    assert is_mount_request(encode_mount()) and not is_mount_request(b'{"mount":"x"}')
    assert parse_mounted(encode_mounted([])) == []
    [error] = parse_mounted(encode_mounted(["share home: \x1b[2Jbad"]))
    assert error.startswith("share home: ") and "\x1b" not in error  # guest text, filtered
    with pytest.raises(ValueError):
        parse_mounted(b'{"mounted":"vmsilo-agent"}')


def test_disposable_disk_as_a_descriptor_set() -> None:
    plan = plan_of(CONFIG.format(memory=512, fast="true"))
    vm = plan.vms["fast"]
    argv = qemu_argv(plan, vm, ephemeral_fds=(7, 8))
    assert argv[argv.index("-add-fd") : argv.index("-add-fd") + 4] == [
        "-add-fd",
        "fd=7,set=1",
        "-add-fd",
        "fd=8,set=1",
    ]
    [drive] = [a for a in argv if "serial=" not in a and a.startswith("file=/dev/fdset/1")]
    assert "file.locking=off" in drive and "readonly=off" in drive
    assert not any(a.startswith("file=/dev/fdset") for a in qemu_argv(plan, vm))
