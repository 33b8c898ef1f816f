"""vm-copy's destination side, run as the VM user in DST (SPEC §9.4)::

    python3 -m vmsilo.guest.copy_unpack --src SRC --max-bytes N --max-files N

Reads the tar stream of :mod:`vmsilo.guest.copy_pack` on standard input and creates its items
under ``~/Incoming/<SRC>/``. The stream comes from another VM and is treated as **hostile**:

- only regular files, directories and symlinks whose target stays inside their item
  (:func:`vmsilo.guest.copy_rules.link_stays_inside`); no device, fifo, hard link; names must
  be relative without ``.``/``..``/empty components; permission bits only (no setuid, setgid,
  sticky); owners are ignored (everything belongs to the user running this);
- nothing existing is ever replaced: every name is created with ``O_EXCL`` / ``mkdir`` /
  ``symlink`` relative to a directory fd; a name that exists ends the copy (exit 1, naming it);
- every path is walked from the ``~/Incoming/<SRC>`` fd one component at a time with
  ``O_NOFOLLOW | O_DIRECTORY``, and only through directories this copy created, so a symlink
  created earlier in the stream can never redirect a later member;
- ``copy.maxFiles`` (members) and ``copy.maxBytes`` (file data, by the declared sizes, before
  any of it is written) are enforced here, whatever the source claimed; pax / GNU long-name
  headers are bounded (tarfile reads them into memory).

A refusal is one line on standard error naming the file, exit 1; the file being written when
the stream broke is removed. An empty stream (the source refused before sending) creates
nothing and exits 0: the source's status tells vm-copy what happened.

Standard library only: this module runs in the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tarfile
from typing import Any, BinaryIO

from vmsilo.guest.copy_rules import (
    EXIT_REFUSED,
    INCOMING,
    MAX_META,
    Refused,
    link_stays_inside,
    split_name,
)

BUFSIZE = 1 << 20
#: How many NUL bytes may follow the end of the archive (tar pads to its record size).
MAX_TRAILING = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedInfo(tarfile.TarInfo):
    """A TarInfo that refuses a metadata header tarfile would read whole into memory."""

    def _proc_member(self, tarfile_: Any) -> Any:
        if self.type in _META_TYPES and not 0 <= self.size <= MAX_META:
            raise tarfile.HeaderError(f"metadata header of {self.size} bytes")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class Unpacker:
    """Creates the members of one stream under the directory ``root_fd`` (see module text)."""

    def __init__(self, root_fd: int, shown_root: str, max_bytes: int, max_files: int) -> None:
        self.root_fd = root_fd
        self.shown_root = shown_root
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.files = 0
        self.bytes = 0
        self.created_dirs: set[tuple[str, ...]] = set()
        self._parent: tuple[tuple[str, ...], int] | None = None

    def shown(self, name: str) -> str:
        return f"{self.shown_root}/{name}"

    def run(self, stream: BinaryIO) -> None:
        try:
            with tarfile.open(
                fileobj=stream,
                mode="r|",
                tarinfo=_BoundedInfo,
                encoding="utf-8",
                errors="surrogateescape",
                bufsize=BUFSIZE,
            ) as tf:
                while True:
                    member = tf.next()
                    if member is None:
                        break
                    # a million members must not pile up in memory
                    tf.members.clear()  # type: ignore[attr-defined]
                    self.member(tf, member)
                _check_end(tf.fileobj)
        except (tarfile.TarError, EOFError, ValueError, UnicodeError) as e:
            raise Refused(f"malformed stream from the source VM: {e}") from None
        finally:
            self._close_parent()

    def member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = m.name.rstrip("/") if m.isdir() else m.name
        try:
            parts = split_name(name)
        except Refused as e:
            raise Refused(f"{self.shown_root}: {e}") from None
        shown = self.shown(name)
        self.files += 1
        if self.files > self.max_files:
            raise Refused(f"{shown}: more than copy.maxFiles ({self.max_files}) files")
        if m.isreg():
            if m.size < 0:
                raise Refused(f"{shown}: bad size")
            self.bytes += m.size
            if self.bytes > self.max_bytes:
                raise Refused(f"{shown}: more than copy.maxBytes ({self.max_bytes}) bytes")
        elif m.issym():
            if not link_stays_inside(parts[:-1], m.linkname):
                raise Refused(f"{shown}: symlink to {m.linkname!r} leads outside the copy")
        elif not m.isdir():
            raise Refused(f"{shown}: {_kind(m)} not allowed (only files, directories, symlinks)")
        parent = self._parent_fd(parts[:-1], shown)
        leaf = parts[-1]
        mode = m.mode & 0o777
        try:
            if m.isdir():
                self._mkdir(parent, leaf, tuple(parts), mode, shown)
            elif m.issym():
                os.symlink(m.linkname, leaf, dir_fd=parent)
            else:
                self._file(tf, m, parent, leaf, mode)
        except FileExistsError:
            raise Refused(f"{shown}: already exists (not overwritten)") from None
        except OSError as e:
            raise Refused(f"{shown}: {e.strerror or e}") from None

    def _mkdir(self, parent: int, leaf: str, key: tuple[str, ...], mode: int, shown: str) -> None:
        try:
            os.mkdir(leaf, 0o700, dir_fd=parent)
        except FileExistsError:
            if key in self.created_dirs:
                return  # listed twice in the stream: it is ours
            raise
        self.created_dirs.add(key)
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent)
        try:
            os.fchmod(fd, mode | 0o700)  # the owner keeps write access while filling it
        finally:
            os.close(fd)

    def _file(
        self, tf: tarfile.TarFile, m: tarfile.TarInfo, parent: int, leaf: str, mode: int
    ) -> None:
        fd = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=parent)
        done = False
        try:
            source = tf.extractfile(m)
            if source is not None:
                remaining = m.size
                while remaining > 0:
                    chunk = source.read(min(BUFSIZE, remaining))
                    if not chunk:
                        raise tarfile.ReadError("unexpected end of data")
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    remaining -= len(chunk)
            os.fchmod(fd, mode)
            os.utime(fd, (m.mtime, m.mtime))
            done = True
        finally:
            os.close(fd)
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(leaf, dir_fd=parent)

    def _parent_fd(self, parts: list[str], shown: str) -> int:
        """The directory fd of ``parts`` (from the root), walked through this copy's own
        directories only, never following a symlink."""
        key = tuple(parts)
        if self._parent is not None and self._parent[0] == key:
            return self._parent[1]
        self._close_parent()
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                if tuple(parts[: i + 1]) not in self.created_dirs:
                    raise Refused(f"{shown}: its directory is not part of the copy")
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise Refused(f"{shown}: {e.strerror or e}") from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._parent = (key, fd)
        return fd

    def _close_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None


def _check_end(stream: Any) -> None:
    """What follows the end of the archive may only be tar's NUL padding."""
    trailing = 0
    while chunk := stream.read(65536):
        trailing += len(chunk)
        if trailing > MAX_TRAILING or chunk.strip(b"\0"):
            raise Refused("malformed stream from the source VM: data after its end")


