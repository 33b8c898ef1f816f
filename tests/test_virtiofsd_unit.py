"""virtiofsd sidecars without a VM: flavor detection, argv, fd hand-over, early death.

Fake daemons are small scripts in a temp dir; the hand-over ones are Python programs that
check, from the inside, that the fd they were given is a listening socket.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import plan_of
from vmsilo.errors import VmsiloError
from vmsilo.host import virtiofsd
from vmsilo.host.sockets import bind_listening
from vmsilo.host.virtiofsd import VirtiofsdBinary
from vmsilo.plan.model import Plan, SharePlan, VmPlan
from vmsilo.supervisor import sidecars as sidecars_mod
from vmsilo.supervisor.sidecars import Sidecars

RUST_HELP = """virtiofsd backend
Usage: virtiofsd [OPTIONS]
      --shared-dir <SHARED_DIR>  Shared directory path
      --fd <FD>                  File descriptor for the listening socket
      --readonly                 Prevent write accesses from the guest
      --sandbox <SANDBOX>        [default: namespace]
      --translate-uid <TRANSLATE_UID>  Map guest UIDs to host UIDs
      --translate-gid <TRANSLATE_GID>  Map guest GIDs to host GIDs
"""
NO_TRANSLATE_HELP = "\n".join(line for line in RUST_HELP.splitlines() if "--translate-" not in line)
OLD_RUST_HELP = "\n".join(
    line for line in NO_TRANSLATE_HELP.splitlines() if "--readonly" not in line
)
C_HELP = """usage: /usr/lib/qemu/virtiofsd [options]
    -o source=PATH             shared directory tree
    --fd=FDNUM                 fd number of vhost-user socket
