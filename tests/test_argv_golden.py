"""Golden tests: a config using every option, compared element by element with an argv
written by hand from SPEC §4 — both crosvm flavors — plus SPEC §3's worked examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from crosvm_grammar import assert_valid
from fleet import USERS, plan_of, run_vmsilo, run_vmsilo_json
from vmsilo.backends.crosvm import crosvm_argv
from vmsilo.config.load import load_config
from vmsilo.plan.build import build_plan
from vmsilo.plan.derive import generated_mac, pci_address, tap_name

EVERY = Path(__file__).parent / "data" / "configs" / "every-option.toml"

HEAD_UPSTREAM = [
    "/opt/crosvm/bin/crosvm",
    "--log-level=trace",
    "--no-syslog",
]
HEAD_VMSILO = [*HEAD_UPSTREAM, "--no-timestamps"]
RUN_PART_1 = [
    "--extended-status",
    "--syslog-tag",
    "vmsilo-work",
    "run",
    "--name",
    "work",
    "-m",
    "4096",
    "--hugepages",
    "--balloon-page-reporting",
    "--boost-uclamp",
    "--disable-virtio-intx",
    "--no-i8042",
    "--no-rtc",
    "--s2idle",
    "--core-scheduling=true",
    "--initrd=/boot/work-initrd",
]
CONSOLE = (
    "--serial=hardware=virtio-console,type=unix-stream,"
    "path=/run/vms/work-console-backend.socket,console,input-unix-stream"
)
READY = (
    "--serial=hardware=virtio-console,num=2,type=unix-stream,"
    "path=/run/vms/work-ready.socket,name=org.vmsilo.ready"
)
BLOCKS = [
    "--block",
    "/var/lib/vms/images/desktop/current/root.erofs,direct=true,packed-queue=true,ro=false",
    "--block",
    "/data/work.img,direct=true,id=data,packed-queue=true,ro=false,sparse=false",
    "--block",
    "/data/scratch.img,direct=false,packed-queue=true",
    "--block",
    "/var/lib/vms/work-ephemeral.raw,direct=true,id=ephemeral,packed-queue=true,ro=false",
]
PARAMS = [
    "vmsilo.hostname=work",
    "vmsilo.user=1000:1000",
    "vmsilo.ifname=eth0,02:00:00:00:00:01",
    "vmsilo.ifname=lan,52:83:db:a9:0b:18",
    "vmsilo.ifname=upstream,52:04:85:c8:1b:f1",
    "ip=192.168.50.2:::255.255.255.0::eth0:none",
    "ip=192.168.51.2:::255.255.255.0::eth0:none",
    "ip=[fd00::2/64]:::::eth0:none",
    "rd.route=0.0.0.0/0:192.168.50.1:eth0",
    "rd.route=10.1.0.0/16:192.168.50.254:eth0",
    "rd.route=[::/0]:[fd00::1]:eth0",
    "ip=:::::lan:dhcp",
    "ip=10.200.0.9:::255.255.255.254::upstream:none",
    "rd.route=0.0.0.0/0:10.200.0.8:upstream",
    "nameserver=192.168.50.1",
    "nameserver=fd00::1",
    "autoShutdown.enable=1",
    "autoShutdown.after=600",
    "vmsilo.rootOverlay=raw,ephemeral",
    "vmsilo.share=docs,/mnt/docs,ro",
    "vmsilo.share=home,/home/user",
    "vmsilo.share=src,/mnt/src",
    "quiet",
    "loglevel=3",
]
SHARES = [
    "--vhost-user",
    "type=fs,socket=/run/vms/work-virtiofsd-docs.socket",
    "--vhost-user",
    "type=fs,socket=/run/vms/work-virtiofsd-home.socket",
    "--vhost-user",
    "type=fs,socket=/run/vms/work-virtiofsd-src.socket",
]
TAIL = [
    "--vfio",
    "/sys/bus/pci/devices/0000:01:00.0",
    "--vfio",
    "/sys/bus/pci/devices/0000:02:00.0,iommu=viommu",
    "--net",
    "tap-name=worktap,mac=02:00:00:00:00:01,pci-address=00:16.0",
    "--net",
    "tap-name=work-23,mac=52:83:db:a9:0b:18,pci-address=00:17.0",
    "--net",
    "tap-name=work-24,mac=52:04:85:c8:1b:f1,pci-address=00:18.0",
    "--vhost-user",
    "max-queue-size=256,socket=/run/vhost-blk.sock,type=block",
    "--no-rng",
    "--no-smt",
    "/boot/work-vmlinux",
]

EXPECTED_UPSTREAM = [
    *HEAD_UPSTREAM,
    *RUN_PART_1,
    CONSOLE,
    READY,
    *BLOCKS,
    *[w for p in PARAMS for w in ("-p", p)],
    *SHARES,
    "--vsock",
    "cid=4",
    "--cpus",
    "4",
    "--gpu=context-types=cross-domain:virgl2:venus",
    "--gpu-render-server=path=/opt/virgl/render_server",
    "--wayland-sock",
    "/run/user/1000/vmsilo/work-wayland.socket",  # the VM's filter, not the compositor (§9.1)
    "--vhost-user",
    "type=sound,socket=/run/vms/work-sound.socket",
    "-s",
    "/run/vms/work-crosvm-control.socket",
    *TAIL,
]

EXPECTED_VMSILO = [
    *HEAD_VMSILO,
    *RUN_PART_1,
    CONSOLE + ",stream-non-blocking",
    READY,
    *BLOCKS,
    *[w for p in PARAMS for w in ("-p", p)],
    *SHARES,
    "--cid",
    "4",
    "--cpus",
    "4",
    "--gpu=context-types=cross-domain:virgl2:venus",
    "--gpu-render-server=path=/opt/virgl/render_server",
    "--virtio-snd=backend=pulse,capture=true,"
    "pulse_cookie_path=/home/alice/.config/pulse/cookie,"
    "pulse_socket_path=/run/user/1000/pulse/native",
    "-s",
    "/run/vms/work-crosvm-control.socket",
    "--wayland-security-context",
    "wayland_socket=/run/user/1000/wayland-1,app_id=vmsilo:work:darkorange",
    *TAIL,
]


def _compare(actual: list[str], expected: list[str]) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=False)):
        assert a == e, f"element {i}: {a!r} != {e!r}"
    assert len(actual) == len(expected), (actual[len(expected) :], expected[len(actual) :])


def test_every_option_upstream_argv_element_by_element() -> None:
    plan = build_plan(load_config(EVERY, USERS), USERS)
    argv = crosvm_argv(plan, plan.vms["work"])
    _compare(argv, EXPECTED_UPSTREAM)
    assert_valid(argv)


def test_every_option_vmsilo_flavor_argv_element_by_element() -> None:
    text = EVERY.read_text().replace('flavor = "upstream"', 'flavor = "vmsilo"')
    plan = plan_of(text)
    _compare(crosvm_argv(plan, plan.vms["work"]), EXPECTED_VMSILO)


def test_every_option_netvm_side() -> None:
    plan = build_plan(load_config(EVERY, USERS), USERS)
    netvm = plan.vms["netvm"]
    assert netvm.id == 3 and plan.vms["work"].id == 4
    assert [(i.name, i.tap, i.bridge, i.host_address, i.addresses) for i in netvm.interfaces] == [
        ("upstream", "netvm-22", None, "10.200.0.0/31", ("10.200.0.1/31",)),
        ("work", "netvm-23", "vmsilo-br4", None, ("10.200.0.8/31",)),
    ]
    argv = crosvm_argv(plan, netvm)
    assert_valid(argv)
    assert "--gpu=context-types=" not in " ".join(argv)
    assert "type=sound" not in " ".join(argv)
    assert "vmsilo.rootOverlay=tmpfs" in argv
    assert not any("ephemeral" in w for w in argv)
    assert netvm.netvm_clients == ("work",)


def test_vmsilo_argv_cli_matches_library(tmp_path: Path) -> None:
    """`vmsilo argv` reads the host like the supervisor: with the sound daemon present it is
    the golden argv; without it (SPEC §9.2) the same argv without the sound device."""
    daemon = tmp_path / "vhost-device-sound"
    daemon.write_text("#!/bin/sh\n")
    daemon.chmod(0o755)
    config = tmp_path / "every-option.toml"
    text = EVERY.read_text()
    assert '"/opt/bin/vhost-device-sound"' in text
    config.write_text(text.replace('"/opt/bin/vhost-device-sound"', f'"{daemon}"'))
    got = run_vmsilo_json(["-c", str(config), "argv", "work"])
    assert got == EXPECTED_UPSTREAM
    daemon.unlink()
    got = run_vmsilo_json(["-c", str(config), "argv", "work"])
    at = EXPECTED_UPSTREAM.index("type=sound,socket=/run/vms/work-sound.socket")
    assert got == EXPECTED_UPSTREAM[: at - 1] + EXPECTED_UPSTREAM[at + 1 :]


def test_spec_examples() -> None:
    assert generated_mac("banking", "upstream") == "52:be:64:bf:cc:65"
    assert tap_name("bankingsuperlongname", 3, 22) == "bankingsupe3-22"
    assert tap_name("banking", 3, 22) == "banking-22"
    assert pci_address(22) == "00:16.0"
    assert pci_address(31) == "00:1f.0"


def test_spec_examples_through_the_plan() -> None:
    plan = plan_of(
        """
        user = "alice"
        [vms.bankingsuperlongname]
        network.netvm = "host"
        [vms.banking]
        network.netvm = "host"
        """
    )
    # ids follow byte order of names: banking=3, bankingsuperlongname=4
    assert plan.vms["banking"].interfaces[0].mac == "52:be:64:bf:cc:65"
    assert plan.vms["bankingsuperlongname"].interfaces[0].tap == "bankingsupe4-22"
    only = plan_of('user = "alice"\n[vms.bankingsuperlongname.network]\nnetvm = "host"\n')
    assert only.vms["bankingsuperlongname"].id == 3
    assert only.vms["bankingsuperlongname"].interfaces[0].tap == "bankingsupe3-22"
    assert only.vms["bankingsuperlongname"].interfaces[0].pci_address == "00:16.0"


def test_ids_sort_by_bytes_not_locale() -> None:
    plan = plan_of('user = "alice"\n[vms.b]\n[vms.a-b]\n[vms.a]\n[vms.a9]\n')
    assert {n: v.id for n, v in plan.vms.items()} == {"a": 3, "a-b": 4, "a9": 5, "b": 6}


def test_netvm_links_pinned_first_then_lowest_free() -> None:
    plan = plan_of(
        """
        user = "alice"
        netvmRange = "10.9.0.0/29"
        [vms.gw]
        network.isNetvm = true
        [vms.a]
        network.netvm = "gw"
        [vms.b]
        network.netvm = "gw"
        network.netvmSubnet = "10.9.0.0/31"
        [vms.c]
        network.netvm = "host"
        """
    )
    links = {link.client: link.subnet for link in plan.links}
    assert links == {"a": "10.9.0.2/31", "b": "10.9.0.0/31", "c": "10.9.0.4/31"}
    a = plan.vms["a"].interfaces[0]
    assert (a.name, a.addresses, a.bridge) == ("upstream", ("10.9.0.3/31",), "vmsilo-br3")
    assert [r.dest + " via " + r.via for r in a.routes] == ["0.0.0.0/0 via 10.9.0.2"]
    c = plan.vms["c"].interfaces[0]
    assert (c.host_address, c.bridge) == ("10.9.0.4/31", None)
    gw_ifaces = [(i.name, i.addresses[0], i.bridge) for i in plan.vms["gw"].interfaces]
    assert gw_ifaces == [("a", "10.9.0.2/31", "vmsilo-br3"), ("b", "10.9.0.0/31", "vmsilo-br4")]


def test_long_client_name_is_cut_with_its_id_inside_the_netvm() -> None:
    plan = plan_of(
        """
        user = "alice"
        [vms.gw]
        network.isNetvm = true
        [vms.averyveryverylongclient]
        network.netvm = "gw"
        """
    )
    (iface,) = plan.vms["gw"].interfaces
    assert iface.name == "averyveryveryl3"
    assert len(iface.name) == 15


def test_defaults_follow_the_hypervisor() -> None:
    plan = plan_of('user = "alice"\n[vms.c]\n[vms.q]\nhypervisor = "qemu"\n')
    c, q = plan.vms["c"], plan.vms["q"]
    assert c.gpu is not None and c.gpu.context_types == ("cross-domain", "virgl2")
    assert c.gpu.wayland_socket == "/run/user/1000/wayland-0"
    assert (c.sound.playback, c.sound.capture) == (True, False)
    # v3: QEMU shows windows through waypipe by default (SPEC §9.1), no OpenGL unless asked
    assert q.gpu is not None and (q.gpu.wayland, q.gpu.opengl, q.gpu.vulkan) == (True, False, False)
    assert q.gpu.filter_socket == "/run/user/1000/vmsilo/q-wayland.socket"
    assert q.gpu.waypipe_socket == "/run/user/1000/vmsilo/q-waypipe.socket"
    assert (q.sound.playback, q.sound.capture) == (False, False)
    assert "hugepages" in q.not_applied and "packed-queue" in q.not_applied
    assert c.not_applied == ()
    assert [s.tag for s in c.shares] == ["home"]
    assert c.shares[0].host_path == "/shared/c"


@pytest.mark.parametrize("flavor", ["upstream", "vmsilo"])
def test_render_launcher_quotes_every_word(tmp_path: Path, flavor: str) -> None:
    import shlex
    import subprocess

    cfg = tmp_path / "c.toml"
    daemon = tmp_path / "vhost-device-sound"  # upstream: the sound daemon must exist
    daemon.write_text("#!/bin/sh\n")
    daemon.chmod(0o755)
    text = EVERY.read_text().replace('flavor = "upstream"', f'flavor = "{flavor}"')
    cfg.write_text(text.replace('"/opt/bin/vhost-device-sound"', f'"{daemon}"'))
    out = tmp_path / "launch.sh"
    status, _, err = run_vmsilo(["-c", str(cfg), "render-launcher", "work", "-o", str(out)])
    assert status == 0, err
    script = out.read_text()
    assert script.startswith("#!/bin/sh\n")
    # Run the script with the binary replaced by a printer of its argv: the words must arrive
    # exactly as the library's argv.
    printer = tmp_path / "printargs"
    printer.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done\n')
    printer.chmod(0o755)
    script = script.replace(shlex.quote("/opt/crosvm/bin/crosvm"), str(printer), 1)
    got = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout
    words = got.split(b"\0")[:-1]
    expected = EXPECTED_UPSTREAM if flavor == "upstream" else EXPECTED_VMSILO
    assert [w.decode() for w in words] == expected[1:]
