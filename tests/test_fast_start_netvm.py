"""fastStart (SPEC §10) for a netvm and the clients behind it (SPEC §3 netvm links), on real
QEMU guests: the netvm's saved state is taken before its routing is turned on (that runs after
every start, boot or restore, as a session of its own), and a client — restored itself, or
booted — reaches the netvm and, through it and the host's NAT, the outside, after each restore
of the netvm; clients behind it still cannot reach each other. A netvm whose uplink is a DHCP
network asks for a new lease after every restore instead of keeping the saved run's."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from test_fast_start import saved_dirs
from test_vm_network import _internet
from vmenv import VM_DEMO, Install, qemu_install

pytestmark = pytest.mark.vm

PING = ["busybox", "ping", "-c", "1", "-W", "5"]
#: test_vm_network's stand-in for the outside world (behind the namespace's default route)
OUTSIDE = "10.99.0.1"


def _vm(name: str, extra: str) -> str:
    return VM_DEMO.replace("[vms.demo]", f"[vms.{name}]") + extra


VMS = (
    _vm("fgate", "fastStart = true\nnetwork = { isNetvm = true, netvm = 'host' }\n")
    + _vm("fclient", "fastStart = true\nnetwork = { netvm = 'fgate' }\n")
    + _vm("fclient2", "network = { netvm = 'fgate' }\n")
)


def _start(inst: Install, vm: str) -> None:
    p = inst.cmd("vmsilo", "start", vm)
    logs = [inst.run_dir / f"{name}.supervisor.log" for name in (vm, "fgate")]
    assert p.returncode == 0, p.stderr.decode() + "".join(
        log.read_text()[-2000:] for log in logs if log.exists()
    )


def _stop(inst: Install, *vms: str) -> None:
    for vm in vms:
        p = inst.cmd("vmsilo", "stop", vm)
        assert p.returncode == 0, p.stderr


def _ping(inst: Install, vm: str, address: str) -> subprocess.CompletedProcess[bytes]:
    return inst.cmd("vm-run", "--root", vm, *PING, address)


def _reaches(inst: Install, vm: str, gateway: str) -> None:
    """``vm`` reaches its netvm's end of the link, and through it the outside (NAT twice)."""
    for address in (gateway, OUTSIDE):
        p = _ping(inst, vm, address)
        assert p.returncode == 0, (vm, address, p.stdout + p.stderr)


def _routing_configured(inst: Install) -> dict[str, Any]:
    st = inst.status("fgate")
    assert st["state"] == "running" and st["detail"] is None, st  # routing set up in the guest
    rules = inst.cmd("vm-run", "--root", "fgate", "nft", "list", "table", "ip", "vmsilo_netvm")
    assert b"masquerade" in rules.stdout, rules.stdout + rules.stderr
    return st


def test_a_restored_netvm_routes_its_clients(image: Any, state_dir: Any) -> None:
    with qemu_install(state_dir, "fnet", VMS, netns=True) as inst:
        text = inst.config.read_text()
        inst.config.write_text(text.replace("[qemu]", 'netvmRange = "10.233.0.0/24"\n[qemu]', 1))
        assert inst.netns is not None
        peer = _internet(inst.netns)
        plan_out = inst.cmd("vmsilo", "plan", "--json")
        plan = json.loads(plan_out.stdout)
        [up] = plan["vms"]["fclient"]["interfaces"]
        gateway = up["routes"][0]["via"]
        [up2] = plan["vms"]["fclient2"]["interfaces"]
        client2_ip = up2["addresses"][0].split("/")[0]
        try:
            # first start: the netvm boots and saves its ready state, then turns its routing
            # on — the save comes first, so no restore starts with an earlier run's routing
            _start(inst, "fclient")
            st = _routing_configured(inst)
            assert st["restored"] is False
            assert inst.status("fclient")["restored"] is False
            log = (inst.run_dir / "fgate.supervisor.log").read_text()
            assert log.index("ready state saved") < log.index("netvm set-up"), log[-3000:]
            [gate_state] = saved_dirs(inst, "fgate")
            assert saved_dirs(inst, "fclient")
            _reaches(inst, "fclient", gateway)
            _stop(inst, "fclient", "fgate")

            # restores: the netvm and the fastStart client restored, a booted client beside
            for round, clients in enumerate((("fclient", "fclient2"), ("fclient",))):
                before = inst.launch_count()
                for vm in clients:
                    _start(inst, vm)
                # one QEMU per VM: nothing booted after a failed restore
                assert inst.launch_count() == before + 1 + len(clients)
                assert _routing_configured(inst)["restored"] is True, round
                assert inst.status("fclient")["restored"] is True, round
                _reaches(inst, "fclient", gateway)
                if "fclient2" in clients:
                    _reaches(inst, "fclient2", up2["routes"][0]["via"])
                    # clients behind one netvm still cannot reach each other
                    p = inst.cmd("vm-run", "--root", "fclient", *PING[:-2], "-W", "3", client2_ip)
                    assert p.returncode != 0, p.stdout
                _stop(inst, *clients, "fgate")
            assert saved_dirs(inst, "fgate") == [gate_state]  # restored, never re-saved

            # a restored client behind a netvm that boots (fastStart off there: the client's
            # own plan and saved state stay as they were)
            text = inst.config.read_text()
            gate_table = text.index("[vms.fgate]")
            at = text.index("fastStart = true\n", gate_table)
            inst.config.write_text(text[:at] + text[at + len("fastStart = true\n") :])
            _start(inst, "fclient")
            assert _routing_configured(inst)["restored"] is None  # (no fastStart: not said)
            assert inst.status("fclient")["restored"] is True
            _reaches(inst, "fclient", gateway)
            _stop(inst, "fclient", "fgate")
        finally:
            subprocess.run(["ip", "netns", "del", peer], check=False)