"""

SHARE_RW = SharePlan(
    "home", "/shared/work", "/home/user", False, "/run/vmsilo/work-virtiofsd-home.socket"
)
SHARE_RO = SharePlan(
    "data", "/srv/data", "/mnt/data", True, "/run/vmsilo/work-virtiofsd-data.socket"
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="vfs-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fake_help(directory: Path, name: str, help_text: str) -> Path:
    path = directory / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{help_text}\nEOF\n")
    path.chmod(0o755)
    return path


# --- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("help_text", "flavor", "readonly", "translate"),
    [
        (RUST_HELP, "rust", True, True),
        (NO_TRANSLATE_HELP, "rust", True, False),
        (OLD_RUST_HELP, "rust", False, False),
        (C_HELP, "c", False, False),
    ],
)
def test_flavor_from_fake_binaries(
    short_dir: Path, help_text: str, flavor: str, readonly: bool, translate: bool
) -> None:
    fake = fake_help(short_dir, "virtiofsd", help_text)
    assert virtiofsd.detect(str(fake)) == VirtiofsdBinary(str(fake), flavor, readonly, translate)  # type: ignore[arg-type]


def test_real_qemu_c_virtiofsd_is_recognised() -> None:
    if not os.access("/usr/lib/qemu/virtiofsd", os.X_OK):
        pytest.skip("qemu-system-common's virtiofsd not installed")
    found = virtiofsd.detect("/usr/lib/qemu/virtiofsd")
    assert (found.flavor, found.has_readonly) == ("c", False)


def test_unknown_program_is_refused(short_dir: Path) -> None:
    fake = fake_help(short_dir, "virtiofsd", "usage: something else entirely")
    with pytest.raises(VmsiloError, match="does not look like virtiofsd"):
        virtiofsd.detect(str(fake))


def test_search_order_path_then_fallbacks(short_dir: Path) -> None:
    (short_dir / "bin").mkdir()
    in_path = fake_help(short_dir / "bin", "virtiofsd", RUST_HELP)
    libexec = fake_help(short_dir, "libexec-virtiofsd", RUST_HELP)
    qemu = fake_help(short_dir, "qemu-virtiofsd", C_HELP)
    fallbacks = (str(short_dir / "missing"), str(libexec), str(qemu))
    assert virtiofsd.find_virtiofsd(str(short_dir / "bin"), fallbacks) == str(in_path)
    assert virtiofsd.find_virtiofsd(str(short_dir / "nothing"), fallbacks) == str(libexec)
    assert virtiofsd.find_virtiofsd("", fallbacks[:1] + fallbacks[2:]) == str(qemu)


def test_missing_virtiofsd_is_a_clear_error(short_dir: Path) -> None:
    with pytest.raises(VmsiloError) as e:
        virtiofsd.find_virtiofsd(str(short_dir), (str(short_dir / "nope"),))
    assert "virtiofsd not found" in e.value.message
    assert e.value.hint is not None and "apt-get install" in e.value.hint


# --- argv ---------------------------------------------------------------------------------------

RUST = VirtiofsdBinary("/usr/libexec/virtiofsd", "rust", True, True)
RUST_1_11 = VirtiofsdBinary("/usr/libexec/virtiofsd", "rust", True, False)
OLD_RUST_TRANSLATING = VirtiofsdBinary("/usr/libexec/virtiofsd", "rust", False, True)
C = VirtiofsdBinary("/usr/lib/qemu/virtiofsd", "c", False)
OWNER = (1000, 1001)


def test_rust_argv_squashes_every_guest_id_onto_the_user() -> None:
    assert virtiofsd.launch_argv(RUST, SHARE_RW, 7, OWNER) == [
        "/usr/libexec/virtiofsd",
        "--fd=7",
        "--shared-dir=/shared/work",
        "--sandbox=namespace",
        "--cache=auto",
        "--announce-submounts",
        "--log-level=info",
        "--translate-uid=squash-guest:0:1000:4294967295",
        "--translate-gid=squash-guest:0:1001:4294967295",
    ]
    assert virtiofsd.launch_argv(RUST, SHARE_RO, 7, OWNER) == [
        *virtiofsd.daemon_argv(RUST, SHARE_RO, 7, OWNER)[:9],
        "--readonly",
    ]
    assert virtiofsd.launch_argv(RUST, SHARE_RO, 7, OWNER)[2] == "--shared-dir=/srv/data"


def test_rust_without_id_translation_is_refused() -> None:
    """Guest root would be host root in the share (SPEC §11.4): no silent fallback."""
    with pytest.raises(VmsiloError, match="cannot map guest ids") as e:
        virtiofsd.launch_argv(RUST_1_11, SHARE_RW, 7, OWNER)
    assert e.value.hint is not None and "1.13" in e.value.hint


def test_c_argv_runs_as_the_user_in_a_user_namespace() -> None:
    assert virtiofsd.launch_argv(C, SHARE_RW, 9, OWNER, python="/usr/bin/python3") == [
        "/usr/bin/python3",
        "-m",
        "vmsilo.host.virtiofsd",
        "jail",
        "--as",
        "1000:1001",
        "/shared/work",
        "--",
        "/usr/lib/qemu/virtiofsd",
        "--fd=9",
        "-o",
        "source=/shared/work",
        "-o",
        "sandbox=chroot",
        "-o",
        "cache=auto",
        "-o",
        "announce_submounts",
        "-o",
        "log_level=info",
    ]


def test_c_read_only_share_is_a_read_only_view_in_the_jail() -> None:
    argv = virtiofsd.launch_argv(C, SHARE_RO, 9, OWNER, python="/usr/bin/python3")
    assert argv == [
        "/usr/bin/python3",
        "-m",
        "vmsilo.host.virtiofsd",
        "jail",
        "--as",
        "1000:1001",
        "--ro",
        "/srv/data",
        "--",
        *virtiofsd.daemon_argv(C, SHARE_RO, 9, OWNER),
    ]
    assert "ro" not in argv


def test_read_only_without_a_daemon_option_goes_through_ro_exec() -> None:
    argv = virtiofsd.launch_argv(OLD_RUST_TRANSLATING, SHARE_RO, 9, OWNER, "/usr/bin/python3")
    assert argv == [
        "/usr/bin/python3",
        "-m",
        "vmsilo.host.virtiofsd",
        "ro-exec",
        "/srv/data",
        "--",
        *virtiofsd.daemon_argv(OLD_RUST_TRANSLATING, SHARE_RO, 9, OWNER),
    ]
    assert "--readonly" not in argv and "ro" not in argv


def test_mounts_under_parses_mountinfo() -> None:
    info = (
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "30 22 8:2 / /srv/data rw - ext4 /dev/sda2 rw\n"
        "31 30 0:40 / /srv/data/sub\\040dir rw - tmpfs tmpfs rw\n"
        "32 22 0:41 / /srv/database rw - tmpfs tmpfs rw\n"
    )
    assert virtiofsd.mounts_under("/srv/data", info) == ["/srv/data", "/srv/data/sub dir"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")
def test_ro_exec_makes_the_tree_read_only_in_its_namespace_only(short_dir: Path) -> None:
    import subprocess

    (short_dir / "f").write_text("x")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmsilo.host.virtiofsd",
            "ro-exec",
            str(short_dir),
            "--",
            "/bin/sh",
            "-c",
            f"echo y > {short_dir}/f; echo y > {short_dir}/g",
        ],
        capture_output=True,
    )
    assert p.returncode != 0 and b"Read-only file system" in p.stderr
    assert (short_dir / "f").read_text() == "x" and not (short_dir / "g").exists()
    (short_dir / "g").write_text("host can still write")  # the host namespace is untouched


# --- fd hand-over and lifecycle ----------------------------------------------------------------

FAKE_DAEMON = """#!{python}
import os, socket, sys
args = sys.argv[1:]
if "--help" in args:
    print("--shared-dir --fd --readonly --translate-uid --translate-gid")
    sys.exit(0)
