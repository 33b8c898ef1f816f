"""Attacks SPEC §11.3: a VM reaches host services only where configured — the host's input
path from VM links is closed (vmsilo serves nothing there).

A real QEMU guest behind ``netvm = "host"``, in a network namespace of the test's own that
stands for the host: a TCP service of the host listens on every address (the gateway address
on the VM's tap, another address of the host, IPv6 link-local on the tap). The guest must not
reach it by any of them, while NAT to a second namespace (the internet) still works — and once
the VM's input table is deleted by hand the same connections succeed, so it is that table that
blocks them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vmenv import VM_DEMO, Install, qemu_install

pytestmark = pytest.mark.vm

PORT = 7070
GATEWAY = "10.233.0.0"  # the host's end of the VM's /31
OTHER = "10.99.0.2"  # the host's address on its uplink (see _internet)
INTERNET = "10.99.0.1"

#: a TCP service that greets whoever connects, on every IPv4 and IPv6 address
SERVICE = f"""
import select, socket
socks = []
for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, {PORT}))
    s.listen()
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept()
        c.sendall(b"served\\n")
        c.close()
"""

#: run in the guest: prints what the service said, or fails
CONNECT = """
import errno, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
# an IPv6 link-local source is unusable until the guest's duplicate address detection is done
# (EADDRNOTAVAIL): that is not the host refusing, so wait it out instead of counting it
deadline = time.monotonic() + 20
while True:
    c = socket.socket(info[0], socket.SOCK_STREAM)
    c.settimeout(15)  # a TCG guest on a busy host is slow; a dropped SYN still fails
    try:
        c.connect(info[4])
        break
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL or time.monotonic() > deadline:
            raise
        c.close()
        time.sleep(0.2)
print(c.recv(64).decode().strip())
"""


@contextmanager
def service(netns: str) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SERVICE],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield
    finally:
        proc.kill()
        proc.wait()


def connect(inst: Install, address: str, vm: str = "guest") -> bool:
    """Whether ``vm`` gets the service's greeting at ``address``."""
    p = inst.cmd("vm-run", vm, "python3", "-c", CONNECT, address, str(PORT))
    return p.returncode == 0 and p.stdout == b"served\n"


def blocked(inst: Install, address: str, vm: str = "guest") -> bool:
    """Whether ``vm``'s connection to ``address`` goes unanswered: the SYN is dropped (a
    timeout), not refused or failed for another reason."""
    p = inst.cmd("vm-run", vm, "python3", "-c", CONNECT, address, str(PORT))
    return p.returncode != 0 and p.stderr.rstrip().endswith(b"TimeoutError: timed out")


def in_ns(inst: Install, *argv: str) -> str:
    assert inst.netns is not None
    p = subprocess.run(["ip", "netns", "exec", inst.netns, *argv], capture_output=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def test_a_vm_reaches_no_host_service_but_still_the_internet(image: Any, state_dir: Path) -> None:
    from test_vm_network import _internet

    vms = VM_DEMO.replace("[vms.demo]", "[vms.guest]") + "network.netvm = 'host'\n"
    with qemu_install(state_dir, "input", vms, netns=True) as inst:
        assert inst.netns is not None
        text = inst.config.read_text()
        inst.config.write_text('netvmRange = "10.233.0.0/24"\n' + text)
        peer = _internet(inst.netns)
        try:
            p = inst.cmd("vmsilo", "start", "guest")
            assert p.returncode == 0, p.stderr
            # the tap's IPv6 link-local address, as the guest reaches it over its link
            local = in_ns(
                inst, "ip", "-6", "-o", "addr", "show", "dev", "guest-22", "scope", "link"
            )
            link_local = local.split()[3].split("/")[0] + "%upstream"
            targets = [GATEWAY, OTHER, link_local]
            with service(inst.netns), service(peer):
                # NAT out still works: the internet's service answers
                assert connect(inst, INTERNET)
                for address in targets:
                    assert blocked(inst, address), address
                # ping of the gateway is let through (the kernel answers; no service)
                ping = ["busybox", "ping", "-c", "1", "-W", "5", GATEWAY]
                assert inst.cmd("vm-run", "--root", "guest", *ping).returncode == 0
                # without the VM's input table the host's service is open to it: the table is
                # what closes it
                in_ns(inst, "nft", "delete", "table", "inet", "vmsilo_input_3")
                for address in targets:
                    assert connect(inst, address), address
            p = inst.cmd("vmsilo", "stop", "guest")
            assert p.returncode == 0, p.stderr
        finally:
            subprocess.run(["ip", "netns", "del", peer], check=False)


def test_a_client_behind_a_netvm_reaches_no_host_service_over_its_link_bridge(
    image: Any, state_dir: Path
) -> None:
    """The link bridge ``vmsilo-br<id>`` has no address of the host's but an IPv6 link-local
    one, on the client's own link; both ends' tables close it."""

    def vm(name: str, network: str) -> str:
        return VM_DEMO.replace("[vms.demo]", f"[vms.{name}]") + f"network = {network}\n"

    vms = vm("client", "{ netvm = 'gate' }") + vm("gate", "{ isNetvm = true, netvm = 'host' }")
    with qemu_install(state_dir, "input-br", vms, netns=True) as inst:
        assert inst.netns is not None
        p = inst.cmd("vmsilo", "start", "client")  # and its netvm first
        assert p.returncode == 0, p.stderr
        # client is 3, gate 4: the link's bridge is vmsilo-br3, in both VMs' input tables
        for table in ("vmsilo_input_3", "vmsilo_input_4"):
            assert "vmsilo-br3" in in_ns(inst, "nft", "list", "table", "inet", table)
        local = in_ns(inst, "ip", "-6", "-o", "addr", "show", "dev", "vmsilo-br3", "scope", "link")
        bridge = local.split()[3].split("/")[0] + "%upstream"
        with service(inst.netns):
            assert blocked(inst, bridge, "client")
            for table in ("vmsilo_input_3", "vmsilo_input_4"):
                in_ns(inst, "nft", "delete", "table", "inet", table)
            assert connect(inst, bridge, "client")
