"""Whether another account could take over a directory vmsilo keeps root-only state in.

``runtimeDir`` holds each VM's lock, sockets and state; ``stateDir`` its disks and logs. If
another user can create, replace or write into either (or into a parent on the way), they can
pre-create a VM's lock and keep it from starting, or swap a socket (SPEC §11.5). A path is safe
when every directory on it belongs to root and no one else can write to it — except a sticky
directory such as ``/tmp``, where others cannot touch root's entries, as long as the entry on
our path already exists and is root's (else anyone could create it first).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def unsafe_dir(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not safe for root-only state (None: it is)."""
    target = Path(os.path.abspath(path))
    chain = [*reversed(target.parents), target]
    for n, d in enumerate(chain):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return None  # the parent was checked: nobody else can create this one
        except PermissionError:
            return None  # the parent (checked: root's, closed to others) hides it from us too
        except OSError as e:
            return f"cannot inspect {d}: {e.strerror}"
        if st.st_uid != 0:
            return f"{d} belongs to uid {st.st_uid}, not root"
        if not st.st_mode & _OTHERS_WRITE:
            continue
        last = n == len(chain) - 1
        if last or not st.st_mode & stat.S_ISVTX:
            return f"{d} is writable by other users"
        nxt = chain[n + 1]
        if not nxt.exists():
            return f"{d} is writable by every user: another account could create {nxt} first"
    return None
