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
