"""The menu entries an image offers (SPEC §9.3): kept beside the image at build time.

``<version>/desktop/applications/<id>.desktop`` and ``<version>/desktop/icons/<id>.png`` hold
the ``.desktop`` files of the image's **own** ``packages`` (found through dpkg's file lists in
the built root, so the base system's entries are not offered) and, for each, the best PNG icon
the root has (largest hicolor size up to 256, else ``/usr/share/pixmaps``; a scalable-only icon
is left out and ``vmsilo install`` draws a plain one). Entries hidden from menus (``NoDisplay``,
``Hidden``) and non-applications are skipped. ``vmsilo install`` reads them from the image
version ``current`` points at (:func:`image_entries`).

Paths inside the root are resolved with the root as ``/`` (an absolute symlink in a Debian
root points into that root, never at the host's files).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from vmsilo.errors import VmsiloError

DESKTOP_DIR = "desktop"
APPS = "applications"
ICONS = "icons"
_APP_RE = re.compile(r"^/usr/share/applications/([A-Za-z0-9_.+-]+)\.desktop$")
_ICON_SIZES = (256, 192, 128, 96, 72, 64, 48, 32, 24, 22, 16)


def read_entry(text: str) -> dict[str, str]:
    """The keys of a desktop file's ``[Desktop Entry]`` group (values still escaped)."""
    keys: dict[str, str] = {}
    group = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line[1:-1]
            continue
        if group == "Desktop Entry" and "=" in line:
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), value.strip())
    return keys


def _in_root(root: Path, path: str, hops: int = 16) -> Path | None:
    """``path`` of the guest resolved inside ``root`` (symlinks followed with ``root`` as
    ``/``); None if it is missing, escapes or loops."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    current = root
    while parts:
        part = parts.pop(0)
        if part == "..":
            if current != root:
                current = current.parent
            continue
        nxt = current / part
        if nxt.is_symlink():
            if hops == 0:
                return None
            hops -= 1
            target = os.readlink(nxt)
            base = [] if target.startswith("/") else _rel_parts(root, current)
            parts = [p for p in [*base, *target.split("/")] if p not in ("", ".")] + parts
            current = root
            continue
        current = nxt
    return current if current.exists() else None


def _rel_parts(root: Path, p: Path) -> list[str]:
    return list(p.relative_to(root).parts)


def package_files(root: Path, package: str) -> list[str]:
    """The paths dpkg lists for ``package`` in the root (any architecture qualifier)."""
    info = root / "var/lib/dpkg/info"
    for name in (f"{package}.list", *sorted(p.name for p in info.glob(f"{package}:*.list"))):
        path = info / name
        if path.is_file():
            return path.read_text(errors="replace").splitlines()
    return []


def find_icon(root: Path, icon: str) -> Path | None:
    """The best PNG for an entry's ``Icon=`` value in the root."""
    if icon.startswith("/"):
        found = _in_root(root, icon)
        return found if found is not None and icon.endswith(".png") else None
    name = icon.removesuffix(".png")
    for size in _ICON_SIZES:
        found = _in_root(root, f"/usr/share/icons/hicolor/{size}x{size}/apps/{name}.png")
        if found is not None and found.is_file():
            return found
    found = _in_root(root, f"/usr/share/pixmaps/{name}.png")
    return found if found is not None and found.is_file() else None


def collect_entries(root: Path, packages: tuple[str, ...], out: Path) -> list[str]:
    """Copy the menu entries of ``packages`` (and their icons) from the built ``root`` into
    ``out``; returns their ids, sorted."""
    ids: list[str] = []
    for package in sorted(set(packages)):
        for line in package_files(root, package):
            m = _APP_RE.match(line)
            if m is None:
                continue
            source = _in_root(root, line)
            if source is None or not source.is_file():
                continue
            text = source.read_text(errors="replace")
            keys = read_entry(text)
            if (
                keys.get("Type") != "Application"
                or keys.get("NoDisplay") == "true"
                or keys.get("Hidden") == "true"
                or not keys.get("Exec")
            ):
                continue
            entry_id = m.group(1)
            (out / APPS).mkdir(parents=True, exist_ok=True)
            (out / APPS / f"{entry_id}.desktop").write_text(text)
            icon = find_icon(root, keys.get("Icon", "")) if keys.get("Icon") else None
            if icon is not None:
                (out / ICONS).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(icon, out / ICONS / f"{entry_id}.png")
            ids.append(entry_id)
    return sorted(set(ids))


def image_entries(version_dir: Path) -> dict[str, Path]:
    """The entries kept beside an image version: id → its ``.desktop`` file."""
    apps = Path(version_dir) / DESKTOP_DIR / APPS
    if not apps.is_dir():
        return {}
    return {p.name.removesuffix(".desktop"): p for p in sorted(apps.glob("*.desktop"))}


def icon_of(version_dir: Path, entry_id: str) -> Path | None:
    path = Path(version_dir) / DESKTOP_DIR / ICONS / f"{entry_id}.png"
    return path if path.is_file() else None


def select_entries(
    vm: str, image: str, wanted: tuple[str, ...] | None, available: list[str]
) -> list[str]:
    """The ids ``vms.<vm>.desktopEntries`` selects (None: all); an unknown id is an error
    listing the available ones."""
    if wanted is None:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        offer = ", ".join(available) or "none (add packages with desktop entries to the image)"
        raise VmsiloError(
            f"vms.{vm}.desktopEntries: unknown desktop entry {', '.join(unknown)} (image {image})",
            f"available: {offer}",
        )
    return list(dict.fromkeys(wanted))