def _kind(m: tarfile.TarInfo) -> str:
    if m.islnk():
        return "hard link"
    if m.ischr() or m.isblk():
        return "device node"
    if m.isfifo():
        return "fifo"
    return f"member of type {m.type!r}"


def open_incoming(home: str, src: str) -> tuple[int, str]:
    """The fd of ``~/Incoming/<src>`` (made if missing) and how messages show it."""
    if not src or "/" in src or src in (".", ".."):
        raise Refused(f"{src!r}: not a VM name")
    path = os.path.join(home, INCOMING, src)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), f"~/{INCOMING}/{src}"


def main(argv: list[str] | None = None, stream: io.BufferedReader | None = None) -> int:
    p = argparse.ArgumentParser(prog="copy_unpack")
    p.add_argument("--src", required=True)
    p.add_argument("--max-bytes", type=int, required=True)
    p.add_argument("--max-files", type=int, required=True)
    p.add_argument("--home", help=argparse.SUPPRESS)  # tests on the host
    args = p.parse_args(argv)
    data = stream if stream is not None else sys.stdin.buffer
    assert isinstance(data, io.BufferedReader)
    try:
        if not data.peek(1):
            return 0  # nothing sent: the source refused (and said why)
        root_fd, shown = open_incoming(args.home or os.path.expanduser("~"), args.src)
        try:
            Unpacker(root_fd, shown, args.max_bytes, args.max_files).run(data)
        finally:
            os.close(root_fd)
    except Refused as e:
        print(e, file=sys.stderr)
        return EXIT_REFUSED
    except OSError as e:
        print(f"{e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
