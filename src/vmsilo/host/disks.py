"""The disposable overlay disk: a fresh sparse raw file for every boot, deleted after it.

Raw and sparse (not qcow2): the original switched to raw because crosvm's unaligned qcow2
header reads fail with O_DIRECT; a sparse file costs only the blocks the guest writes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    return int(text[:-1]) * SIZE_UNITS[text[-1]]


def create_ephemeral_disk(path: str, size: str) -> None:
    """Replace whatever is at ``path`` with an empty sparse file of ``size`` (e.g. ``10G``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, parse_size(size))
    finally:
        os.close(fd)
    os.replace(tmp, target)


def remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


#: Copy granule of :func:`sparse_copy`.
_CHUNK = 1 << 20


def sparse_copy(src: str, dst: str, *, skip_zeros: bool = False) -> int:
    """Copy ``src`` to a new file ``dst`` (0600, replaced atomically), holes staying holes;
    the bytes written.

    Only the data extents are read (``SEEK_DATA``/``SEEK_HOLE``) and copied with
    ``copy_file_range`` (a reflink where the file system can). ``skip_zeros``: also leave out
    blocks that are all zero (mkfs writes a zeroed journal: a saved disk need not keep it)."""
    target = Path(dst)
    tmp = target.with_name(target.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    written = 0
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for start, end in _data_extents(fin.fileno(), size):
                written += _copy_range(fin, out, start, end, skip_zeros)
            os.ftruncate(out, size)
        finally:
            os.close(out)
    os.replace(tmp, target)
    return written


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        pos = end
    return extents


def _copy_range(fin: object, out: int, start: int, end: int, skip_zeros: bool) -> int:
    assert hasattr(fin, "fileno")
    src = fin.fileno()
    written = 0
    pos = start
    if not skip_zeros:
        while pos < end:
            n = os.copy_file_range(src, out, end - pos, pos, pos)
            if n <= 0:
                break
            pos += n
            written += n
        return written
    zero = bytes(_CHUNK)
    while pos < end:
        chunk = os.pread(src, min(_CHUNK, end - pos), pos)
        if not chunk:
            break
        if chunk != zero[: len(chunk)]:
            os.pwrite(out, chunk, pos)
            written += len(chunk)
        pos += len(chunk)
    return written
