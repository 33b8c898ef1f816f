"""A tiny, deterministic newc cpio writer for the stage-1 initramfs (host side)."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path
from typing import IO, cast


def _header(ino: int, mode: int, nlink: int, size: int, name: bytes, rdev: int = 0) -> bytes:
    fields = (
        ino,
        mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime (reproducible)
        size,
        0,  # devmajor
        0,  # devminor
        os.major(rdev),
        os.minor(rdev),
        len(name) + 1,
        0,  # check
    )
    return b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\x00"


def _pad(out: IO[bytes], n: int) -> None:
    if n % 4:
        out.write(b"\x00" * (4 - n % 4))


def write_newc(
    tree: Path, out: IO[bytes], devices: tuple[tuple[str, int, int, int], ...] = ()
) -> None:
    """Write every entry under ``tree`` (sorted, owned by root, mtime 0) as a newc archive.

    ``devices`` adds device nodes ``(path, mode, major, minor)`` after the tree (so their
    directories exist) without needing mknod.
    """
    entries: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        base = Path(dirpath)
        for n in sorted(dirnames + filenames):
            entries.append(base / n)
    ino = 1
    for path in entries:
        rel = path.relative_to(tree).as_posix().encode()
        st = path.lstat()
        mode = st.st_mode
        data = b""
        if stat.S_ISLNK(mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(mode):
            data = path.read_bytes()
        hdr = _header(ino, mode, 2 if stat.S_ISDIR(mode) else 1, len(data), rel, st.st_rdev)
        out.write(hdr)
        _pad(out, len(hdr))
        out.write(data)
        _pad(out, len(data))
        ino += 1
    for name, mode, major, minor in devices:
        hdr = _header(ino, mode, 1, 0, name.encode(), os.makedev(major, minor))
        out.write(hdr)
        _pad(out, len(hdr))
        ino += 1
    trailer = _header(0, 0, 1, 0, b"TRAILER!!!")
    out.write(trailer)
    _pad(out, len(trailer))


def write_initramfs(
    tree: Path,
    dest: Path,
    *,
    devices: tuple[tuple[str, int, int, int], ...] = (),
    level: int = 6,
) -> None:
    """``tree`` (plus ``devices``) as a gzip-compressed newc cpio at ``dest``."""
    with (
        open(dest, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0) as gz,
    ):
        write_newc(tree, cast(IO[bytes], gz), devices)
