"""vm-copy's source side, run as the VM user in SRC (SPEC §9.4)::

    python3 -m vmsilo.guest.copy_pack --max-bytes N --max-files N PATH...

Writes the PATHs (relative to the user's home, or absolute) as one POSIX (pax) tar stream on
standard output, each under its last component, for :mod:`vmsilo.guest.copy_unpack` in DST; the
host relays the bytes without reading them. Everything is checked before the first byte is
sent (:mod:`vmsilo.guest.copy_rules`: only regular files, directories and symlinks that stay
inside their item; the limits), so a refusal costs nothing and leaves nothing half-copied; a
PATH that is itself a symlink is followed (the user named it), links inside it are kept as
links. setuid/setgid/sticky bits are dropped, hard links are sent as separate files, owners
are not sent.

Its first line on standard error is ``vmsilo-copy-total BYTES ENTRIES`` (the host's progress
bar); a refusal is one line naming the file, exit 1.

Standard library only: this module runs in the guest.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from vmsilo.guest.copy_rules import (
    EXIT_REFUSED,
    TOTAL_PREFIX,
    Refused,
    item_name,
    link_stays_inside,
)

#: Read and write size: the channel's frames are 64 KiB, fewer Python calls per byte help TCG.
BUFSIZE = 1 << 20


@dataclass(frozen=True)
class Entry:
    name: str  # in the stream: "<item>/a/b"
    path: str  # in this VM
    kind: str  # "dir", "file" or "link"
    mode: int
    mtime: int
    size: int = 0
    target: str = ""


def collect(paths: list[str], home: str) -> list[Entry]:
    """Every entry to send, parents before their contents; :class:`Refused` on the first
    thing that may not be copied."""
    entries: list[Entry] = []
    seen: set[str] = set()
    for path in paths:
        full = path if os.path.isabs(path) else os.path.join(home, path)
        item = item_name(full)
        if item in seen:
            raise Refused(f"{path}: a second PATH named {item!r}")
        seen.add(item)
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise Refused(f"{path}: no such file or directory") from None
        entries.extend(_walk(full, [item], st))
    return entries


def _walk(path: str, parts: list[str], st: os.stat_result) -> Iterator[Entry]:
    name = "/".join(parts)
    mode = stat.S_IMODE(st.st_mode) & 0o777
    mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        yield Entry(name, path, "file", mode, mtime, size=st.st_size)
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        if not link_stays_inside(parts[:-1], target):
            raise Refused(f"{path}: symlink to {target!r} leads outside the copy")
        yield Entry(name, path, "link", 0o777, mtime, target=target)
    elif stat.S_ISDIR(st.st_mode):
        yield Entry(name, path, "dir", mode, mtime)
        with os.scandir(path) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            yield from _walk(child.path, [*parts, child.name], child.stat(follow_symlinks=False))
    else:
        raise Refused(f"{path}: not a regular file, directory or symlink")


def write(entries: list[Entry], out: BinaryIO) -> None:
    """The tar stream of ``entries`` on ``out``."""
    with tarfile.open(
        fileobj=out,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
        bufsize=BUFSIZE,
    ) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            info.mtime = e.mtime
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif e.kind == "link":
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                tf.addfile(info)
            else:
                info.size = e.size
                with open(e.path, "rb", buffering=0) as f:
                    tf.addfile(info, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="copy_pack")
    p.add_argument("--max-bytes", type=int, required=True)
    p.add_argument("--max-files", type=int, required=True)
    p.add_argument("paths", nargs="+")
    args = p.parse_args(argv)
    home = os.path.expanduser("~")
    try:
        entries = collect(args.paths, home)
        total = sum(e.size for e in entries)
        if len(entries) > args.max_files:
            raise Refused(f"{len(entries)} files and directories: over copy.maxFiles")
        if total > args.max_bytes:
            raise Refused(f"{total} bytes: over copy.maxBytes ({args.max_bytes})")
        print(f"{TOTAL_PREFIX}{total} {len(entries)}", file=sys.stderr, flush=True)
        write(entries, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    except Refused as e:
        print(e, file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:
        return EXIT_REFUSED  # the destination refused and went away: it said why
    except OSError as e:
        print(f"{e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
