"""The crosvm argv validator rejects what upstream crosvm rejects and accepts what it accepts.

``crosvm_grammar`` is what the rest of the suite relies on to prove vmsilo's crosvm
command lines are right, so it is tested here on its own: against known-bad argv (each
rejection must name the offending option or key, so a test cannot pass for the wrong
reason), against known-good argv, and against the vendored grammar data itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from crosvm_grammar import (
    BUILDS,
    GRAMMAR_PATH,
    KeyValueError,
    assert_valid,
    cfg_available,
    grammar,
    parse_enum_variant,
    parse_keyvalue,
    preprocess_argv,
    validate_argv,
)

KERNEL = "/var/lib/vmsilo/images/default/current/vmlinuz"
NET = "tap-name=banking-22,mac=52:be:64:bf:cc:65,pci-address=00:16.0"

# A realistic upstream-flavour command line, as vmsilo generates it for a VM "banking".
REALISTIC = [
    "crosvm",
    "--log-level=info",
    "--no-syslog",
    "run",
    "--name",
    "banking",
    "-m",
    "2048",
    "--hugepages",
    "--balloon-page-reporting",
    "--boost-uclamp",
    "--disable-virtio-intx",
    "--no-i8042",
    "--no-rtc",
    "--s2idle",
    "--per-vm-core-scheduling",
    "--initrd=/var/lib/vmsilo/images/default/current/initrd.img",
    "--serial=hardware=virtio-console,type=unix-stream,"
    "path=/run/vmsilo/banking-console-backend.socket,console,input-unix-stream",
    "--serial=hardware=virtio-console,num=2,type=unix-stream,"
    "path=/run/vmsilo/banking-ready.socket,name=org.vmsilo.ready",
    "--block",
    "/var/lib/vmsilo/images/default/current/root.erofs,direct=true,packed-queue=true,ro=true",
    "--block",
    "/var/lib/vmsilo/banking-ephemeral.raw,direct=true,id=ephemeral,packed-queue=true,ro=false",
    "-p",
    "vmsilo.hostname=banking",
    "-p",
    "vmsilo.user=1000:1000",
    "--vhost-user",
    "type=fs,socket=/run/vmsilo/banking-virtiofsd-home.socket",
    "--vsock",
    "cid=3",
    "--cpus",
    "2",
    "--gpu=context-types=cross-domain:virgl2",
    "--wayland-sock",
    "/run/user/1000/wayland-0",
    "--vhost-user",
    "type=sound,socket=/run/vmsilo/banking-sound.socket",
    "-s",
    "/run/vmsilo/banking-crosvm-control.socket",
    "--vfio",
    "/sys/bus/pci/devices/0000:01:00.0,iommu=viommu",
    "--net",
    NET,
    KERNEL,
]


def run_with(*extra: str) -> list[str]:
    """REALISTIC with ``extra`` run arguments added just before KERNEL."""
    return [*REALISTIC[:-1], *extra, KERNEL]


def replaced(old: str, *new: str) -> list[str]:
    """REALISTIC with the element ``old`` replaced by ``new`` (zero or more elements)."""
    index = REALISTIC.index(old)
    return [*REALISTIC[:index], *new, *REALISTIC[index + 1 :]]


def without(*elements: str) -> list[str]:
    return [arg for arg in REALISTIC if arg not in elements]


# ---------------------------------------------------------------------------------------
# Accepted command lines
# ---------------------------------------------------------------------------------------


def test_realistic_upstream_argv_is_accepted() -> None:
    assert validate_argv(REALISTIC) == []
    assert_valid(REALISTIC)


ACCEPTED = [
    pytest.param(run_with("--core-scheduling=false"), id="core-scheduling bool word"),
    pytest.param(run_with("--core-scheduling", "true"), id="core-scheduling separate value"),
    pytest.param(replaced("2048", "size=2048"), id="-m with key"),
    pytest.param(replaced("2048", "0x800"), id="-m hex inside key=value"),
    pytest.param(replaced("-m", "--mem"), id="--mem long form"),
    pytest.param(replaced("--cpus", "-c"), id="-c short form"),
    pytest.param(replaced("cid=3", "3"), id="--vsock positional cid"),
    pytest.param([*without("--vsock", "cid=3"), "--cid", "3"], id="deprecated --cid alone"),
    pytest.param(run_with("-b", "path=/d.img,ro"), id="-b short form, bare bool key"),
    pytest.param(run_with("--block", '"/a,b.img",ro=true'), id="double-quoted path with comma"),
    pytest.param(run_with("--block", "'/it\"s.img',o_direct=true"), id="single quotes, alias"),
    pytest.param(run_with("--block", "/d.img,id=abcdefghijklmnopqrst"), id="id of 20 bytes"),
    pytest.param(
        run_with("--serial", "type=stdout,hardware=legacy-virtio-console,num=3"),
        id="serial value alias",
    ),
    pytest.param(run_with("--serial", "stdout,earlycon,stdin"), id="serial positional type"),
    pytest.param(replaced(NET, 'tap-name="123"'), id="quoted numeric tap-name"),
    pytest.param(replaced(NET, "tap-fd=3,mac=52:54:00:12:34:56"), id="net tap-fd mode"),
    pytest.param(
        replaced(NET, "host-ip=10.0.0.1,netmask=255.255.255.0,mac=52:54:00:12:34:56"),
        id="net raw mode",
    ),
    pytest.param(replaced(NET, "tap-name=t0,vq-pairs=2,packed-queue"), id="net typed fields"),
    pytest.param(
        replaced(
            "--gpu=context-types=cross-domain:virgl2",
            "--gpu=backend=2D,context-types=cross-domain:unknown-name,"
            "displays=[[mode=windowed[1920,1080],dpi=[96,96]],[windowed[800,600],hidden]]",
        ),
        id="gpu display list, enum alias, unknown context type ignored",
    ),
    pytest.param(replaced("2", "num-cores=4,clusters=[[0,1],[2-3]]"), id="cpus clusters"),
    pytest.param(
        run_with("--hypervisor", "kvm[device=/dev/kvm]", "--irqchip", "split"),
        id="enum variants with and without fields",
    ),
    pytest.param(
        run_with("--input", "multi-touch[path=/dev/input/event3,width=800,height=600]"),
        id="input struct variant",
    ),
    pytest.param(
        run_with("--shared-dir", "/home:home:type=fs:cache=always:writeback=true:uid=1000"),
        id="shared-dir fs options",
    ),
    pytest.param(
        run_with("--wayland-sock", "/run/x-wayland,name=other"), id="named wayland socket"
    ),
    pytest.param(
        run_with("--wayland-sock=/run/y-wayland,name=third", "--shared-dir=/h:h:type=fs"),
        id="custom-parsed values written with '='",
    ),
    pytest.param(
        run_with("--cpu-affinity", "0=0-1:1=2", "--cpu-capacity", "0=1024,1=512"),
        id="cpu affinity and capacity",
    ),
    pytest.param([*REALISTIC[:-1], "--", KERNEL], id="-- ends options, KERNEL after it"),
    pytest.param(
        [*REALISTIC[:-1], "--bios", "/usr/share/OVMF/OVMF.fd"], id="--bios instead of KERNEL"
    ),
    pytest.param(
        ["crosvm", "--extended-status", "--syslog-tag", "vm", *REALISTIC[3:]],
        id="all global options",
    ),
    pytest.param(["crosvm", "stop", "/run/vmsilo/x-crosvm-control.socket"], id="stop"),
    pytest.param(["crosvm", "powerbtn", "/run/vmsilo/x-crosvm-control.socket"], id="powerbtn"),
    pytest.param(["/nix/store/abc-crosvm/bin/crosvm", *REALISTIC[1:]], id="argv[0] is a path"),
]


@pytest.mark.parametrize("argv", ACCEPTED)
def test_accepted(argv: list[str]) -> None:
    assert validate_argv(argv) == []


def test_non_default_feature_options_depend_on_the_build() -> None:
    argv = run_with("--gdb", "1234", "--pvclock")
    assert any("--gdb" in problem for problem in validate_argv(argv))
    assert validate_argv(argv, build="linux_x86_64") == []


# ---------------------------------------------------------------------------------------
# Rejected command lines: every case names the option/key that must appear in a problem
# ---------------------------------------------------------------------------------------

REJECTED = [
    # argv shape: main.rs pre-processing and argh
    pytest.param(
        ["crosvm", "--no-timestamps", *REALISTIC[1:]],
        ("Unrecognized argument: --no-timestamps",),
        id="global --no-timestamps does not exist upstream",
    ),
    pytest.param(
        run_with("--wayland-security-context", "wayland_socket=/run/w,app_id=banking"),
        ("Unrecognized argument: --wayland-security-context",),
        id="--wayland-security-context is vmsilo-patch only",
    ),
    pytest.param(
        replaced("--hugepages", "--hugepages=true"),
        ("--hugepages", "switch", "stray positional"),
        id="switch given a value with '='",
    ),
    pytest.param(
        [*REALISTIC[:4], "--no-syslog", *REALISTIC[4:]],
        ("Unrecognized argument: --no-syslog", "before the subcommand"),
        id="global --no-syslog after run",
    ),
    pytest.param(
        ["crosvm", "--name", "x", *REALISTIC[1:]],
        ("Unrecognized argument: --name", "after `run`"),
        id="run option before run",
    ),
    pytest.param(run_with("--name", "again"), ("--name", "duplicate"), id="--name twice"),
    pytest.param(
        replaced("-m", "--mem", "1024", "-m"), ("-m (--mem)", "duplicate"), id="-m and --mem"
    ),
    pytest.param(REALISTIC[:-1], ("Executable is not specified", "KERNEL"), id="no KERNEL"),
    pytest.param(
        [*REALISTIC, "/boot/second-kernel"],
        ("Unrecognized argument: /boot/second-kernel",),
        id="two KERNEL positionals",
    ),
    pytest.param(
        run_with("--bios", "/usr/share/OVMF/OVMF.fd"),
        ("--bios", "KERNEL"),
        id="--bios together with KERNEL",
    ),
    pytest.param([*REALISTIC, "-p"], ("No value provided for option '-p'",), id="-p at the end"),
    pytest.param(
        run_with("-p", "-x=1"), ("-p", "'-x=1'", "stray positional"), id="value split at '='"
    ),
    pytest.param(run_with("--unknown-thing"), ("--unknown-thing",), id="unknown run option"),
    pytest.param(
        run_with("--swiotlb", "64"), ("--swiotlb", "aarch64"), id="aarch64-only option on x86"
    ),
    pytest.param(run_with("--gdb", "1234"), ("--gdb", "feature"), id="non-default feature"),
    pytest.param([*REALISTIC, "help"], ("'help'",), id="bare help"),
    pytest.param(["crosvm", "--log-level=debug"], ("no subcommand",), id="no subcommand"),
    pytest.param(["crosvm", "balloon", "1024", "/s"], ("balloon", "not covered"), id="unvendored"),
    pytest.param(["crosvm", "stop"], ("stop", "VM_SOCKET"), id="stop without socket"),
    pytest.param(["crosvm", "powerbtn", "/a", "/b"], ("powerbtn", "/b"), id="powerbtn extra"),
    # plain option values
    pytest.param(
        run_with("--core-scheduling=yes"),
        ("--core-scheduling 'yes'", "true"),
        id="--core-scheduling must be true/false",
    ),
    pytest.param(
        [*without("--vsock", "cid=3"), "--cid", "0x3"], ("--cid '0x3'", "decimal"), id="hex --cid"
    ),
    pytest.param(run_with("--mac", "52:54:00:12:34"), ("--mac", "6"), id="short MAC address"),
    pytest.param(
        run_with("--hypervisor", "gunyah"), ("--hypervisor", "gunyah"), id="aarch64 hypervisor"
    ),
    pytest.param(
        run_with("--input", "evdev"), ("--input 'evdev'", "'['"), id="input variant needs fields"
    ),
    pytest.param(
        run_with("--wayland-sock", "/run/w,app_id=x"),
        ("--wayland-sock", "app_id"),
        id="wayland-sock only takes name=",
    ),
    # serde_keyvalue
    pytest.param(
        run_with("--serial", "hardware=virtio-console,num=3,type=stdout,stream-non-blocking"),
        ("--serial", "unknown field `stream-non-blocking`"),
        id="serial stream-non-blocking is vmsilo-patch only",
    ),
    pytest.param(
        run_with("--virtio-snd=backend=pulse,capture=false,pulse_socket_path=/run/pulse"),
        ("--virtio-snd", "'backend'", "pulse"),
        id="virtio-snd backend=pulse",
    ),
    pytest.param(
        run_with("--virtio-snd", "capture=false,pulse_socket_path=/run/pulse"),
        ("--virtio-snd", "pulse_socket_path"),
        id="virtio-snd pulse_socket_path",
    ),
    pytest.param(
        run_with("--virtio-snd", "num-output-devices=2"),
        ("--virtio-snd", "num-output-devices"),
        id="virtio-snd keys are snake_case",
    ),
    pytest.param(
        run_with("--virtio-snd", "backend=cras"),
        ("--virtio-snd", "cras", "audio_cras"),
        id="virtio-snd cras needs a non-default feature",
    ),
    pytest.param(
        run_with("--block", "/d.img,readonly=true"),
        ("--block", "unknown field `readonly`"),
        id="unknown block key",
    ),
    pytest.param(
        run_with("--block", "/d.img,ro=1"), ("--block", "'ro'", "boolean"), id="ro=1 not a bool"
    ),
    pytest.param(run_with("--block", "/d.img,ro="), ("--block", "'ro'", "boolean"), id="ro= empty"),
    pytest.param(
        run_with("--block", "/var/a,b.img,ro=true"),
        ("--block", "'='", "'b'"),
        id="comma inside an unquoted path",
    ),
    pytest.param(
        run_with("--block", '/var/a"b.img,ro=true'),
        ("--block", "'path'", "quoted strings"),
        id="quote inside an unquoted path",
    ),
    pytest.param(
        run_with("--block", "/var/a[1].img"),
        ("--block", "'path'", "'['"),
        id="bracket inside an unquoted path",
    ),
    pytest.param(
        run_with("--block", '"/unterminated.img,ro=true'),
        ("--block", "unterminated"),
        id="unterminated quote",
    ),
    pytest.param(
        run_with("--block", "/d.img,id=abcdefghijklmnopqrstu"),
        ("--block", "'id'", "at most 20"),
        id="block id over 20 bytes",
    ),
    pytest.param(
        run_with("--block", "/d.img,ro=true,ro=false"),
        ("--block", "duplicate field `ro`"),
        id="duplicate key",
    ),
    pytest.param(
        run_with("--block", "/d.img,o_direct=true,direct=false"),
        ("--block", "duplicate field `direct`"),
        id="alias and key both given",
    ),
    pytest.param(
        run_with("--block", "ro=true"), ("--block", "missing field `path`"), id="missing path"
    ),
    pytest.param(
        run_with("--block", "/d.img,id"), ("--block", "'id'", "needs a value"), id="bare non-bool"
    ),
    pytest.param(
        run_with("--block", "/d.img,block-size=4k"),
        ("--block", "'block-size'", "invalid number"),
        id="int with unit suffix",
    ),
    pytest.param(
        run_with("--block", "/d.img,async-executor=tokio"),
        ("--block", "'async-executor'", "tokio"),
        id="unknown enum variant",
    ),
    pytest.param(
        run_with("--block", "/d.img,io-concurrency=4"),
        ("--block", "io-concurrency", "windows"),
        id="windows-only key",
    ),
    pytest.param(replaced("2048", "2g"), ("-m (--mem)", "'size'"), id="-m 2g"),
    pytest.param(
        replaced(NET, "tap-name=123"),
        ("--net", "tap-name", "integer"),
        id="numeric unquoted tap-name",
    ),
    pytest.param(
        replaced(NET, "tap-name=banking-22,pci-address=00:20.0"),
        ("--net", "'pci-address'", "0x1f"),
        id="pci device above 0x1f",
    ),
    pytest.param(
        replaced(NET, "tap-name=t,pci-address=0001:00:02.0"),
        ("--net", "'pci-address'", "domain"),
        id="pci domain must be 0",
    ),
    pytest.param(
        replaced(NET, "tap-name=t,pci-address=00:02"),
        ("--net", "'pci-address'", "'.'"),
        id="pci address without function",
    ),
    pytest.param(
        replaced(NET, "tap-name=t,mac=52:54:00:zz:34:56"),
        ("--net", "mac"),
        id="bad mac in tap-name mode",
    ),
    pytest.param(
        replaced(NET, "tap-name=t,tap-fd=3"),
        ("--net", "tap-name", "tap-fd"),
        id="two net modes",
    ),
    pytest.param(
        replaced(NET, "mac=52:54:00:12:34:56"), ("--net", "mode"), id="no net mode at all"
    ),
    pytest.param(replaced(NET, 'tap-fd="3"'), ("--net", "tap-fd", "integer"), id="quoted tap-fd"),
    pytest.param(replaced(NET, "tap-name"), ("--net", "tap-name"), id="bare tap-name"),
    pytest.param(
        replaced(NET, "/dev/tap0"), ("--net", "identifier"), id="net has no positional key"
    ),
    pytest.param(
        replaced(NET, "tap-name=t,mrg-rxbuf,packed-queue"),
        ("--net", "mrg-rxbuf", "packed-queue"),
        id="mrg-rxbuf with packed-queue",
    ),
    pytest.param(
        replaced(NET, "tap-name=t,model=virtio"), ("--net", "model"), id="unknown net key"
    ),
    pytest.param(
        replaced("--gpu=context-types=cross-domain:virgl2", "--gpu=context-types="),
        ("--gpu", "'context-types'", "expected a string"),
        id="empty gpu context-types",
    ),
    pytest.param(
        replaced("--gpu=context-types=cross-domain:virgl2", "--gpu=backend=vulkan"),
        ("--gpu", "'backend'", "vulkan"),
        id="unknown gpu backend",
    ),
    pytest.param(
        replaced("--gpu=context-types=cross-domain:virgl2", "--gpu=displays=[[mode=windowed]]"),
        ("--gpu", "displays.mode", "'['"),
        id="windowed needs its size",
    ),
    pytest.param(
        replaced("--gpu=context-types=cross-domain:virgl2", "--gpu=width=800"),
        ("--gpu", "width and height"),
        id="gpu width without height",
    ),
    pytest.param(
        run_with("--vfio", "/sys/bus/pci/devices/0000:02:00.0,rombar=false"),
        ("--vfio", "rombar"),
        id="unknown vfio key",
    ),
    pytest.param(
        run_with("--vhost-user", "type=fs"),
        ("--vhost-user", "missing field `socket`"),
        id="vhost-user without socket",
    ),
    pytest.param(
        run_with("--vhost-user", "type=virtiofs,socket=/s"),
        ("--vhost-user", "'type'", "virtiofs"),
        id="unknown vhost-user type",
    ),
    pytest.param(
        run_with("--shared-dir", "/home:home:type=fs:bogus=1"),
        ("--shared-dir", "bogus"),
        id="unknown shared-dir fs option",
    ),
    # run validation rules
    pytest.param(run_with("--cid", "3"), ("--cid", "--vsock"), id="--cid with --vsock"),
    pytest.param(
        run_with("--gpu", "context-types=virgl"), ("--gpu", "at most one"), id="two --gpu"
    ),
    pytest.param(
        run_with("--no-balloon"),
        ("--balloon-page-reporting", "--no-balloon"),
        id="page reporting needs the balloon",
    ),
    pytest.param(
        run_with("--wayland-sock", "/run/user/1000/wayland-1"),
        ("--wayland-sock", "unnamed"),
        id="two unnamed wayland sockets",
    ),
    pytest.param(
        run_with("--wayland-sock", "/a,name=x", "--wayland-sock", "/b,name=x"),
        ("--wayland-sock", "name=x"),
        id="duplicate wayland socket name",
    ),
    pytest.param(
        run_with("--block", "/a.img,root", "--pmem", "/b.img,root"),
        ("root disks",),
        id="two root disks",
    ),
    pytest.param(
        run_with("--protected-vm", "--protected-vm-without-firmware"),
        ("--protected-vm", "--protected-vm-without-firmware"),
        id="two protected-vm modes",
    ),
    pytest.param(
        run_with("--unmap-guest-memory-on-fork"),
        ("--unmap-guest-memory-on-fork", "--disable-sandbox"),
        id="unmap needs --disable-sandbox",
    ),
    pytest.param(
        run_with("--host-cpu-topology", "--no-smt"),
        ("--host-cpu-topology", "--no-smt"),
        id="host cpu topology vs no-smt",
    ),
    pytest.param(
        run_with("--irqchip", "split", "--split-irqchip"),
        ("--irqchip", "--split-irqchip"),
        id="irqchip twice over",
    ),
    # --serial rules
    pytest.param(
        run_with("--serial", "hardware=virtio-console,type=stdout"),
        ("--serial", "hardware=virtio-console,num=1", "already used"),
        id="serial (hardware, num) reused",
    ),
    pytest.param(
        run_with("--serial", "hardware=virtio-console,num=3,type=stdout,console"),
        ("--serial", "console already set"),
        id="two serial consoles",
    ),
    pytest.param(
        run_with("--serial", "hardware=virtio-console,num=3,type=stdout,earlycon"),
        ("--serial", "earlycon", "virtio-console"),
        id="earlycon on virtio-console",
    ),
    pytest.param(
        run_with("--serial", "type=stdout,stdin", "--serial", "type=stdout,num=2,stdin"),
        ("--serial", "stdin already set"),
        id="two stdin serials",
    ),
    pytest.param(
        run_with("--serial", "hardware=virtio-console,num=3,type=file,input-unix-stream,path=/f"),
        ("--serial", "input-unix-stream", "type=unix-stream"),
        id="input-unix-stream needs type=unix-stream",
    ),
    pytest.param(
        run_with("--serial", "hardware=virtio-console,num=3,type=unix-stream"),
        ("--serial", "path="),
        id="unix-stream serial needs a path",
    ),
    pytest.param(
        run_with("--serial", "type=stdout,num=5"),
        ("--serial", "num=5", "4 or less"),
        id="legacy serial num above 4",
    ),
    pytest.param(
        run_with("--serial", "type=stdout,num=0"),
        ("--serial", "'num'", "minimum"),
        id="serial num 0",
    ),
    pytest.param(
        run_with("--serial", "type=stdout,num=2,stdin,input=/in"),
        ("--serial", "stdin and input"),
        id="serial stdin with input",
    ),
    pytest.param(
        run_with("--serial", "type=stdout,num=2,pci-address=00:05.0"),
        ("--serial", "pci-address", "virtio-console"),
        id="serial pci-address on legacy hardware",
    ),
]


@pytest.mark.parametrize(("argv", "needles"), REJECTED)
def test_rejected(argv: list[str], needles: tuple[str, ...]) -> None:
    problems = validate_argv(argv)
    assert problems, "upstream crosvm would reject this argv, but no problem was reported"
    assert any(all(needle in problem for needle in needles) for problem in problems), (
        f"no problem mentions all of {needles}:\n" + "\n".join(problems)
    )


def test_assert_valid_lists_every_problem_and_the_argv() -> None:
    argv = run_with("--name", "again", "--block", "/d.img,ro=1")
    with pytest.raises(AssertionError) as caught:
        assert_valid(argv)
    message = str(caught.value)
    assert "2 problem(s)" in message
    assert "--name" in message and "'ro'" in message
    assert "/d.img,ro=1" in message


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


def test_preprocessing_splits_at_the_first_equal_sign_only() -> None:
    args = ["--serial=type=file,path=/x", "-h", "--host_ip", "-p", "-x=1", "-", "plain=1"]
    assert preprocess_argv(args) == [
        "--serial",
        "type=file,path=/x",
        "--help",
        "--host-ip",
        "-p",
        "-x",
        "1",
        "-",
        "plain=1",
    ]


def test_parse_keyvalue_returns_canonical_keys_and_values() -> None:
    assert parse_keyvalue("/d.img,o_direct,block_size=0x1000", "DiskOption") == {
        "path": "/d.img",
        "direct": True,
        "block-size": 4096,
    }
    assert parse_keyvalue("hardware=legacy-virtio-console", "SerialParameters") == {
        "hardware": "virtio-console"
    }
    assert parse_keyvalue("context-types=virgl:cross-domain", "GpuParameters") == {
        "context-types": ["virgl", "cross-domain"]
    }
    assert parse_keyvalue(r'"a \"quoted\" \\ path",ro=false', "DiskOption") == {
        "path": 'a "quoted" \\ path',
        "ro": False,
    }
    assert parse_keyvalue("", "GpuParameters") == {}


def test_parse_keyvalue_positional_first_key() -> None:
    # A bare first value fills the first declared field...
    assert parse_keyvalue("4096", "MemOptions") == {"size": 4096}
    assert parse_keyvalue("unix-stream,path=/s", "SerialParameters") == {
        "type": "unix-stream",
        "path": "/s",
    }
    # ...unless it is itself a field name, then it is a bool flag.
    with pytest.raises(KeyValueError, match="missing field `path`"):
        parse_keyvalue("ro", "DiskOption")


def test_parse_keyvalue_errors_carry_key_and_position() -> None:
    with pytest.raises(KeyValueError) as caught:
        parse_keyvalue("/d.img,ro=yes", "DiskOption")
    assert caught.value.key == "ro"
    assert caught.value.position == len("/d.img,ro=")


def test_parse_keyvalue_rejects_trailing_characters() -> None:
    with pytest.raises(KeyValueError, match="remaining characters"):
        parse_keyvalue("/d.img]", "DiskOption")


def test_parse_keyvalue_ignores_unknown_keys_where_upstream_does() -> None:
    # PflashParameters has no deny_unknown_fields: unknown keys are skipped, yet parsed.
    assert parse_keyvalue("/flash.img,whatever=1", "PflashParameters") == {"path": "/flash.img"}
    with pytest.raises(KeyValueError):
        parse_keyvalue('/flash.img,whatever="unterminated', "PflashParameters")


def test_parse_enum_variant() -> None:
    assert parse_enum_variant("kvm[device=/dev/kvm]", "HypervisorKind") == {
        "variant": "kvm",
        "device": "/dev/kvm",
    }
    assert parse_enum_variant("kvm", "HypervisorKind") == {"variant": "kvm"}
    with pytest.raises(KeyValueError, match="remaining characters"):
        parse_enum_variant("epoll[x=1]", "ExecutorKind")


# ---------------------------------------------------------------------------------------
# The vendored grammar
# ---------------------------------------------------------------------------------------


def test_vendored_grammar_is_complete() -> None:
    data = json.loads(GRAMMAR_PATH.read_text(encoding="utf-8"))
    assert data["source"]["repo"] == "https://github.com/google/crosvm"
    assert len(data["source"]["commit"]) == 40
    assert set(data["commands"]) == {"run", "stop", "powerbtn", "suspend", "resume", "snapshot"}
    assert len(data["commands"]["run"]["options"]) == 164
    assert set(data["global_options"]) == {
        "--extended-status",
        "--log-level",
        "--syslog-tag",
        "--no-syslog",
    }
    for spec, _ in _all_specs():
        schema = spec.get("schema")
        if schema is not None:
            table = "enum_schemas" if spec["type"] == "enum_variant" else "keyvalue_schemas"
            assert schema in data[table], f"{schema} is referenced but not vendored"


def _all_specs() -> Iterator[tuple[dict[str, object], str]]:
    """Every value/key spec of the vendored grammar, with where it comes from."""
    data = grammar()
    for command, spec in data["commands"].items():
        for option, option_spec in spec["options"].items():
            if "value" in option_spec:
                yield option_spec["value"], f"{command} {option}"
    for name, schema in data["keyvalue_schemas"].items():
        for key, key_spec in schema["keys"].items():
            yield key_spec, f"{name}.{key}"
            if isinstance(key_spec.get("item"), dict):
                yield key_spec["item"], f"{name}.{key}[]"


KNOWN_OPTION_VALUE_TYPES = {
    "string",
    "path",
    "int",
    "bool_word",
    "keyvalue",
    "enum_variant",
    "cpuset",
    "ipv4",
    "mac_address",
    "custom",
}
KNOWN_KEY_TYPES = {
    "bool",
    "int",
    "string",
    "path",
    "enum",
    "enum_args",
    "pci_address",
    "mac_address",
    "ipv4",
    "uuid",
    "colon_list",
    "list",
    "tuple",
    "struct",
    "cpuset_list",
    "bool_or_struct",
}


def test_validator_knows_every_value_type_in_the_grammar() -> None:
    data = grammar()
    for command in data["commands"].values():
        for option, spec in command["options"].items():
            if "value" in spec:
                assert spec["value"]["type"] in KNOWN_OPTION_VALUE_TYPES, option
    for name, schema in data["keyvalue_schemas"].items():
        for key, spec in schema["keys"].items():
            assert spec["type"] in KNOWN_KEY_TYPES, f"{name}.{key}"
            if isinstance(spec.get("item"), dict):
                assert spec["item"]["type"] in KNOWN_KEY_TYPES, f"{name}.{key}[]"


def test_validator_understands_every_cfg_in_the_grammar() -> None:
    data = grammar()
    cfgs: list[object] = [spec.get("cfg") for spec, _ in _all_specs()]
    for enum in data["enum_schemas"].values():
        for fields in enum["variants"].values():
            for value in (fields or {}).values():
                cfgs.append(value if isinstance(value, str) else value.get("cfg"))
    for cfg in cfgs:
        assert cfg is None or isinstance(cfg, str)
        for build in BUILDS:
            cfg_available(cfg, build)  # raises on an unknown cfg token


def test_first_available_key_is_the_positional_key() -> None:
    """The parser derives the positional key from key order; check it against upstream's."""
    for name, schema in grammar()["keyvalue_schemas"].items():
        first = schema.get("positional_first_key")
        keys = [k for k, spec in schema["keys"].items() if cfg_available(spec.get("cfg"))]
        if first is not None and first in keys:
            assert keys[0] == first, name


def test_fast_start_control_commands_follow_upstream_grammar() -> None:
    """``snapshot take`` is a nested subcommand (argh): its options and positionals are its
    own; ``suspend``/``resume`` take ``--full`` and the socket (what fastStart runs)."""
    assert validate_argv(["crosvm", "suspend", "--full", "/r/cv.sock"]) == []
    assert validate_argv(["crosvm", "resume", "--full", "/r/cv.sock"]) == []
    assert validate_argv(["crosvm", "snapshot", "take", "/s/state", "/r/cv.sock"]) == []
    assert validate_argv(["crosvm", "snapshot", "take", "/s", "/r", "--compress-memory"]) == []
    assert validate_argv(["crosvm", "snapshot", "/s/state", "/r/cv.sock"]) == [
        "snapshot: no subcommand given (one of: take)"
    ]
    missing = validate_argv(["crosvm", "snapshot", "take", "/s/state"])
    assert any("VM_SOCKET" in p for p in missing), missing
    assert any("--fast" in p for p in validate_argv(["crosvm", "suspend", "--fast", "/r"]))