mode = {mode!r}
if mode == "die-early":
    print("fuse: unknown option(s): `-o bogus'", file=sys.stderr)
    sys.exit(1)
fd = int(next(a for a in args if a.startswith("--fd="))[5:])
shared = next(a for a in args if a.startswith("--shared-dir="))[13:]
sock = socket.socket(fileno=fd)
# what a real daemon relies on: an AF_UNIX stream socket that is already listening
assert sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if mode == "silent":
    conn, _ = sock.accept()
    sys.exit(0)
print("[INFO virtiofsd] Waiting for vhost-user socket connection...", file=sys.stderr, flush=True)
conn, _ = sock.accept()
conn.sendall(("served " + shared + " pid " + str(os.getpid())).encode())
conn.close()
sys.exit(3 if mode == "die-after" else 0)
"""


def fake_daemon(directory: Path, mode: str) -> tuple[VirtiofsdBinary, Path]:
    log = directory / "argv.log"
    path = directory / f"fake-{mode}"
    path.write_text(FAKE_DAEMON.format(python=sys.executable, mode=mode, log=str(log)))
    path.chmod(0o755)
    return VirtiofsdBinary(str(path), "rust", True, True), log


def share_plan(directory: Path) -> tuple[Plan, VmPlan]:
    (directory / "data").mkdir()
    (directory / "work").mkdir()
    plan = plan_of(
        f"""
