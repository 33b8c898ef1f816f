"""What may arrive by ``vm-copy`` (SPEC §9.4), one set of rules for both guest ends.

The source side (:mod:`vmsilo.guest.copy_pack`) checks them before it sends anything, so a
user gets a clear refusal up front; the destination (:mod:`vmsilo.guest.copy_unpack`) checks
them again on every member, because the stream comes from another VM and may be hostile.

Names in the stream are relative, ``/``-separated, the first component being the copied item
(``<basename>`` of a PATH). A symlink is kept only if its target is relative and, resolved
from the link's own directory, stays inside its item: leading ``..`` components (at most up to
the item's top directory) followed by components that are never ``..``. That rule holds even
when the target passes through other symlinks of the copy: each of them stays inside by the
same rule, and the kernel resolves a link relative to the real directory that holds it.

Standard library only: this module runs in the guest.
"""

from __future__ import annotations

#: The exit status of a refusal (exists, bad path, limit): vm-copy's 1.
EXIT_REFUSED = 1
#: The first line the packer writes on its standard error: the totals (for the progress bar).
TOTAL_PREFIX = "vmsilo-copy-total "
#: Where items arrive, under the destination user's home.
INCOMING = "Incoming"
#: A pax / GNU long-name header bigger than this is refused (tarfile reads one into memory).
MAX_META = 1 << 20


class Refused(Exception):
    """The copy is refused; the message names the file (exit :data:`EXIT_REFUSED`)."""


def split_name(name: str) -> list[str]:
    """The components of a stream member's name; :class:`Refused` for an absolute path, ``..``,
    ``.``, empty components or a NUL."""
    if not name or name.startswith("/") or "\0" in name:
        raise Refused(f"{name!r}: not a relative path")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise Refused(f"{name!r}: path with an empty, '.' or '..' component")
    return parts


def link_stays_inside(parent: list[str], target: str) -> bool:
    """Whether a symlink in directory ``parent`` (components from the copy's root, the first
    being its item) pointing at ``target`` stays inside that item (see the module text)."""
    if not parent or not target or target.startswith("/") or "\0" in target:
        return False
    parts = target.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        return False
    return ups <= len(parent) - 1


def item_name(path: str) -> str:
    """The name a PATH arrives under (its last component); :class:`Refused` if it has none."""
    import os.path

    base = os.path.basename(os.path.normpath(path))
    if base in ("", ".", "..", "/"):
        raise Refused(f"{path}: has no name to arrive under")
    return base
