"""The small exact algorithms of SPEC §3, each a pure function with a golden test."""

from __future__ import annotations

import hashlib

IF_INDEX_BASE = 22  # first PCI slot for NICs; slots 22..31 → at most 10 interfaces
MAX_INTERFACES = 10
LINUX_IFNAMSIZ = 15


def vm_ids(names: list[str]) -> dict[str, int]:
    """VMs sorted by name (byte order); id = 3 + position (also the vsock CID)."""
    return {name: 3 + i for i, name in enumerate(sorted(names, key=str.encode))}


def generated_mac(vm: str, ifname: str) -> str:
    """``52`` + the first five SHA-1 bytes of ``"<vm>-<ifname>"``."""
    digest = hashlib.sha1(f"{vm}-{ifname}".encode()).digest()
    return ":".join(["52", *(f"{b:02x}" for b in digest[:5])])


def pci_address(if_index: int) -> str:
    return f"00:{if_index:02x}.0"


def cut_name(name: str, suffix: str, limit: int = LINUX_IFNAMSIZ) -> str:
    """``name`` if it fits, else ``name`` cut so that ``<cut><suffix>`` is exactly ``limit``."""
    return name[: limit - len(suffix)] + suffix


def tap_name(vm: str, vm_id: int, if_index: int) -> str:
    plain = f"{vm}-{if_index}"
    if len(plain) <= LINUX_IFNAMSIZ:
        return plain
    return cut_name(vm, f"{vm_id}-{if_index}")


def netvm_side_ifname(client: str, client_id: int) -> str:
    """The name of a client's link inside its netvm: the client's name, cut with its id."""
    if len(client) <= LINUX_IFNAMSIZ:
        return client
    return cut_name(client, str(client_id))


def bridge_name(client_id: int) -> str:
    return f"vmsilo-br{client_id}"


def sort_key(text: str) -> bytes:
    """Byte-order sort key, as SPEC §3 specifies for every ordering."""
    return text.encode()