user = "alice"
runtimeDir = "{directory}/run"
sharedRoot = "{directory}"
[vms.work]
hypervisor = "qemu"
[vms.work.sharedDirectories.data]
path = "{directory}/data"
mountPoint = "/mnt/data"
readOnly = true
"""
    )
    vm = plan.vms["work"]
    assert [s.tag for s in vm.shares] == ["data", "home"]
    return plan, vm


def connect(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        chunks = []
        while data := c.recv(4096):
            chunks.append(data)
    return b"".join(chunks)


def test_fd_hand_over_serve_respawn_and_stop(short_dir: Path) -> None:
    binary, log = fake_daemon(short_dir, "serve")
    plan, vm = share_plan(short_dir)

    async def scenario() -> None:
        cars = Sidecars(locate=lambda: binary)
        await cars.start(plan, vm)
        try:
            assert len(cars.procs) == 2
            for share in vm.shares:
                assert os.stat(share.socket).st_mode & 0o777 == 0o600
            data = vm.shares[0]
            first = await asyncio.to_thread(connect, data.socket)
            assert first.startswith(f"served {data.host_path} pid ".encode())
            # the daemon served one VMM and exited 0: a fresh one takes over the same socket
            daemon = cars.daemons[0]
            second = await asyncio.to_thread(connect, data.socket)
            assert second.startswith(f"served {data.host_path} pid ".encode())
            assert second != first and daemon.spawns == 2
            assert cars.failure is None
            procs = cars.procs
        finally:
            await cars.stop()
        assert all(p.returncode is not None for p in procs)
        assert not any(os.path.exists(s.socket) for s in vm.shares)

    asyncio.run(scenario())
    lines = log.read_text().splitlines()
    assert any(f"--shared-dir={short_dir}/data" in line and "--readonly" in line for line in lines)
    assert any(f"--shared-dir={short_dir}/work " in line + " " for line in lines)


def test_early_death_fails_the_start_with_the_daemons_message(short_dir: Path) -> None:
    binary, _ = fake_daemon(short_dir, "die-early")
    plan, vm = share_plan(short_dir)

    async def scenario() -> None:
        cars = Sidecars(locate=lambda: binary)
        try:
            with pytest.raises(VmsiloError) as e:
                await asyncio.wait_for(cars.start(plan, vm), timeout=20)
            msg = str(e.value)
            assert "virtiofsd for share data of VM work" in msg
            assert "exit status 1" in msg and "unknown option" in msg
        finally:
            await cars.stop()
        assert not os.path.exists(vm.shares[0].socket)

    asyncio.run(scenario())


def test_death_after_start_closes_the_socket(short_dir: Path) -> None:
    binary, _ = fake_daemon(short_dir, "die-after")
    plan, vm = share_plan(short_dir)

    told: list[str] = []

    async def scenario() -> None:
        cars = Sidecars(locate=lambda: binary, on_failure=told.append)
        await cars.start(plan, vm)
        try:
            data = vm.shares[0]
            await asyncio.to_thread(connect, data.socket)
            watcher = cars.daemons[0].watcher
            assert watcher is not None
            await asyncio.wait_for(watcher, timeout=10)
            assert cars.failure is not None and "exit status 3" in cars.failure
            assert told == [cars.failure]
            # a VMM connecting now is refused at once instead of waiting for ever
            with pytest.raises(ConnectionRefusedError):
                await asyncio.to_thread(connect, data.socket)
        finally:
            await cars.stop()

    asyncio.run(scenario())


def test_silent_daemon_does_not_block_the_start(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sidecars_mod, "ANNOUNCE_TIMEOUT", 0.3)
    binary, _ = fake_daemon(short_dir, "silent")
    plan, vm = share_plan(short_dir)

    async def scenario() -> None:
        cars = Sidecars(locate=lambda: binary)
        await cars.start(plan, vm)
        await cars.stop()

    asyncio.run(scenario())


def test_missing_share_directory(short_dir: Path) -> None:
    binary, _ = fake_daemon(short_dir, "serve")
    plan, vm = share_plan(short_dir)
    (short_dir / "data").rmdir()

    async def scenario() -> None:
        cars = Sidecars(locate=lambda: binary)
        with pytest.raises(VmsiloError, match=r"host directory .*/data does not exist"):
            await cars.start(plan, vm)
        await cars.stop()

    asyncio.run(scenario())


def test_no_shares_no_lookup() -> None:
    plan = plan_of('user = "alice"\n[vms.plain]\nsharedHome = false\n')

    def boom() -> VirtiofsdBinary:
        raise AssertionError("virtiofsd looked up for a VM without shares")

    asyncio.run(Sidecars(locate=boom).start(plan, plan.vms["plain"]))


def test_socket_path_too_long(short_dir: Path) -> None:
    with pytest.raises(VmsiloError, match="longer than 107 bytes"):
        bind_listening(str(short_dir / ("x" * 120)))
