"""libc ``mount(2)`` and ``umount2(2)`` through ctypes (Python has no binding for either).

Used by the guest init (API filesystems, virtiofs shares, unmounting at power-off) and by the
host's read-only view for virtiofsd. Errors become :class:`OSError` with the errno and what
was being mounted.
"""

from __future__ import annotations

import ctypes
import functools
import os

# mount(2) flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
# umount2(2) flags
MNT_DETACH = 2


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, with ``errno`` kept for :func:`check`."""
    return ctypes.CDLL(None, use_errno=True)


def check(rc: int, what: str) -> None:
    """Raise :class:`OSError` (errno, ``what: strerror``) when a libc call returned non-zero."""
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _c(text: str | None) -> bytes | None:
    return text.encode() if text else None


def sys_mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """``mount(source, target, fstype, flags, data)``; None (or "") passes NULL."""
    rc = libc().mount(_c(source), target.encode(), _c(fstype), ctypes.c_ulong(flags), _c(data))
    kind = f" type {fstype}" if fstype else ""
    check(rc, f"mount {source or 'none'} on {target}{kind} (flags {flags:#x})")


def sys_umount(target: str, flags: int = 0) -> None:
    """``umount2(target, flags)``."""
    check(libc().umount2(target.encode(), flags), f"umount {target}")
