"""The image store on disk (host side): listing the built versions and removing unused ones.

``<state_dir>/images/<name>/<version>/`` holds one built version (see
:mod:`vmsilo.image.build`); ``current`` links the one new VMs use. Builds and garbage
collection of one image serialise on the same lock file, so a build never switches
``current`` to a version being removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

IMAGE_FILES: tuple[str, ...] = ("vmlinuz", "initrd.img", "root.erofs")


@dataclass(frozen=True)
class ImageInfo:
    name: str
    version: str
    path: Path
    size: int  # bytes on disk of the three files
    built: float  # UNIX time the version was renamed into place
    is_current: bool


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clean_stale(directory: Path, prefix: str) -> None:
    """Remove leftovers of interrupted builds (callers hold the lock that covers them)."""
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(prefix):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


# --- listing ----------------------------------------------------------------------------------


def list_images(state_dir: Path) -> list[ImageInfo]:
    """Every built version of every image, sorted by name then build time."""
    base = Path(state_dir) / "images"
    infos: list[ImageInfo] = []
    if not base.is_dir():
        return infos
    for image_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        try:
            current: str | None = os.readlink(image_dir / "current")
        except OSError:
            current = None
        for vdir in image_dir.iterdir():
            if vdir.name.startswith(".") or vdir.is_symlink() or not vdir.is_dir():
                continue
            if not all((vdir / f).is_file() for f in IMAGE_FILES):
                continue
            size = sum((vdir / f).stat().st_blocks * 512 for f in IMAGE_FILES)
            infos.append(
                ImageInfo(
                    name=image_dir.name,
                    version=vdir.name,
                    path=vdir,
                    size=size,
                    built=vdir.stat().st_mtime,
                    is_current=vdir.name == current,
                )
            )
    infos.sort(key=lambda i: (i.name, i.built))
    return infos


# --- garbage collection -----------------------------------------------------------------------


def _tree_size(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks, so sparse files count what they use)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def gc_images(state_dir: Path, in_use: set[Path], *, dry_run: bool = False) -> list[ImageInfo]:
    """Remove every image version that is neither ``current`` nor in ``in_use``.

    ``in_use`` holds version directories (any spelling; compared after resolving symlinks)
    that a running VM uses. Each image is handled under the same lock as ``build_image``, so a
    build can never switch ``current`` to a version being removed. A version is first renamed
    to a dot-name (invisible to ``list_images`` and to new VMs at once), then deleted. Returns
    what was (or, with ``dry_run``, would be) removed, with the bytes it occupied.
    """
    base = Path(state_dir) / "images"
    keep = {Path(os.path.realpath(p)) for p in in_use}
    removed: list[ImageInfo] = []
    if not base.is_dir():
        return removed
    for image_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink()):
        with locked(image_dir / ".lock"):
            clean_stale(image_dir, ".gc-")  # an interrupted gc's renamed leftovers
            try:
                current: str | None = os.readlink(image_dir / "current")
            except OSError:
                current = None
            current_dir = (
                Path(os.path.realpath(image_dir / "current")) if current is not None else None
            )
            for vdir in sorted(image_dir.iterdir()):
                if vdir.name.startswith(".") or vdir.is_symlink() or not vdir.is_dir():
                    continue
                real = Path(os.path.realpath(vdir))
                if vdir.name == current or real == current_dir or real in keep:
                    continue
                info = ImageInfo(
                    name=image_dir.name,
                    version=vdir.name,
                    path=vdir,
                    size=_tree_size(vdir),
                    built=vdir.stat().st_mtime,
                    is_current=False,
                )
                if not dry_run:
                    doomed = image_dir / f".gc-{vdir.name}-{os.getpid()}"
                    os.rename(vdir, doomed)
                    shutil.rmtree(doomed)
                removed.append(info)
    return removed
