"""NAT on the host for VMs whose ``network.netvm`` is ``host`` (SPEC §3 "netvm links").

The host is then the client's gateway: it forwards the client's traffic out of whatever route
the host uses and masquerades it, drops traffic the client sends from any other source address
(anti-spoofing) and traffic to other VMs' links (no client-to-client path through the host).
Each VM gets its own nftables table ``vmsilo_<id>``, created at start and deleted at cleanup,
so rules never outlive the VM or collide with another VM's. The ruleset text is generated
from plan values that the config already restricted to plain names and addresses.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from vmsilo.errors import VmsiloError
from vmsilo.plan.model import NetvmLink, Plan, VmPlan
from vmsilo.runcmd import run

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def nat_table_name(vm_id: int) -> str:
    return f"vmsilo_{vm_id}"


def table_name(vm: VmPlan) -> str:
    return nat_table_name(vm.id)


def host_link(plan: Plan, vm: VmPlan) -> NetvmLink | None:
    return next((lk for lk in plan.links if lk.client == vm.name and lk.netvm == "host"), None)


def ruleset(plan: Plan, vm: VmPlan, link: NetvmLink) -> str:
    tap = next(i.tap for i in vm.interfaces if i.injected_for == "host")
    table = table_name(vm)
    return f"""table ip {table} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{tap}" ip saddr != {link.client_address} drop
    iifname "{tap}" ip daddr {plan.netvm_range} drop
    oifname "{tap}" ip daddr != {link.client_address} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {link.client_address} oifname != "{tap}" masquerade
  }}
}}
"""


def nft_binary() -> str:
    """The host's ``nft``; VMs with netvm links cannot start without it."""
    found = shutil.which("nft")
    if found is None:
        raise VmsiloError(
            "nft not found: VMs with netvm links need nftables on the host"
            " (NAT for network.netvm = 'host', the input filter on every link)",
            "apt-get install nftables",
        )
    return found


def setup_host_nat(plan: Plan, vm: VmPlan) -> None:
    link = host_link(plan, vm)
    if link is None:
        return
    nft = nft_binary()
    teardown_host_nat(vm)
    run([nft, "-f", "-"], input=ruleset(plan, vm, link).encode(), hint="check `nft list ruleset`")
    IP_FORWARD.write_text("1\n")


def teardown_host_nat(vm: VmPlan) -> None:
    nft = shutil.which("nft")
    if nft is None or not any(i.injected_for == "host" for i in vm.interfaces):
        return
    with contextlib.suppress(VmsiloError):
        run([nft, "delete", "table", "ip", table_name(vm)])
