"""Image builder + guest init, end to end under QEMU TCG (marked ``vm``).

The image is built once per session into a temporary state dir; the mmdebstrap root and the
kernel are cached in ``$VMSILO_TEST_CACHE`` (default ``/var/tmp/vmsilo-test-cache``), so only
the first run ever pays for mmdebstrap (~20 s) and the kernel download.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DESKTOP_TEST_PACKAGES, IMAGE_CACHE
from guestvm import GuestVM
from vmsilo.channel.protocol import parse_ready
from vmsilo.image.build import BuiltImage, ImageSpec, build_image
from vmsilo.image.store import list_images

pytestmark = pytest.mark.vm

SPEC = ImageSpec(name="default", suite="bookworm", packages=DESKTOP_TEST_PACKAGES)  # as the fixture


@pytest.fixture
def vmdir(tmp_path: Path) -> Iterator[Path]:
    # unix socket paths must stay short: use a short directory under /tmp
    d = Path(f"/tmp/vmt-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_layout_and_reuse(image: BuiltImage, state_dir: Path) -> None:
    assert image.path == state_dir / "images" / "default" / image.version
    # the test image's own packages (foot) bring menu entries, kept beside it (SPEC §9.3)
    assert sorted(p.name for p in image.path.iterdir()) == [
        "desktop",
        "initrd.img",
        "root.erofs",
        "vmlinuz",
    ]
    assert (image.path / "vmlinuz").read_bytes()[:4] == b"\x7fELF"  # uncompressed kernel
    assert os.readlink(state_dir / "images" / "default" / "current") == image.version
    mtime = (image.path / "root.erofs").stat().st_mtime_ns

    t = time.monotonic()
    again = build_image(SPEC, state_dir, cache_dir=IMAGE_CACHE)
    elapsed = time.monotonic() - t
    assert again.reused and again.version == image.version
    assert elapsed < 1.0, f"an up-to-date build took {elapsed:.2f} s"
    assert (image.path / "root.erofs").stat().st_mtime_ns == mtime

    infos = list_images(state_dir)
    assert [(i.name, i.version, i.is_current) for i in infos] == [("default", image.version, True)]
    assert infos[0].size > 50 * 1024 * 1024
    assert not [
        p for p in (state_dir / "images" / "default").iterdir() if p.name.startswith(".tmp")
    ]


NET_ARGS = [
    "-netdev",
    "user,id=n0,restrict=on",
    "-device",
    "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:11",
    "-netdev",
    "user,id=n1,restrict=on,net=10.9.0.0/24",
    "-device",
    "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:22",
]
NET_PARAMS = [
    "vmsilo.ifname=lan0,52:54:00:00:00:11",
    "vmsilo.ifname=wan0,52:54:00:00:00:22",
    "ip=:::::lan0:dhcp",
    "ip=10.9.0.77:::255.255.255.0::wan0:none",
    "ip=[fd00::77/64]:::::wan0:none",
    "rd.route=10.50.0.0/16:10.9.0.2:wan0",
    "rd.route=[fd01::/48]:[fd00::1]:wan0",
    "nameserver=10.9.0.3",
]


def test_boot_console_overlay_network_powerdown(image: BuiltImage, vmdir: Path) -> None:
    params = ["vmsilo.hostname=guesttest", "vmsilo.user=1234:2345", *NET_PARAMS]
    with GuestVM(image.path, vmdir, params, extra_args=NET_ARGS) as vm:
        boot_s = vm.wait_shell(timeout=120)
        print(f"boot to shell: {boot_s:.1f} s")
        assert vm.run_console("hostname").strip() == "guesttest"
        ident = vm.run_console("id")
        assert "uid=1234(user) gid=2345(user)" in ident
        assert vm.run_console("echo $HOME; pwd").split() == ["/home/user", "/home/user"]
        mounts = vm.run_console("cat /proc/mounts")
        assert re.search(r"^overlay / overlay ", mounts, re.M), mounts
        assert re.search(r"^/dev/vd\w+ /run/vmsilo/upper ext4 ", mounts, re.M), mounts
        assert re.search(r"^/dev/vda /run/vmsilo/lower erofs ro", mounts, re.M), mounts

        # network: renamed NICs, static v4/v6, routes, nameserver, DHCP from QEMU's slirp
        addrs = vm.run_console("busybox ip -o addr show")
        assert re.search(r"wan0\s+inet 10\.9\.0\.77/24", addrs), addrs
        assert re.search(r"wan0\s+inet6 fd00::77/64", addrs), addrs
        routes = vm.run_console("busybox ip route; busybox ip -6 route")
        assert "10.50.0.0/16 via 10.9.0.2 dev wan0" in routes, routes
        assert "fd01::/48 via fd00::1 dev wan0" in routes, routes
        assert vm.run_console("cat /etc/resolv.conf").strip() == "nameserver 10.9.0.3"
        vm.console.expect(r"vmsilo-dhcp: lan0: bound 10\.0\.2\.15", timeout=30)
        assert "10.0.2.15/24" in vm.run_console("busybox ip -o -4 addr show dev lan0")

        # a file written into the root lands on the overlay (fresh on every boot)
        vm.run_console("echo hello > /var/tmp/marker && sync")
        assert vm.run_console("cat /var/tmp/marker").strip() == "hello"

        t = time.monotonic()
        assert "return" in vm.qmp("system_powerdown")
        rc = vm.wait_exit(timeout=20)  # the guest powers itself off: QEMU exits
        print(f"power button to QEMU exit: {time.monotonic() - t:.1f} s")
        assert rc == 0
        vm.console.expect(r"shutting down \(power button\)", timeout=1)

    # second boot with a fresh ephemeral disk: the file is gone
    with GuestVM(image.path, vmdir, ["vmsilo.user=1234:2345"]) as vm:
        vm.wait_shell(timeout=120)
        assert (
            vm.run_console("cat /var/tmp/marker 2>&1 || echo MISSING").strip().endswith("MISSING")
        )
        assert vm.qmp("system_powerdown")
        assert vm.wait_exit(timeout=20) == 0


def test_tmpfs_overlay(image: BuiltImage, vmdir: Path) -> None:
    with GuestVM(image.path, vmdir, ["vmsilo.user=1000:1000"], overlay="tmpfs") as vm:
        vm.wait_shell(timeout=120)
        mounts = vm.run_console("cat /proc/mounts")
        assert re.search(r"^tmpfs /run/vmsilo/upper tmpfs ", mounts, re.M), mounts
        assert "uid=1000(user) gid=1000(user)" in vm.run_console("id")
        # when the console shell exits, the next line typed there starts a new one (and is
        # run by it: run_console's line is not lost)
        start = vm.console.mark()
        vm.console.send("exit\n")
        vm.console.expect(r"logout.*press Enter for a shell", timeout=30, start=start)
        assert "uid=1000(user)" in vm.run_console("id", timeout=30)
        assert vm.qmp("system_powerdown")
        assert vm.wait_exit(timeout=20) == 0


def test_ready_hello_on_a_console_device_of_its_own(image: BuiltImage, vmdir: Path) -> None:
    """Upstream crosvm makes org.vmsilo.ready a single-port virtio-console device: the guest
    sees an unnamed hvc console there, not a named port. The agent still finds it (the backed
    hvc that is not the kernel's console) and says hello on it, not on the console."""
    with GuestVM(image.path, vmdir, ["vmsilo.user=1000:1000"], ports="single") as vm:
        m = vm.ready.expect(r'\{"hello":"vmsilo-agent"[^\n]*\}', timeout=120)
        hello = parse_ready(m.group(0).encode())
        assert hello.compatible() and hello.transport == "channel"
        vm.wait_shell(timeout=60)
        assert '"hello"' not in vm.console.text()
        assert "readiness port org.vmsilo.ready is /dev/hvc1" in vm.console.text()
        assert vm.qmp("system_powerdown")
        assert vm.wait_exit(timeout=20) == 0
