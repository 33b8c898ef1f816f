"""Routing inside a netvm (SPEC §3): forward its clients out of its upstream, and only there.

The host's supervisor runs this in the guest as root once the netvm is ready, naming the
upstream interface and the client links (it knows them from the plan; the kernel command line
does not say which VM is a netvm). It turns on IPv4 forwarding, masquerades client traffic out
of the upstream, lets replies back in, and drops everything else between interfaces — so one
client can never reach another through the netvm. The rules need ``nft`` in the netvm's image
(``packages = ["nftables"]``); without it this fails with that hint rather than leaving a netvm
that forwards unfiltered.

Standard library only (runs in the guest).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

IMAGE_MARKER = "/usr/lib/vmsilo/image"
MODULES = ("nf_tables", "nft_chain_nat", "nft_ct", "nft_masq", "nf_conntrack", "nf_nat")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")


def ruleset(upstream: str | None, clients: list[str]) -> str:
    quoted = ", ".join(f'"{c}"' for c in clients)
    lines = [
        "table ip vmsilo_netvm {",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
    ]
    if upstream is not None and clients:
        lines.append(f'    iifname {{ {quoted} }} oifname "{upstream}" accept')
    lines += ["  }"]
    if upstream is not None:
        lines += [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "{upstream}" masquerade',
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmsilo.guest.netvm")
    p.add_argument("--upstream")
    p.add_argument("--client", action="append", default=[])
    args = p.parse_args(argv)
    for name in [args.upstream, *args.client]:
        if name is not None and not NAME.match(name):
            print(f"netvm: bad interface name {name!r}", file=sys.stderr)
            return 2
    if not os.path.exists(IMAGE_MARKER):
        # this reconfigures a whole network stack: refuse anywhere but in a vmsilo guest
        print(
            f"netvm: not a vmsilo guest ({IMAGE_MARKER} missing); nothing changed", file=sys.stderr
        )
        return 3
    nft = shutil.which("nft")
    if nft is None:
        print(
            'netvm: nft not found in this image; add packages = ["nftables"] to the netvm\'s image',
            file=sys.stderr,
        )
        return 1
    # netfilter ships as modules loaded on demand (the guest has no udev/kmod autoloading)
    subprocess.run(["busybox", "modprobe", "-a", *MODULES], capture_output=True)
    subprocess.run([nft, "delete", "table", "ip", "vmsilo_netvm"], capture_output=True)
    done = subprocess.run([nft, "-f", "-"], input=ruleset(args.upstream, args.client).encode())
    if done.returncode != 0:
        return 1
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")
    print(f"netvm: forwarding {', '.join(args.client) or 'no clients'} -> {args.upstream}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
