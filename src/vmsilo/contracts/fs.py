"""One atomic file write: readers see the old content or the new one, never a torn file.

The content goes to a fresh temporary file (created exclusively, 0600 until it gets its mode)
in the target's own directory, so that the final ``os.replace`` is a rename within one
filesystem, which POSIX makes atomic; optionally it reaches the disk (``fsync``) first. A
failure removes the temporary file and leaves the target as it was. (Not :mod:`tempfile`:
the guest's PID 1 uses this too, and every import there delays the boot.)
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

#: Distinguishes the temporary files of several writes from one process (threads).
_counter = itertools.count()


def atomic_write(
    path: str | os.PathLike[str],
    data: str | bytes,
    mode: int = 0o644,
    *,
    fsync: bool = False,
    group: int | None = None,
) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) and permissions ``mode`` (and the
    group ``group``, set before the file is readable by it)."""
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{next(_counter)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:  # a leftover of a crashed writer with our pid
            continue
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if group is not None:
                os.fchown(fd, -1, group)
            os.fchmod(fd, mode)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
