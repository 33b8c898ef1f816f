"""Unit tests for the guest init's pure parts (no VM): cmdline parsing and action lists."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
from pathlib import Path

import pytest

from vmsilo.contracts import cmdline
from vmsilo.contracts.cmdline import (
    GuestParams,
    IpConfig,
    Route,
    Share,
    parse_cmdline,
    parse_ip,
    parse_route,
    split_cmdline,
)
from vmsilo.contracts.mount import MS_RDONLY
from vmsilo.guest import actions as ga
from vmsilo.guest.actions import (
    BUSYBOX,
    MakeDir,
    Mount,
    RenameLink,
    Run,
    SetHostname,
    Spawn,
    WriteFile,
    hostname_actions,
    network_actions,
    share_actions,
    user_files,
)
from vmsilo.guest.init import agent_argv, restart_delay
from vmsilo.guest.ports import find_virtio_port, list_virtio_ports
from vmsilo.image.cpio import write_newc
from vmsilo.image.kernel import extract_vmlinux

SPEC_CMDLINE = (
    "console=hvc0 panic=-1 vmsilo.hostname=banking vmsilo.user=1000:100 "
    "vmsilo.ifname=upstream,52:BE:64:BF:CC:65 vmsilo.ifname=lan,52:00:00:00:00:02 "
    "ip=10.200.0.1:::255.255.255.254::upstream:none ip=[fd00::2/64]:::::upstream:none "
    "rd.route=0.0.0.0/0:10.200.0.0:upstream rd.route=[::/0]:[fd00::1]:upstream "
    "ip=:::::lan:dhcp nameserver=9.9.9.9 nameserver=2620:fe::fe "
    "autoShutdown.enable=1 autoShutdown.after=120 vmsilo.rootOverlay=raw,ephemeral "
    "vmsilo.share=docs,/mnt/docs,ro vmsilo.share=home,/home/user quiet"
)


def ip_argvs(actions: list[ga.Action]) -> list[tuple[str, ...]]:
    return [a.argv[2:] for a in actions if isinstance(a, Run) and a.argv[:2] == (BUSYBOX, "ip")]


# --- parsing ----------------------------------------------------------------------------------


def test_parse_full_spec_cmdline() -> None:
    p = parse_cmdline(SPEC_CMDLINE)
    assert p.errors == ()
    assert p.hostname == "banking"
    assert (p.uid, p.gid) == (1000, 100)
    assert p.ifnames == (("upstream", "52:be:64:bf:cc:65"), ("lan", "52:00:00:00:00:02"))
    assert p.ips == (
        IpConfig(iface="upstream", address="10.200.0.1/31"),
        IpConfig(iface="upstream", address="fd00::2/64"),
        IpConfig(iface="lan", dhcp=True),
    )
    assert p.routes == (
        Route("0.0.0.0/0", "10.200.0.0", "upstream"),
        Route("::/0", "fd00::1", "upstream"),
    )
    assert p.nameservers == ("9.9.9.9", "2620:fe::fe")
    assert p.auto_shutdown_after == 120
    assert p.root_overlay == "raw,ephemeral"
    assert p.shares == (Share("docs", "/mnt/docs", True), Share("home", "/home/user", False))
    assert p.console == "hvc0"


def test_defaults_and_missing_params() -> None:
    p = parse_cmdline("console=ttyS0,115200 quiet")
    assert p == GuestParams(console="ttyS0")
    assert p.auto_shutdown_after is None


def test_auto_shutdown_needs_enable() -> None:
    assert parse_cmdline("autoShutdown.after=60").auto_shutdown_after is None
    assert parse_cmdline("autoShutdown.enable=1").auto_shutdown_after == 300
    assert parse_cmdline("autoShutdown.enable=0 autoShutdown.after=9").auto_shutdown_after is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.2:::255.255.255.0::eth0:none", IpConfig("eth0", "10.0.0.2/24")),
        ("10.0.0.2:::255.255.255.254::eth0:none", IpConfig("eth0", "10.0.0.2/31")),
        ("10.0.0.2:::24::eth0:off", IpConfig("eth0", "10.0.0.2/24")),
        ("[fd00::2/64]:::::eth0:none", IpConfig("eth0", "fd00::2/64")),
        ("[2001:db8::1/48]:::::e1:none", IpConfig("e1", "2001:db8::1/48")),
        (":::::eth0:dhcp", IpConfig("eth0", dhcp=True)),
        ("eth1:dhcp", IpConfig("eth1", dhcp=True)),
        ("dhcp", IpConfig("", dhcp=True)),
        (
            "10.0.2.15::10.0.2.2:255.255.255.0:myhost:eth0:off",
            IpConfig("eth0", "10.0.2.15/24", gateway="10.0.2.2", hostname="myhost"),
        ),
        ("10.1.1.1:::::eth0:none", IpConfig("eth0", "10.1.1.1/32")),
    ],
)
def test_parse_ip_forms(value: str, expected: IpConfig) -> None:
    assert parse_ip(value) == expected


@pytest.mark.parametrize(
    "value",
    ["10.0.0.2:::255.255.255.0:::none", "garbage", "10.0.0.2:::::eth0:bootp", "x:::::e:none"],
)
def test_parse_ip_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_ip(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0/0:10.200.0.0:upstream", Route("0.0.0.0/0", "10.200.0.0", "upstream")),
        ("10.1.0.0/16:10.0.0.1:eth0", Route("10.1.0.0/16", "10.0.0.1", "eth0")),
        ("[::/0]:[fe80::1]:eth0", Route("::/0", "fe80::1", "eth0")),
        ("[2001:db8::/32]:[fd00::1]:e1", Route("2001:db8::/32", "fd00::1", "e1")),
        ("10.9.0.0/16::eth0", Route("10.9.0.0/16", None, "eth0")),
    ],
)
def test_parse_route_forms(value: str, expected: Route) -> None:
    assert parse_route(value) == expected
    assert expected.v6 == (":" in expected.dest)


def test_bad_params_are_collected_not_fatal() -> None:
    p = parse_cmdline(
        "vmsilo.user=abc ip=bogus rd.route=x nameserver=nope vmsilo.share=noslash "
        "vmsilo.ifname=eth0 vmsilo.hostname=ok"
    )
    assert p.hostname == "ok"
    assert len(p.errors) == 6
    assert (p.uid, p.gid) == (cmdline.DEFAULT_UID, cmdline.DEFAULT_GID)


def test_split_cmdline_quotes() -> None:
    assert split_cmdline(' a=1  b="x y" c ') == ["a=1", "b=x y", "c"]


# --- actions ----------------------------------------------------------------------------------


def test_network_actions_static_v4_v6_routes_dns_dhcp() -> None:
    acts = network_actions(parse_cmdline(SPEC_CMDLINE))
    assert ip_argvs(acts) == [
        ("link", "set", "dev", "lo", "up"),
        ("addr", "add", "10.200.0.1/31", "dev", "upstream"),
        ("-6", "addr", "add", "fd00::2/64", "dev", "upstream"),
        ("link", "set", "dev", "upstream", "up"),
        ("link", "set", "dev", "lan", "up"),
        ("-4", "route", "replace", "0.0.0.0/0", "via", "10.200.0.0", "dev", "upstream"),
        ("-6", "route", "replace", "::/0", "via", "fd00::1", "dev", "upstream"),
    ]
    renames = [a for a in acts if isinstance(a, RenameLink)]
    assert renames == [
        RenameLink("52:be:64:bf:cc:65", "upstream"),
        RenameLink("52:00:00:00:00:02", "lan"),
    ]
    writes = {a.path: a.content for a in acts if isinstance(a, WriteFile)}
    assert writes["/proc/sys/net/ipv6/conf/upstream/accept_dad"] == "0\n"
    assert writes["/etc/resolv.conf"] == "nameserver 9.9.9.9\nnameserver 2620:fe::fe\n"
    spawns = [a.argv for a in acts if isinstance(a, Spawn)]
    assert len(spawns) == 1
    assert spawns[0][:6] == (BUSYBOX, "udhcpc", "-f", "-i", "lan", "-s")
    # renames come before any use of the new names
    first_use = next(i for i, a in enumerate(acts) if isinstance(a, Run) and "upstream" in a.argv)
    assert all(i < first_use for i, a in enumerate(acts) if isinstance(a, RenameLink))


def test_network_actions_gateway_field_and_no_network() -> None:
    acts = network_actions(parse_cmdline("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"))
    assert ("-4", "route", "replace", "0.0.0.0/0", "via", "10.0.2.2", "dev", "eth0") in ip_argvs(
        acts
    )
    assert ip_argvs(network_actions(parse_cmdline(""))) == [("link", "set", "dev", "lo", "up")]


def test_hostname_actions() -> None:
    acts = hostname_actions(parse_cmdline("vmsilo.hostname=work"), "127.0.0.1\tlocalhost\n")
    assert acts[0] == SetHostname("work")
    hosts = next(a for a in acts if isinstance(a, WriteFile) and a.path == "/etc/hosts")
    assert hosts.content == "127.0.0.1\tlocalhost\n127.0.1.1\twork\n"
    assert hostname_actions(parse_cmdline(""), "") == []


PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n"
GROUP = "root:x:0:\naudio:x:29:\nvideo:x:44:bob\nuser:x:5:\n"
SHADOW = "root:*:19000:0:99999:7:::\n"


def test_user_files() -> None:
    files = user_files(parse_cmdline("vmsilo.user=1234:2345"), PASSWD, GROUP, SHADOW, "/bin/bash")
    pw = files["/etc/passwd"].splitlines()
    assert pw[0] == "root:x:0:0:root:/root:/bin/bash"
    assert pw[-1] == "user:x:1234:2345:vmsilo user:/home/user:/bin/bash"
    assert sum(1 for ln in pw if ln.startswith("root:")) == 1
    grp = files["/etc/group"].splitlines()
    assert "user:x:2345:" in grp and "user:x:5:" not in grp
    assert "audio:x:29:user" in grp and "video:x:44:bob,user" in grp
    assert "user::19000:0:99999:7:::" in files["/etc/shadow"].splitlines()


def test_user_actions_home_dir_only_without_home_share() -> None:
    p = parse_cmdline("vmsilo.user=1000:1000")
    acts = ga.user_actions(p, PASSWD, GROUP, SHADOW, "/bin/sh")
    assert MakeDir("/home/user", 0o755, 1000, 1000, skel=True) in acts
    p2 = parse_cmdline("vmsilo.user=1000:1000 vmsilo.share=home,/home/user")
    assert not any(
        isinstance(a, MakeDir) and a.path == "/home/user"
        for a in ga.user_actions(p2, PASSWD, GROUP, SHADOW, "/bin/sh")
    )


def test_share_actions_parents_first_and_flags() -> None:
    p = parse_cmdline(
        "vmsilo.user=7:8 vmsilo.share=docs,/home/user/Documents,ro vmsilo.share=home,/home/user"
    )
    mounts = [a for a in share_actions(p) if isinstance(a, Mount)]
    assert [m.target for m in mounts] == ["/home/user", "/home/user/Documents"]
    assert all(m.fstype == "virtiofs" for m in mounts)
    assert mounts[1].flags & MS_RDONLY and not mounts[0].flags & MS_RDONLY
    assert MakeDir("/home/user", 0o755, 7, 8) in share_actions(p)


def test_agent_argv() -> None:
    base = [
        "--ready-port",
        "org.vmsilo.ready",
        "--channel-port",
        "org.vmsilo.channel",
        "--vsock-port",
        "5000",
        "--user",
        "1000:100",
    ]
    assert agent_argv(parse_cmdline("vmsilo.user=1000:100")) == base
    p = parse_cmdline("vmsilo.user=1000:100 autoShutdown.enable=1 autoShutdown.after=30")
    assert agent_argv(p) == [*base, "--auto-shutdown-after", "30"]


def test_restart_delay_backs_off_and_caps() -> None:
    assert [restart_delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert restart_delay(50) == 30.0


# --- helpers shared with the agent / the builder ----------------------------------------------


def test_find_virtio_port(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    for n, name in (("vport1p1", ""), ("vport2p1", "org.vmsilo.ready"), ("vport2p2", "x")):
        (sysfs / n).mkdir(parents=True)
        (sysfs / n / "name").write_text(name + "\n")
    dev.mkdir()
    (dev / "vport2p1").touch()
    assert list_virtio_ports(sysfs, dev) == {
        "org.vmsilo.ready": dev / "vport2p1",
        "x": dev / "vport2p2",
    }
    assert find_virtio_port("org.vmsilo.ready", sysfs, dev) == dev / "vport2p1"
    assert find_virtio_port("x", sysfs, dev) is None  # no device node
    assert find_virtio_port("nope", tmp_path / "missing", dev) is None


def test_extract_vmlinux_from_fake_bzimage() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1  # setup_sects: protected-mode code at (1+1)*512
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    image = bytes(setup) + b"\x00" * 16 + payload + b"trailer"
    assert extract_vmlinux(image) == elf
    assert extract_vmlinux(b"junk" + gzip.compress(elf)) == elf
    assert extract_vmlinux(elf) == elf


def test_cpio_newc(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x").write_bytes(b"abc")
    (tmp_path / "link").symlink_to("bin/x")
    buf = io.BytesIO()
    write_newc(tmp_path, buf, devices=(("dev/console", 0o20600, 5, 1),))
    data = buf.getvalue()
    assert data.startswith(b"070701") and len(data) % 4 == 0
    assert b"bin/x\x00" in data and b"TRAILER!!!" in data and b"dev/console\x00" in data
    assert data.index(b"bin\x00") < data.index(b"bin/x\x00")