DHCP_VM = """
[vms.fdgate]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
fastStart = true
network.isNetvm = true
network.interfaces.upstream = { tap.hostAddress = "10.241.0.1/24", dhcp = true }
"""
DHCP_TAP = "fdgate-22"


def _start_with_dhcp(inst: Install, first: int) -> subprocess.Popen[bytes]:
    """Start the VM with busybox udhcpd on its tap, leasing 10.241.0.<first>..<first + 9> for
    an hour: the server starts as soon as the supervisor made the tap (long before the guest's
    DHCP client runs: the guest has not booted yet, or restores its saved client)."""
    assert inst.netns is not None
    start = subprocess.Popen(
        ["ip", "netns", "exec", inst.netns, *inst.argv("vmsilo", "start", "fdgate")],
        env=inst.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    show = ["ip", "-n", inst.netns, "link", "show", DHCP_TAP]
    while subprocess.run(show, capture_output=True).returncode != 0:
        assert start.poll() is None and time.monotonic() < deadline, start.communicate()
        time.sleep(0.02)
    conf = inst.run_dir / f"udhcpd-{first}.conf"
    conf.write_text(
        f"start 10.241.0.{first}\nend 10.241.0.{first + 9}\ninterface {DHCP_TAP}\n"
        f"lease_file {inst.run_dir}/leases-{first}\nopt subnet 255.255.255.0\n"
        "opt router 10.241.0.1\nopt lease 3600\n"
    )
    (inst.run_dir / f"leases-{first}").touch()
    server = subprocess.Popen(
        ["ip", "netns", "exec", inst.netns, "busybox", "udhcpd", "-f", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _out, err = start.communicate(timeout=180)
    assert start.returncode == 0, err
    return server


def _address_becomes(inst: Install, address: str, timeout: float = 30) -> str:
    """The guest's IPv4 addresses on its upstream once ``address`` is among them (or the last
    seen after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        p = inst.cmd("vm-run", "fdgate", "busybox", "ip", "-4", "-o", "addr", "show", "upstream")
        seen = p.stdout.decode()
        if f" {address}/" in seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def _dhcp_client(inst: Install) -> int:
    """The pid of the guest's DHCP client on its upstream."""
    p = inst.cmd("vm-run", "fdgate", "cat", "/run/udhcpc.upstream.pid")
    assert p.returncode == 0, p.stderr
    return int(p.stdout)


def test_a_restored_dhcp_uplink_asks_for_a_new_lease(image: Any, state_dir: Path) -> None:
    """A netvm on a DHCP network (its uplink a tap where busybox udhcpd serves): the state is
    saved with the boot's DHCP client in it — bound to the boot's lease, or still asking (the
    save comes after the guest's hello, the lease whenever the exchange ends: either happens
    here); the network's server then leases other addresses (the laptop moved, or the lease
    went to another machine while the state lay on disk). The restore starts that client
    anew, which gets the new network's address at once — a client restored bound would keep
    the saved lease for half an hour of guest time."""
    with qemu_install(state_dir, "fdhcp", DHCP_VM, netns=True) as inst:
        server = _start_with_dhcp(inst, 100)
        try:
            assert inst.status("fdgate")["restored"] is False
            assert " 10.241.0.100/24" in _address_becomes(inst, "10.241.0.100")
            saved_client = _dhcp_client(inst)
            _stop(inst, "fdgate")
            server.terminate()
            server.wait()
            server = _start_with_dhcp(inst, 150)  # a new network: its own pool, no old leases
            assert inst.status("fdgate")["restored"] is True
            seen = _address_becomes(inst, "10.241.0.150")
            assert " 10.241.0.150/24" in seen and seen.count("inet ") == 1, seen
            assert _dhcp_client(inst) != saved_client  # not the saved run's client
            _stop(inst, "fdgate")
        finally:
            server.terminate()
            server.wait()
