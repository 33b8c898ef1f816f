"""Unit tests of small host-side pieces: escape filter, vm-run parsing, lock/state, IOMMU
groups, the ephemeral disk and the console log cap."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmsilo.cli.escapes import EscapeFilter
from vmsilo.cli.vm_run import parse_args
from vmsilo.errors import UsageError, VMAlreadyRunningError, VmsiloError
from vmsilo.host.disks import create_ephemeral_disk, parse_size
from vmsilo.host.iommu import check_iommu_groups
from vmsilo.supervisor.console import ConsoleLog
from vmsilo.supervisor.state import VmLock, VmState, is_locked, read_state, write_state


def test_escape_filter_removes_terminal_control() -> None:
    f = EscapeFilter()
    assert f(b"plain text\n\ttab\r\n") == b"plain text\n\ttab\r\n"
    assert f(b"\x1b]0;owned\x07title") == b"_]0;owned_title"
    assert f(b"\x1b[2J\x7f") == b"_[2J_"
    assert f("ünïcødé".encode()) == "ünïcødé".encode()
    # a C1 control (U+009B, CSI) split across two reads is still caught
    assert f(b"a\xc2") + f(b"\x9b2J") == b"a_2J"


def test_vm_run_options_stop_at_the_vm_name() -> None:
    a = parse_args(["-t", "--env", "A=1", "--env=B=2", "--cwd", "/tmp", "vm", "ls", "-t", "--root"])
    assert a is not None
    assert (a.vm, a.argv, a.tty, a.env, a.cwd, a.user) == (
        "vm",
        ["ls", "-t", "--root"],
        True,
        ["A=1", "B=2"],
        "/tmp",
        None,
    )
    a = parse_args(["--root", "--no-autostart", "--timeout", "2.5", "--", "vm", "cmd"])
    assert a is not None and (a.user, a.autostart, a.timeout, a.argv) == (
        "root",
        False,
        2.5,
        ["cmd"],
    )
    assert parse_args(["--help"]) is None
    for bad in (
        ["vm"],
        ["--bogus", "vm", "true"],
        ["--env", "NOEQUALS", "vm", "true"],
        ["--timeout", "soon", "vm", "true"],
        ["-t", "--detach", "vm", "true"],
        ["--user"],
    ):
        with pytest.raises(UsageError):
            parse_args(bad)


def test_vm_run_usage_errors_exit_255() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vm_run", "--bogus", "vm", "true"], capture_output=True
    )
    assert p.returncode == 255 and b"unknown option --bogus" in p.stderr


def test_lock_is_exclusive_and_visible(tmp_path: Path) -> None:
    path = tmp_path / "vm.lock"
    assert not is_locked(path)
    lock = VmLock(path)
    lock.acquire("vm")
    assert is_locked(path)
    with pytest.raises(VMAlreadyRunningError):
        VmLock(path).acquire("vm")
    # another process sees it too
    probe = (
        "from vmsilo.supervisor.state import is_locked; import sys; print(is_locked(sys.argv[1]))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)
    assert out.stdout.strip() == "True"
    lock.release()
    assert not is_locked(path)


def test_state_file_round_trip_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "vm.state.json"
    assert read_state(path) is None
    write_state(path, VmState(state="running", vmm_pid=42, last_exit={"reason": "x"}))
    st = read_state(path)
    assert st is not None and (st.state, st.vmm_pid, st.last_exit) == (
        "running",
        42,
        {"reason": "x"},
    )
    path.write_text("{not json")
    assert read_state(path) is None


def _fake_device(sysfs: Path, bdf: str, group: str, driver: str | None, cls: str) -> None:
    dev = sysfs / "bus" / "pci" / "devices" / bdf
    dev.mkdir(parents=True)
    (dev / "class").write_text(cls + "\n")
    groups = sysfs / "kernel" / "iommu_groups" / group / "devices"
    groups.mkdir(parents=True, exist_ok=True)
    (groups / bdf).symlink_to(dev)
    (dev / "iommu_group").symlink_to(sysfs / "kernel" / "iommu_groups" / group)
    if driver:
        drv = sysfs / "bus" / "pci" / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        (dev / "driver").symlink_to(drv)


def test_iommu_group_check(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    _fake_device(sysfs, "0000:01:00.0", "7", "vfio-pci", "0x030000")  # the GPU
    _fake_device(sysfs, "0000:01:00.1", "7", None, "0x040300")  # its audio, unbound
    _fake_device(sysfs, "0000:00:01.0", "7", "pcieport", "0x060400")  # a bridge
    check_iommu_groups(["0000:01:00.0"], sysfs)
    _fake_device(sysfs, "0000:01:00.2", "7", "xhci_hcd", "0x0c0330")  # a bound USB peer
    with pytest.raises(VmsiloError) as e:
        check_iommu_groups(["0000:01:00.0"], sysfs)
    assert "0000:01:00.2" in str(e.value) and "xhci_hcd" in str(e.value)
    assert "group 7" in str(e.value)
    check_iommu_groups(["0000:01:00.0", "0000:01:00.2"], sysfs)  # passing it too is fine
    with pytest.raises(VmsiloError, match="no IOMMU group"):
        check_iommu_groups(["0000:09:00.0"], sysfs)


def test_ephemeral_disk_is_fresh_and_sparse(tmp_path: Path) -> None:
    open_ = open
    disk = tmp_path / "d" / "vm-ephemeral.raw"
    create_ephemeral_disk(str(disk), "10G")
    st = disk.stat()
    assert st.st_size == 10 << 30 and st.st_blocks == 0
    assert oct(st.st_mode & 0o777) == "0o600"
    disk.write_bytes(b"old data")
    create_ephemeral_disk(str(disk), "1M")
    with open_(disk, "rb") as f:
        assert disk.stat().st_size == 1 << 20 and f.read(8) == b"\0" * 8
    assert parse_size("3T") == 3 << 40


def test_console_log_is_capped(tmp_path: Path) -> None:
    log = ConsoleLog(str(tmp_path / "c.log"), cap=1000)
    for _ in range(30):
        log.write(b"x" * 100)
    log.close()
    assert (tmp_path / "c.log").stat().st_size <= 1000
    assert (tmp_path / "c.log.1").stat().st_size <= 1000
    assert not os.path.exists(tmp_path / "c.log.2")


def test_console_log_stamps_lines_and_separates_boots(tmp_path: Path) -> None:
    """Issue 15.9: boots no longer run together, every line carries the host time."""
    path = tmp_path / "c.log"
    log = ConsoleLog(str(path))
    log.write(b"first line\r\nsecond ")
    log.write(b"half\r\n")
    log.write(b"no newline at the end")
    log.close()
    log = ConsoleLog(str(path))  # the next boot (a new supervisor)
    log.write(b"\n")
    log.close()
    lines = path.read_bytes().split(b"\n")
    stamp = rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    assert re.fullmatch(rb"-- vmsilo: boot at " + stamp + rb" \(supervisor \d+\) --", lines[0])
    assert re.fullmatch(stamp + rb" first line\r", lines[1])
    assert re.fullmatch(stamp + rb" second half\r", lines[2])
    assert re.fullmatch(stamp + rb" no newline at the end", lines[3])
    assert lines[4].startswith(b"-- vmsilo: boot at ")  # on a line of its own
    assert re.fullmatch(stamp + rb" ", lines[5]) and lines[6] == b""


def test_logs_filter_what_the_guest_printed() -> None:
    from vmsilo.cli.escapes import LogFilter

    f = LogFilter()
    # an OSC retitle, a CSI, a C1 CSI split across two reads, a lone CR hiding the stamp
    out = f(b"2026 a\x1b]0;pwned\x07b\x1b[2Jc\xc2") + f(b"\x9b31md\rforged\r\n")
    assert out == b"2026 a_]0;pwned_b_[2Jc_31mdforged\n"
