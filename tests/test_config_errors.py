"""A table of bad configs covering every rule of SPEC §2: each must exit 2 from `vmsilo check`,
name the offending path and give a hint, with no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet import run_vmsilo

U = 'user = "alice"\n'

# (id, toml, expected path, expected text in the message)
BAD: list[tuple[str, str, str, str]] = [
    ("toml-syntax", U + "[vms.a\n", "line 2, column", "fix the TOML syntax"),
    ("toml-dup-key", U + "user = 'bob'\n", "line 2", "TOML"),
    ("missing-user", "[vms.a]\n", "user:", "required key is missing"),
    ("unknown-user", 'user = "mallory"\n', "user:", "no host user named 'mallory'"),
    ("unknown-global-key", U + "stateDri = '/x'\n", "stateDri", "did you mean 'stateDir'"),
    ("unknown-vm-key", U + "[vms.a]\nmemroy = 512\n", "vms.a.memroy", "did you mean 'memory'"),
    (
        "unknown-nested-key",
        U + "[vms.a.network.interfaces.eth0]\nadresses = ['10.0.0.2/24']\n",
        "vms.a.network.interfaces.eth0.adresses",
        "did you mean 'addresses'",
    ),
    (
        "unknown-block-key",
        U + "[vms.a]\nadditionalDisks = [{ path = '/d', readonly = true }]\n",
        "vms.a.additionalDisks[0].readonly",
        "unknown key",
    ),
    ("nix-only-key", U + "[vms.a]\nguestConfig = {}\n", "vms.a.guestConfig", "unknown key"),
    ("nix-only-key-2", U + "[vms.a]\ncopyChannel = true\n", "vms.a.copyChannel", "unknown key"),
    ("memory-string", U + "[vms.a]\nmemory = '2048'\n", "vms.a.memory", "whole number"),
    (
        "memory-too-small",
        U + "[vms.a]\nmemory = 32\n",
        "vms.a.memory",
        "32 is too small: at least 64",
    ),
    ("cpus-zero", U + "[vms.a]\ncpus = 0\n", "vms.a.cpus", "0 is too small: at least 1"),
    ("cpus-too-many", U + "[vms.a]\ncpus = 257\n", "vms.a.cpus", "257 is too large: at most 256"),
    ("bool-as-string", U + "[vms.a]\nrootDiskReadonly = 'yes'\n", "rootDiskReadonly", "true"),
    ("bad-hypervisor", U + "[vms.a]\nhypervisor = 'xen'\n", "vms.a.hypervisor", "'crosvm'"),
    ("bad-scheduler", U + "schedulerIsolation = 'some'\n", "schedulerIsolation", "'full'"),
    ("vm-name-upper", U + "[vms.Banking]\n", "vms.Banking", "invalid VM name"),
    ("vm-name-space", U + '[vms."my vm"]\n', "vms.my vm", "invalid VM name"),
    ("vm-name-semicolon", U + '[vms."a;rm"]\n', "vms.a;rm", "invalid VM name"),
    ("vm-name-host", U + "[vms.host]\n", "vms.host", "reserved"),
    ("vm-name-digit", U + '[vms."1a"]\n', "vms.1a", "invalid VM name"),
    ("vm-name-too-long", U + f"[vms.{'a' * 64}]\n", "vms.aaaa", "invalid VM name"),
    (
        "ifname-too-long",
        U + "[vms.a.network.interfaces.averyveryverylongname]\n",
        "vms.a.network.interfaces",
        "invalid network interface name",
    ),
    (
        "ifname-slash",
        U + '[vms.a.network.interfaces."e/0"]\n',
        "vms.a.network.interfaces",
        "invalid network interface name",
    ),
    (
        "tap-name-too-long",
        U + "[vms.a.network.interfaces.eth0]\ntap = { name = 'averyveryverylongtap' }\n",
        "vms.a.network.interfaces.eth0.tap.name",
        "invalid network interface name",
    ),
    (
        "bad-cidr",
        U + "[vms.a.network.interfaces.eth0]\naddresses = ['10.0.0.300/24']\n",
        "vms.a.network.interfaces.eth0.addresses[0]",
        "invalid IPv4",
    ),
    (
        "cidr-without-prefix",
        U + "[vms.a.network.interfaces.eth0]\naddresses = ['10.0.0.3']\n",
        "addresses[0]",
        "no prefix length",
    ),
    (
        "bad-v6",
        U + "[vms.a.network.interfaces.eth0]\nv6Addresses = ['fd00::zz/64']\n",
        "v6Addresses[0]",
        "invalid IPv6",
    ),
    (
        "bad-route-dest",
        U + "[vms.a.network.interfaces.eth0]\nroutes = { 'default' = { via = '10.0.0.1' } }\n",
        "vms.a.network.interfaces.eth0.routes",
        "invalid IPv4 network",
    ),
    (
        "bad-route-via",
        U + "[vms.a.network.interfaces.eth0]\nroutes = { '0.0.0.0/0' = { via = 'gw' } }\n",
        "routes.0.0.0.0/0.via",
        "invalid IPv4 address",
    ),
    ("bad-nameserver", U + "[vms.a.network]\nnameservers = ['dns']\n", "nameservers[0]", "IP"),
    ("bad-mac", U + "[vms.a.network.interfaces.e]\nmacAddress = '52:00'\n", "macAddress", "MAC"),
    (
        "multicast-mac",
        U + "[vms.a.network.interfaces.e]\nmacAddress = '01:00:5e:00:00:01'\n",
        "macAddress",
        "multicast",
    ),
    ("bad-bdf", U + "isolatedPciDevices = ['1:2:3']\n", "isolatedPciDevices[0]", "PCI address"),
    (
        "bad-pci-path",
        U + "[vms.a]\npciDevices = [{ path = 'gpu0' }]\n",
        "vms.a.pciDevices[0].path",
        "neither a PCI address",
    ),
    (
        "bad-pci-extra-key",
        U + "[vms.a]\npciDevices = [{ path = '01:00.0', romfile = '/x' }]\n",
        "vms.a.pciDevices[0].romfile",
        "unknown key",
    ),
    ("bad-colour", U + "[vms.a]\ncolor = 'reddish'\n", "vms.a.color", "unknown colour"),
    ("bad-hex-colour", U + "[vms.a]\ncolor = '#12345'\n", "vms.a.color", "unknown colour"),
    (
        "dhcp-and-static",
        U + "[vms.a.network.interfaces.e]\ndhcp = true\naddresses = ['10.0.0.2/24']\n",
        "vms.a.network.interfaces.e.dhcp",
        "dhcp together with static",
    ),
    (
        "dhcp-and-route",
        U + "[vms.a.network.interfaces.e]\ndhcp = true\nroutes = {'0.0.0.0/0'={via='10.0.0.1'}}\n",
        "vms.a.network.interfaces.e.dhcp",
        "dhcp together with static",
    ),
    (
        "hostaddress-and-bridge",
        U + "[vms.a.network.interfaces.e]\ntap = { hostAddress = '10.1.0.1/24', bridge = 'br0' }\n",
        "vms.a.network.interfaces.e.tap",
        "hostAddress together with bridge",
    ),
    ("gpu-empty-table", U + "[vms.a]\ngpu = {}\n", "vms.a.gpu", "no feature"),
    ("gpu-bad-type", U + "[vms.a]\ngpu = 'yes'\n", "vms.a.gpu", "expected true, false"),
    (
        "netvmsubnet-without-netvm",
        U + "[vms.a.network]\nnetvmSubnet = '10.200.0.0/31'\n",
        "vms.a.network.netvmSubnet",
        "without netvm",
    ),
    (
        "share-without-mountpoint",
        U + "[vms.a.sharedDirectories.docs]\npath = '/srv/docs'\n",
        "vms.a.sharedDirectories.docs.mountPoint",
        "missing",
    ),
    (
        "share-home-with-sharedhome",
        U + "[vms.a.sharedDirectories.home]\npath = '/h'\nmountPoint = '/home/user'\n",
        "vms.a.sharedDirectories.home",
        "taken by sharedHome",
    ),
    (
        "share-bad-tag",
        U + '[vms.a.sharedDirectories."-x"]\npath = "/h"\nmountPoint = "/m"\n',
        "vms.a.sharedDirectories",
        "invalid share tag",
    ),
    (
        "share-tag-too-long",
        U + f'[vms.a.sharedDirectories."{"t" * 37}"]\npath = "/h"\nmountPoint = "/m"\n',
        "vms.a.sharedDirectories",
        "invalid share tag",
    ),
    ("netvm-missing", U + "[vms.a.network]\nnetvm = 'gw'\n", "vms.a.network.netvm", "no VM named"),
    (
        "netvm-not-netvm",
        U + "[vms.gw]\n[vms.a.network]\nnetvm = 'gw'\n",
        "vms.a.network.netvm",
        "is not a netvm",
    ),
    (
        "netvm-cycle",
        U
        + "[vms.x.network]\nisNetvm = true\nnetvm = 'y'\n"
        + "[vms.y.network]\nisNetvm = true\nnetvm = 'x'\n",
        "network.netvm",
        "netvm cycle",
    ),
    (
        "netvm-self",
        U + "[vms.x.network]\nisNetvm = true\nnetvm = 'x'\n",
        "vms.x.network.netvm",
        "netvm cycle: x -> x",
    ),
    (
        "pinned-not-31",
        U + "[vms.a.network]\nnetvm = 'host'\nnetvmSubnet = '10.200.0.0/30'\n",
        "vms.a.network.netvmSubnet",
        "not a /31",
    ),
    (
        "pinned-outside-range",
        U + "[vms.a.network]\nnetvm = 'host'\nnetvmSubnet = '10.9.0.0/31'\n",
        "vms.a.network.netvmSubnet",
        "outside netvmRange",
    ),
    (
        "pinned-collision",
        U
        + "[vms.a.network]\nnetvm = 'host'\nnetvmSubnet = '10.200.0.0/31'\n"
        + "[vms.b.network]\nnetvm = 'host'\nnetvmSubnet = '10.200.0.0/31'\n",
        "vms.b.network.netvmSubnet",
        "also pinned by VM 'a'",
    ),
    (
        "range-exhausted",
        U
        + "netvmRange = '10.1.0.0/31'\n"
        + "[vms.a.network]\nnetvm = 'host'\n[vms.b.network]\nnetvm = 'host'\n",
        "vms.b.network.netvm",
        "no free /31",
    ),
    (
        "too-many-interfaces",
        U + "".join(f"[vms.a.network.interfaces.e{i}]\n" for i in range(11)),
        "vms.a.network.interfaces",
        "11 effective interfaces",
    ),
    (
        "netvm-too-many-clients",
        U
        + "[vms.gw.network]\nisNetvm = true\n"
        + "".join(f"[vms.c{i}.network]\nnetvm = 'gw'\n" for i in range(11)),
        "vms.gw.network.interfaces",
        "has a link for each client: c0, c1",
    ),
    (
        "interface-name-clash-with-injected",
        U + "[vms.a.network]\nnetvm = 'host'\n[vms.a.network.interfaces.upstream]\n",
        "vms.a.network.interfaces.upstream",
        "used twice",
    ),
    (
        "duplicate-mac",
        U
        + "[vms.a.network.interfaces.e]\nmacAddress = '02:00:00:00:00:01'\n"
        + "[vms.b.network.interfaces.e]\nmacAddress = '02:00:00:00:00:01'\n",
        "vms.b.network.interfaces.e.macAddress",
        "also used by",
    ),
    (
        "duplicate-tap",
        U
        + "[vms.a.network.interfaces.e]\ntap = { name = 'tap0' }\n"
        + "[vms.b.network.interfaces.e]\ntap = { name = 'tap0' }\n",
        "vms.b.network.interfaces.e.tap.name",
        "also used by",
    ),
    (
        "tap-named-like-bridge",
        U
        + "[vms.gw.network]\nisNetvm = true\n[vms.c.network]\nnetvm = 'gw'\n"
        + "[vms.b.network.interfaces.e]\ntap = { name = 'vmsilo-br4' }\n",
        "vms.b.network.interfaces.e.tap.name",
        "'vmsilo-br4' is the netvm link bridge",
    ),
    (
        "bridge-named-like-tap",
        U
        + "[vms.a.network.interfaces.e]\n"
        + "[vms.b.network.interfaces.e]\ntap = { bridge = 'a-22' }\n",
        "vms.b.network.interfaces.e.tap.bridge",
        "also a host interface",
    ),
    (
        "runtime-path-collision",
        U
        + "[vms.a.sharedDirectories.sound]\npath = '/s'\nmountPoint = '/m'\n"
        + "[vms.a-virtiofsd]\n",
        "vms.a-virtiofsd",
        "runtime path",
    ),
    (
        "kernel-param-empty",
        U + "[vms.a]\nkernelParams = ['']\n",
        "vms.a.kernelParams[0]",
        "empty kernel parameter",
    ),
    (
        "kernel-param-space",
        U + "[vms.a]\nkernelParams = ['a b']\n",
        "vms.a.kernelParams[0]",
        "whitespace",
    ),
    (
        "kernel-param-newline",
        U + '[vms.a]\nkernelParams = ["a\\nb"]\n',
        "vms.a.kernelParams[0]",
        "whitespace",
    ),
    (
        "kernel-param-leading-dash",
        U + "[vms.a]\nkernelParams = ['--init=/bin/sh']\n",
        "vms.a.kernelParams[0]",
        "starts with '-'",
    ),
    (
        "kernel-param-quote",
        U + "[vms.a]\nkernelParams = ['a=\"b\"']\n",
        "vms.a.kernelParams[0]",
        "quote",
    ),
    (
        "kernel-param-non-ascii",
        U + "[vms.a]\nkernelParams = ['a=é']\n",
        "vms.a.kernelParams[0]",
        "non-ASCII",
    ),
    (
        "kernel-param-control",
        U + '[vms.a]\nkernelParams = ["a=\\u0007"]\n',
        "vms.a.kernelParams[0]",
        "control",
    ),
    (
        "kernel-cmdline-too-long",
        U
        + "[vms.a]\nkernelParams = ["
        + ", ".join(f"'p{i}={'x' * 60}'" for i in range(40))
        + "]\n",
        "vms.a.kernelParams",
        "at most 2048",
    ),
    (
        "path-with-comma",
        U + "[vms.a]\nkernel = '/boot/vmlinuz,ro=true'\n",
        "vms.a.kernel",
        "would need quoting",
    ),
    (
        "path-with-quote",
        U + '[vms.a]\nadditionalDisks = [{ path = "/d/it\'s.img" }]\n',
        "vms.a.additionalDisks[0].path",
        "would need quoting",
    ),
    (
        "path-with-bracket",
        U + "[vms.a]\nsharedHome = '/srv/[home]'\n",
        "vms.a.sharedHome",
        "would need quoting",
    ),
    (
        "path-with-equals",
        U + "stateDir = '/var/lib/a=b'\n",
        "stateDir",
        "would need quoting",
    ),
    ("path-relative", U + "runtimeDir = 'run/vmsilo'\n", "runtimeDir", "not absolute"),
    (
        "wayland-socket-comma",
        U + "[vms.a]\ngpu = { wayland = true, waylandSocket = '/run/w,0' }\n",
        "vms.a.gpu.waylandSocket",
        "would need quoting",
    ),
    (
        "mountpoint-with-space",
        U + "[vms.a.sharedDirectories.d]\npath = '/d'\nmountPoint = '/mnt/my docs'\n",
        "vms.a.sharedDirectories.d.mountPoint",
        "printable ASCII",
    ),
    (
        "qemu-gpu-vulkan",
        U + "[vms.a]\nhypervisor = 'qemu'\ngpu = { vulkan = true }\n",
        "vms.a.gpu",
        "QEMU cannot provide",
    ),
    (
        "qemu-sound-not-bool",
        U + "[vms.a]\nhypervisor = 'qemu'\nsound = { playback = 'yes' }\n",
        "vms.a.sound.playback",
        "expected true or false",
    ),
    (
        "sound-unknown-key",
        U + "[vms.a]\nhypervisor = 'qemu'\nsound = { captures = true }\n",
        "vms.a.sound.captures",
        "capture",
    ),
    (
        "qemu-vhost-user-fs",
        U + "[vms.a]\nhypervisor = 'qemu'\nvhostUser = [{ type = 'fs', socket = '/s' }]\n",
        "vms.a.vhostUser[0].type",
        "QEMU cannot front",
    ),
    ("bad-overlay-size", U + "[vms.a]\nrootOverlay = { size = '10GB' }\n", "size", "invalid size"),
    ("bad-overlay-type", U + "[vms.a]\nrootOverlay = { type = 'qcow2' }\n", "type", "'raw'"),
    ("unknown-image", U + "[vms.a]\nimage = 'desktp'\n", "vms.a.image", "no image named"),
    (
        "vhost-user-missing-socket",
        U + "[vms.a]\nvhostUser = [{ type = 'net' }]\n",
        "vms.a.vhostUser[0].socket",
        "missing",
    ),
    (
        "vhost-user-queue-not-pow2",
        U + "[vms.a]\nvhostUser = [{ type = 'net', socket = '/s', max-queue-size = 100 }]\n",
        "vms.a.vhostUser[0].max-queue-size",
        "power of two",
    ),
    (
        "block-id-too-long",
        U + "[vms.a]\nadditionalDisks = [{ path = '/d', id = 'a-very-long-block-identifier' }]\n",
        "vms.a.additionalDisks[0].id",
        "20 ASCII bytes",
    ),
    (
        "autoshutdown-zero",
        U + "[vms.a]\nautoShutdown = { enable = true, after = 0 }\n",
        "vms.a.autoShutdown.after",
        "0 is too small: at least 1",
    ),
    (
        "autoshutdown-not-a-table",
        U + "[vms.a]\nautoShutdown = 'soon'\n",
        "vms.a.autoShutdown",
        "expected a table, got a string",
    ),
    (
        "memory-a-string",
        U + "[vms.a]\nmemory = '4G'\n",
        "vms.a.memory",
        "expected a whole number, got a string",
    ),
    (
        "extra-arg-nul",
        U + '[crosvm]\nextraArgs = ["a\\u0000b"]\n',
        "crosvm.extraArgs[0]",
        "NUL",
    ),
    ("bad-flavor", U + "[crosvm]\nflavor = 'fork'\n", "crosvm.flavor", "'upstream'"),
    ("bad-accel", U + "[qemu]\naccel = 'hvf'\n", "qemu.accel", "'auto'"),
    ("bad-package", U + "[images.x]\npackages = ['Foo Bar']\n", "images.x.packages[0]", "Debian"),
    ("netvm-range-bad", U + "netvmRange = '10.0.0.1/16'\n", "netvmRange", "invalid IPv4 network"),
    ("timeout-negative", U + "startTimeout = -1\n", "startTimeout", "-1 is too small: at least 1"),
    (
        "share-same-mountpoint",
        U + "[vms.a.sharedDirectories]\n"
        "docs = { path = '/d', mountPoint = '/mnt/docs', readOnly = true }\n"
        "more = { path = '/m', mountPoint = '/mnt/docs/' }\n",
        "vms.a.sharedDirectories.more.mountPoint",
        "also the mount point of vms.a.sharedDirectories.docs.mountPoint",
    ),
    (
        "share-nested-mountpoint",
        U + "[vms.a.sharedDirectories]\n"
        "docs = { path = '/d', mountPoint = '/mnt/docs/inner' }\n"
        "more = { path = '/m', mountPoint = '/mnt/docs' }\n",
        "vms.a.sharedDirectories.more.mountPoint",
        "/mnt/docs/inner lies inside /mnt/docs",
    ),
    (
        "share-inside-shared-home",
        U + "[vms.a.sharedDirectories]\nsrc = { path = '/s', mountPoint = '/home/user/src' }\n",
        "vms.a.sharedDirectories.src.mountPoint",
        "vms.a.sharedHome (/home/user) nest",
    ),
    (
        "share-over-home-when-not-shared",
        U + "[vms.a]\nsharedHome = false\n[vms.a.sharedDirectories]\n"
        "h = { path = '/h', mountPoint = '/home/user' }\n"
        "x = { path = '/x', mountPoint = '/home/user' }\n",
        "vms.a.sharedDirectories.x.mountPoint",
        "also the mount point of vms.a.sharedDirectories.h.mountPoint",
    ),
    (
        "share-over-etc",
        U + "[vms.a.sharedDirectories.e]\npath = '/e'\nmountPoint = '/etc'\n",
        "vms.a.sharedDirectories.e.mountPoint",
        "system directory /etc",
    ),
    (
        "share-over-root",
        U + "[vms.a.sharedDirectories.r]\npath = '/r'\nmountPoint = '/'\n",
        "vms.a.sharedDirectories.r.mountPoint",
        "system directory /",
    ),
    (
        "share-in-proc",
        U + "[vms.a.sharedDirectories.p]\npath = '/p'\nmountPoint = '/proc/x'\n",
        "vms.a.sharedDirectories.p.mountPoint",
        "system directory /proc",
    ),
    (
        "share-over-usr",
        U + "[vms.a.sharedDirectories.usr]\npath = '/u'\nmountPoint = '/usr'\n",
        "vms.a.sharedDirectories.usr.mountPoint",
        "system directory /usr",
    ),
]


def test_table_is_big_enough() -> None:
    assert len(BAD) >= 50
    assert len({b[0] for b in BAD}) == len(BAD)


@pytest.mark.parametrize(("toml", "path", "text"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_exits_2_naming_the_path(
    tmp_path: Path, toml: str, path: str, text: str
) -> None:
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text(toml)
    status, out, err = run_vmsilo(["-c", str(cfg), "check"])
    assert status == 2, (out, err)
    assert out == ""
    assert "Traceback" not in err
    matching = [line for line in err.splitlines() if path in line]
    assert matching, f"no line names {path!r}:\n{err}"
    assert any(text in line for line in matching), f"{text!r} not in:\n{err}"
    assert all("hint: " in line for line in err.splitlines()), err


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text(
        U
        + "[vms.a]\nmemory = 'x'\ncolour = 'red'\n"
        + "[vms.b]\ncpus = 0\n"
        + "[vms.c.network]\nnetvm = 'nope'\n"
    )
    status, _, err = run_vmsilo(["-c", str(cfg), "check"])
    assert status == 2
    lines = err.splitlines()
    assert any(line.startswith("vms.a.memory:") for line in lines)
    assert any(line.startswith("vms.a.colour:") and "'color'" in line for line in lines)
    assert any(line.startswith("vms.b.cpus:") for line in lines)
    assert any(line.startswith("vms.c.network.netvm:") for line in lines)


def test_real_entry_point_prints_no_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text("user = 'root'\n[vms.a]\nkernelParams = ['-x']\nmemroy = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vmsilo", "-c", str(cfg), "check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "vms.a.kernelParams[0]: kernel parameter '-x' starts with '-'" in proc.stderr
    assert "vms.a.memroy: unknown key 'memroy' (hint: did you mean 'memory'?)" in proc.stderr


def test_missing_file_and_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status, _, err = run_vmsilo(["-c", str(tmp_path / "nope.toml"), "check"])
    assert status == 2 and "no such file" in err
    cfg = tmp_path / "env.toml"
    cfg.write_text(U + "[vms.a]\n[vms.b]\n")
    monkeypatch.setenv("VMSILO_CONFIG", str(cfg))
    status, out, _ = run_vmsilo(["check"])
    assert (status, out) == (0, "ok: 2 VMs\n")


def test_unknown_vm_lists_available(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(U + "[vms.a]\n[vms.b]\n")
    status, _, err = run_vmsilo(["-c", str(cfg), "argv", "zz"])
    assert status == 2
    assert "unknown VM: zz" in err and "Available VMs: a, b" in err


def test_sound_is_accepted_on_both_vmms(tmp_path: Path) -> None:
    """SPEC §9.2 (v3): playback and capture work on QEMU too (HDA), so ``check`` refuses
    neither on either VMM."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        U + "[vms.a]\nhypervisor = 'qemu'\nsound = { playback = true }\n"
        "[vms.b]\nhypervisor = 'qemu'\nsound = { capture = true }\n"
        "[vms.c]\nsound = { capture = true }\n"
    )
    assert run_vmsilo(["-c", str(cfg), "check"])[:2] == (0, "ok: 3 VMs\n")


