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

import os
import re
import shutil
import subprocess
import sys

IMAGE_MARKER = "/usr/lib/vmsilo/image"
MODULES = ("nf_tables", "nft_chain_nat", "nft_ct", "nft_masq", "nf_conntrack", "nf_nat")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")


def ruleset(upstream: str | None, clients: list[str]) -> str:
    """The netvm's table, replacing any earlier one in the same transaction (``add`` +
    ``delete`` make that work whether or not it exists): never a moment without it."""
    quoted = ", ".join(f'"{c}"' for c in clients)
    lines = [
        "add table ip vmsilo_netvm",
        "delete table ip vmsilo_netvm",
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


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """``[--upstream IF] [--client IF]...`` (the supervisor's own argv; no argparse: its
    import is a good part of this program's start in a just restored guest under TCG, where
    the netvm's start waits for it). Raises ValueError."""
    upstream: str | None = None
    clients: list[str] = []
    if len(argv) % 2:
        raise ValueError(f"unexpected arguments {argv!r}")
    for flag, name in zip(argv[::2], argv[1::2], strict=True):
        if not NAME.match(name):
            raise ValueError(f"bad interface name {name!r}")
        if flag == "--upstream":
            upstream = name
        elif flag == "--client":
            clients.append(name)
        else:
            raise ValueError(f"unknown option {flag!r}")
    return upstream, clients


def main(argv: list[str] | None = None) -> int:
    try:
        upstream, clients = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"netvm: {e}", file=sys.stderr)
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
    done = subprocess.run([nft, "-f", "-"], input=ruleset(upstream, clients).encode())
    if done.returncode != 0:
        return 1
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")
    print(f"netvm: forwarding {', '.join(clients) or 'no clients'} -> {upstream}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
