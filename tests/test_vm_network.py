"""Taps made by the supervisor, on a real guest, inside a network namespace of the test's own.

The VM's supervisor (and so QEMU and its tap) runs in a fresh namespace; the only traffic is
between that namespace and the guest behind its tap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vm


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vmsilo-t{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_tap_link_to_the_host_carries_traffic(image: Any, state_dir: Path, netns: str) -> None:
    run_dir = Path(f"/tmp/vmsilo-net-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    config = run_dir / "vmsilo.toml"
    config.write_text(
        f"""
user = "root"
stateDir = "{state_dir}"
runtimeDir = "{run_dir}"
netvmRange = "10.231.0.0/24"
[qemu]
accel = "tcg"
[vms.netdemo]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
network.netvm = "host"
"""
    )
    env = dict(os.environ, VMSILO_CONFIG=str(config))

    def in_ns(*argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, env=env, check=check
        )

    vmsilo = [sys.executable, "-m", "vmsilo.cli.vmsilo"]
    vm_run = [sys.executable, "-m", "vmsilo.cli.vm_run"]
    # `ip netns exec` shows this file as the namespace's /etc/resolv.conf: a local stub the VM
    # cannot reach, and a resolver behind the host's uplink that it can
    resolv = Path("/etc/netns") / netns / "resolv.conf"
    resolv.parent.mkdir(parents=True, exist_ok=True)
    resolv.write_text("nameserver 127.0.0.53\nnameserver 10.99.0.1\n")
    try:
        p = in_ns(*vmsilo, "start", "netdemo", check=False)
        assert p.returncode == 0, p.stderr
        # issue 15.6: working DNS by default behind the host's NAT, and iproute2's ip
        p = in_ns(*vm_run, "netdemo", "cat", "/etc/resolv.conf")
        assert p.stdout == b"nameserver 10.99.0.1\n", p.stdout + p.stderr
        p = in_ns(*vm_run, "netdemo", "ip", "-br", "addr", "show", "upstream")
        assert b"10.231.0.1/31" in p.stdout, p.stdout + p.stderr
        link = in_ns("ip", "-o", "addr", "show", "dev", "netdemo-22").stdout.decode()
        assert "10.231.0.0/31" in link
        # the guest got its address and default route from the kernel parameters
        p = in_ns(*vm_run, "netdemo", "busybox", "ip", "-o", "addr", "show", "upstream")
        assert b"10.231.0.1/31" in p.stdout, p.stdout + p.stderr
        p = in_ns(*vm_run, "netdemo", "busybox", "ip", "route", check=False)
        assert b"default via 10.231.0.0 dev upstream" in p.stdout, p.stdout + p.stderr
        # traffic both ways across the tap
        p = in_ns("busybox", "ping", "-c", "1", "-W", "5", "10.231.0.1", check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        p = in_ns(
            *vm_run, "--root", "netdemo", "busybox", "ping", "-c", "1", "-W", "5", "10.231.0.0"
        )
        assert p.returncode == 0, p.stdout + p.stderr
        # the host NATs the guest out of its own uplink: a second namespace stands for "the
        # internet" and has no route back to the guest's link
        peer = _internet(netns)
        try:
            ping = ["busybox", "ping", "-c", "1", "-W", "5", "10.99.0.1"]
            p = in_ns(*vm_run, "--root", "netdemo", *ping, check=False)
            assert p.returncode == 0, p.stdout + p.stderr
            rules = in_ns("nft", "list", "table", "ip", "vmsilo_3").stdout.decode()
            assert "masquerade" in rules and "netdemo-22" in rules
            # the guest cannot send from another address (anti-spoofing)
            spoof = ["busybox", "ping", "-c", "1", "-W", "3", "-I", "10.231.0.5", "10.99.0.1"]
            in_ns(
                *vm_run,
                "--root",
                "netdemo",
                "busybox",
                "ip",
                "addr",
                "add",
                "10.231.0.5/32",
                "dev",
                "upstream",
            )
            p = in_ns(*vm_run, "--root", "netdemo", *spoof, check=False)
            assert p.returncode != 0
        finally:
            subprocess.run(["ip", "netns", "del", peer], check=False)
        p = in_ns(*vmsilo, "stop", "netdemo", check=False)
        assert p.returncode == 0, p.stderr
        gone = in_ns("ip", "link", "show", "netdemo-22", check=False)
        assert gone.returncode != 0  # tap removed on stop
        tables = in_ns("nft", "list", "tables").stdout.decode()
        assert "vmsilo_3" not in tables  # NAT rules removed with the VM
    finally:
        in_ns(*vmsilo, "stop", "netdemo", check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(resolv.parent, ignore_errors=True)


def _internet(ns: str) -> str:
    """A second namespace behind ns's default route, standing for the outside world."""
    peer = f"{ns}-up"
    subprocess.run(["ip", "netns", "add", peer], check=True)
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            "up0",
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            "up1",
            "netns",
            peer,
        ],
        check=True,
    )
    for argv in (
        ["addr", "add", "10.99.0.2/24", "dev", "up0"],
        ["link", "set", "up0", "up"],
        ["link", "set", "lo", "up"],
        ["route", "add", "default", "via", "10.99.0.1"],
    ):
        subprocess.run(["ip", "-n", ns, *argv], check=True)
    for argv in (["addr", "add", "10.99.0.1/24", "dev", "up1"], ["link", "set", "up1", "up"]):
        subprocess.run(["ip", "-n", peer, *argv], check=True)
    return peer


def test_netvm_routes_its_clients_and_keeps_them_apart(image: Any, state_dir: Path) -> None:
    from vmenv import VM_DEMO, qemu_install

    def vm(name: str, extra: str) -> str:
        return VM_DEMO.replace("[vms.demo]", f"[vms.{name}]") + extra

    vms = (
        'netvmRange = "10.232.0.0/24"\n'
        + vm("gate", "network = { isNetvm = true, netvm = 'host' }\n")
        + vm("client", "network = { netvm = 'gate' }\n")
        + vm("client2", "network = { netvm = 'gate' }\n")
    )
    # netvmRange is a global key: move it before the tables
    vms_first = vms.split("\n", 1)
    with qemu_install(state_dir, "route", vms_first[1], netns=True) as inst:
        text = inst.config.read_text().replace("[qemu]", vms_first[0] + "\n[qemu]", 1)
        inst.config.write_text(text)
        assert inst.netns is not None
        peer = _internet(inst.netns)
        try:
            for name in ("client", "client2"):
                p = inst.cmd("vmsilo", "start", name)
                assert p.returncode == 0, p.stderr
            assert inst.status("gate")["detail"] is None  # routing configured in the guest
            p = inst.cmd("vm-run", "client", "busybox", "ip", "-o", "addr", "show", "upstream")
            assert b"10.232.0.1/31" in p.stdout, p.stdout + p.stderr
            ping = ["busybox", "ping", "-c", "1", "-W", "5"]
            # client -> gate -> host -> the outside: NAT twice, replies find their way back
            p = inst.cmd("vm-run", "--root", "client", *ping, "10.99.0.1")
            assert p.returncode == 0, p.stdout + p.stderr
            # client -> client2 through the netvm is dropped
            p = inst.cmd("vm-run", "--root", "client", *ping, "-W", "3", "10.232.0.3")
            assert p.returncode != 0, p.stdout
            p = inst.cmd("vm-run", "--root", "client2", *ping, "10.99.0.1")
            assert p.returncode == 0, p.stdout + p.stderr
        finally:
            subprocess.run(["ip", "netns", "del", peer], check=False)
