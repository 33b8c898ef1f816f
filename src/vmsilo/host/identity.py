"""Which host identities a VM holds while it runs, and which two VMs would share (SPEC §11.6).

A VM's id is its sorted position in the config, and the vsock CID, the link bridge
``vmsilo-br<id>``, long tap names and the nft tables ``vmsilo_<id>`` follow from it; the link
/31s follow from the clients' order. So a config edit (a VM added, removed or renamed) can give
a VM that is about to start the identities of one that still runs from the old config — and
starting it would then take over that VM's CID, join its bridge and delete its anti-spoofing
table. The plan stays a pure function of the config; instead a supervisor compares the VM it
starts with every running VM's plan snapshot (what that VM really holds) and refuses on any
overlap, and cleanup leaves alone whatever another running VM holds.

Pure: this works on a VM's plan in its JSON form (:func:`vmsilo.plan.serialize.vm_to_json`, the
form the snapshot stores), so a running VM that the config no longer has, or names differently,
counts with the identities it was started with.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vmsilo.host.input_filter import input_table_name
from vmsilo.host.nat import nat_table_name


@dataclass(frozen=True)
class Claim:
    """One identity a VM holds: equal ``kind`` and ``value`` on two VMs is the same thing."""

    kind: str  # the namespace two values collide in: "vsock CID", "interface", "path", …
    value: str
    label: str  # how a message names it: "tap client-22", "bridge vmsilo-br3", …
    #: ``(netvm, client)`` for what both ends of one netvm link hold by design (its bridge, its
    #: /31): shared by exactly that pair, it is no conflict
    link: tuple[str, str] | None = None
    #: False for a read-only disk: readers may share it; a writer may not join them
    exclusive: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.value


def _link_pair(name: str, vm: Mapping[str, Any], peer: str) -> tuple[str, str]:
    """``(netvm, client)`` of the link on an interface injected for ``peer``."""
    return (peer, name) if peer == vm.get("netvm") else (name, peer)


def claims_of(name: str, vm: Mapping[str, Any]) -> list[Claim]:
    """Every identity VM ``name`` (its plan as JSON) holds on the host while it runs."""
    vm_id = int(vm["id"])
    out = [Claim("vsock CID", str(vm_id), f"id and vsock CID {vm_id}")]
    links = [i for i in vm.get("interfaces", []) if i.get("injectedFor") is not None]
    if any(i["injectedFor"] == "host" for i in links):
        table = nat_table_name(vm_id)
        out.append(Claim("nft table", table, f"nft table {table}"))
    if links:
        table = input_table_name(vm_id)
        out.append(Claim("nft table", table, f"nft table {table}"))
    for iface in vm.get("interfaces", []):
        out.append(Claim("interface", iface["tap"], f"tap {iface['tap']}"))
        peer = iface.get("injectedFor")
        if peer is None:
            continue  # the user's own bridges and host addresses: shared as the user wrote them
        pair = _link_pair(name, vm, str(peer))
        if iface.get("bridge"):
            out.append(Claim("interface", iface["bridge"], f"bridge {iface['bridge']}", pair))
        for cidr in [*iface.get("addresses", []), *filter(None, [iface.get("hostAddress")])]:
            addr = ipaddress.ip_interface(cidr)
            net = str(addr.network)
            out.append(Claim("link subnet", net, f"netvm link {net}", pair))
            out.append(Claim("address", str(addr.ip), f"address {addr.ip}"))
    for disk in vm.get("disks", []):
        ro = bool(disk.get("readOnly"))
        what = "read-only disk" if ro else "writable disk"
        out.append(Claim("disk", disk["path"], f"{what} {disk['path']}", exclusive=not ro))
    paths = [*vm.get("paths", {}).values(), *(s["socket"] for s in vm.get("shares", []))]
    out += [Claim("path", p, f"runtime path {p}") for p in paths]
    return out


def _overlap(a: Claim, b: Claim) -> bool:
    return a.key == b.key and (a.exclusive or b.exclusive)


def shared(mine: Iterable[Claim], theirs: Iterable[Claim]) -> list[Claim]:
    """Those of ``mine`` that ``theirs`` holds too — also the link both ends hold by design
    (what cleanup must leave to the other VM)."""
    theirs = list(theirs)
    return _unique(a for a in mine if any(_overlap(a, b) for b in theirs))


def conflicts(mine: Iterable[Claim], theirs: Iterable[Claim]) -> list[Claim]:
    """Those of ``mine`` that ``theirs`` holds too, except a link both hold as its two ends
    (what makes a start unsafe)."""
    theirs = list(theirs)
    return _unique(
        a
        for a in mine
        if any(_overlap(a, b) and (a.link is None or a.link != b.link) for b in theirs)
    )


def _unique(claims: Iterable[Claim]) -> list[Claim]:
    seen: dict[tuple[str, str], Claim] = {}
    for c in claims:
        seen.setdefault(c.key, c)
    return list(seen.values())


def describe(claims: Iterable[Claim]) -> str:
    """``tap a1-22, bridge vmsilo-br3`` (each named once)."""
    return ", ".join(c.label for c in _unique(claims))
