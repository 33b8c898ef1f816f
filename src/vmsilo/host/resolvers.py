"""The host's DNS resolvers, for VMs whose netvm is the host and that name none of their own.

Such a VM reaches the world through the host's NAT, so the resolvers the host uses work for it
too — unless they are loopback addresses (a local stub such as systemd-resolved's 127.0.0.53,
or dnsmasq on 127.0.0.1), which the VM cannot reach, or addresses of the host itself (a local
dnsmasq on the LAN address: the host's input path is closed to VM links, SPEC §11.3). Then
systemd-resolved's list of its upstream servers is used where it exists; with nothing
reachable the VM gets no resolver, and ``vmsilo doctor`` says so (set ``network.nameservers``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path

#: Where to look, in order: the resolver configuration, then resolved's upstream servers.
RESOLV_CONF = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))
#: glibc reads at most three ``nameserver`` lines.
MAX_NAMESERVERS = 3


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is an address of this host (only a local address can be bound)."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((str(ip), 0))
        return True
    return False


def _reachable(text: str) -> list[str]:
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            ip = ipaddress.ip_address(words[1])
        except ValueError:
            continue  # e.g. a link-local address with a %scope: not routable from a VM
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            continue
        if _is_local(ip):
            continue
        if str(ip) not in found:
            found.append(str(ip))
    return found


def host_nameservers(files: Sequence[Path] = RESOLV_CONF) -> tuple[str, ...]:
    """Resolvers of this host a NATed VM can reach (empty: none)."""
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found = _reachable(text)
        if found:
            return tuple(found[:MAX_NAMESERVERS])
    return ()
