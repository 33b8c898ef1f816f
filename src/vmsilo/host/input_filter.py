"""The host's input path from VM links, closed (SPEC §11.3).

A guest may send anything down its link: packets to the gateway address the host holds on a
``netvm = "host"`` tap, to any other address of the host (Linux answers for all its addresses on
every interface), to the IPv6 link-local address the kernel puts on every tap and on the
``vmsilo-br<id>`` bridges. Without a filter every service the host listens on is the VM's to
try. So each VM with netvm links gets its own nftables table ``vmsilo_input_<id>`` (family
``inet``: IPv4 and IPv6 alike), created before its taps and deleted at cleanup like the NAT
table, whose input chain drops whatever arrives on the VM's link taps and link bridges except

* replies to connections the host opened (``ct state established,related``), and
* ICMP echo requests (a ping of the gateway, answered by the kernel: no service behind it).

vmsilo serves nothing on a link (no DHCP, no DNS: addresses are static and guests use the
resolvers they are given), so nothing else is let through. Only the input path is filtered:
forwarding (NAT out, no client-to-client) is :mod:`vmsilo.host.nat`'s and the netvm's. An
interface the user configured with an explicit ``tap.hostAddress`` is the user's own link and is
left alone. Both ends of a netvm-VM link list the link's bridge, so it stays covered while
either runs; an accept here never widens another firewall (every base chain must accept).
"""

from __future__ import annotations

import contextlib
import shutil

from vmsilo.errors import VmsiloError
from vmsilo.host.nat import nft_binary
from vmsilo.plan.model import VmPlan
from vmsilo.runcmd import run


def input_table_name(vm_id: int) -> str:
    return f"vmsilo_input_{vm_id}"


def link_interfaces(vm: VmPlan) -> list[str]:
    """The host interfaces of ``vm``'s netvm links: their taps and link bridges (sorted)."""
    names = set()
    for i in vm.interfaces:
        if i.injected_for is None:
            continue
        names.add(i.tap)
        if i.bridge is not None:
            names.add(i.bridge)
    return sorted(names)


def ruleset(vm: VmPlan) -> str:
    """Replace the VM's table in one transaction (``add`` + ``delete`` make it idempotent)."""
    table = input_table_name(vm.id)
    ifaces = ", ".join(f'"{name}"' for name in link_interfaces(vm))
    return f"""add table inet {table}
delete table inet {table}
table inet {table} {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {{ {ifaces} }} ct state established,related accept
    iifname {{ {ifaces} }} icmp type echo-request accept
    iifname {{ {ifaces} }} drop
  }}
}}
"""


def setup_input_filter(vm: VmPlan) -> None:
    """Close the host's input from ``vm``'s links (before its taps exist)."""
    if not link_interfaces(vm):
        return
    run([nft_binary(), "-f", "-"], input=ruleset(vm).encode(), hint="check `nft list ruleset`")


def teardown_input_filter(vm: VmPlan) -> None:
    nft = shutil.which("nft")
    if nft is None or not link_interfaces(vm):
        return
    with contextlib.suppress(VmsiloError):
        run([nft, "delete", "table", "inet", input_table_name(vm.id)])
