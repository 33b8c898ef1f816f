"""netvm links: one /31 per client out of ``netvmRange`` (SPEC §3 "netvm links").

Pinned subnets are reserved first; every other client, in name order, takes the lowest free
/31. Allocation walks the range once with a cursor, so planning 2000 VMs stays linear.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from vmsilo.config.problems import Problem, join_path
from vmsilo.plan.derive import bridge_name, sort_key
from vmsilo.plan.model import NetvmLink


def allocate_links(
    netvms: Mapping[str, str],
    pinned: Mapping[str, str],
    ids: Mapping[str, int],
    netvm_range: str,
    problems: list[Problem],
) -> list[NetvmLink]:
    """``netvms``: client → netvm name or ``host``; ``pinned``: client → its pinned /31."""
    rng = ipaddress.IPv4Network(netvm_range)
    taken = {int(ipaddress.IPv4Network(s).network_address) for s in pinned.values()}
    first = int(rng.network_address)
    first += first % 2
    last = int(rng.broadcast_address)
    cursor = first
    links = []
    for client in sorted(netvms, key=sort_key):
        netvm = netvms[client]
        if client in pinned:
            base = int(ipaddress.IPv4Network(pinned[client]).network_address)
            is_pinned = True
        else:
            while cursor in taken:
                cursor += 2
            if cursor + 1 > last:
                problems.append(
                    Problem(
                        join_path("vms", client, "network", "netvm"),
                        f"netvmRange {netvm_range} has no free /31 left for this link",
                        "widen netvmRange",
                    )
                )
                continue
            base = cursor
            cursor += 2
            is_pinned = False
        gateway = ipaddress.IPv4Address(base)
        links.append(
            NetvmLink(
                client=client,
                netvm=netvm,
                subnet=f"{gateway}/31",
                gateway=str(gateway),
                client_address=str(gateway + 1),
                bridge=None if netvm == "host" else bridge_name(ids[client]),
                pinned=is_pinned,
            )
        )
    return links