def test_mount_point_clash_names_both_paths_and_side_by_side_is_fine(tmp_path: Path) -> None:
    """Issue 15.1: two shares on /mnt/docs — check used to say ok and the guest mounted one."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        U + "[vms.a.sharedDirectories]\n"
        "docs = { path = '/d', mountPoint = '/mnt/docs', readOnly = true }\n"
        "more = { path = '/m', mountPoint = '/mnt/docs' }\n"
    )
    status, out, err = run_vmsilo(["-c", str(cfg), "check"])
    assert status == 2 and out == ""
    [line] = err.splitlines()
    assert line.startswith("vms.a.sharedDirectories.more.mountPoint: ")
    assert "vms.a.sharedDirectories.docs.mountPoint" in line and "/mnt/docs" in line
    cfg.write_text(
        U + "[vms.a.sharedDirectories]\n"
        "docs = { path = '/d', mountPoint = '/mnt/docs', readOnly = true }\n"
        "more = { path = '/m', mountPoint = '/mnt/docs2' }\n"
        "opt = { path = '/o', mountPoint = '/opt/tools' }\n"
    )
    assert run_vmsilo(["-c", str(cfg), "check"])[:2] == (0, "ok: 1 VM\n")


def test_no_pydantic_wording_leaks(tmp_path: Path) -> None:
    """Messages speak TOML (tables, whole numbers), not Python classes (issue 15.10)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        U + "[vms.a]\nautoShutdown = 'soon'\nmemory = 1.5\ncpus = true\n"
        "sharedHome = 3\nrootOverlay = { type = 'zfs' }\n"
    )
    status, _, err = run_vmsilo(["-c", str(cfg), "check"])
    assert status == 2
    for word in ("Input should", "instance of", "dictionary", "AutoShutdown", "valid integer"):
        assert word not in err, err
    assert len(err.splitlines()) >= 5


def test_an_invalid_vm_name_does_not_hide_its_other_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(U + "[vms.Bad_Name]\nmemroy = 512\ncpus = 0\n")
    status, _, err = run_vmsilo(["-c", str(cfg), "check"])
    assert status == 2
    lines = err.splitlines()
    assert any(ln.startswith("vms.Bad_Name: invalid VM name") for ln in lines), err
    assert any(ln.startswith("vms.Bad_Name.memroy: unknown key") for ln in lines), err
    assert any(ln.startswith("vms.Bad_Name.cpus: 0 is too small") for ln in lines), err
