"""The record of what ``vmsilo install`` wrote: ``<stateDir>/installed.json`` below the root.

Read by install and uninstall (to act exactly) and by the lifecycle app on every command's
path (to know whether systemd manages a config's VMs), so it is its own small module that
imports nothing heavy. It lives in the config's ``stateDir`` like everything else vmsilo
keeps; :data:`MANIFEST` is its place under the default one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmsilo.defaults import STATE_DIR
from vmsilo.errors import VmsiloError

MANIFEST_NAME = "installed.json"
MANIFEST_VERSION = 1


def manifest_rel(state_dir: str) -> str:
    """The manifest's path relative to the install root."""
    return f"{state_dir.strip('/')}/{MANIFEST_NAME}"


MANIFEST = manifest_rel(STATE_DIR)


@dataclass
class Manifest:
    config: str | None = None
    files: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # created by vmsilo, removed if left empty
    units: list[str] = field(default_factory=list)  # unit names, for stop/start
    sockets: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "config": self.config,
            "files": self.files,
            "links": self.links,
            "dirs": self.dirs,
            "units": self.units,
            "sockets": self.sockets,
        }


def read_manifest(root: Path, state_dir: str = STATE_DIR) -> Manifest:
    path = root / manifest_rel(state_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Manifest()
    except (OSError, ValueError) as e:
        raise VmsiloError(
            f"cannot read the install manifest {path}: {e}",
            "remove the vmsilo files by hand, then delete the manifest",
        ) from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise VmsiloError(f"{path}: unknown manifest format", "reinstall with this vmsilo")
    return Manifest(
        config=data.get("config"),
        files=list(data.get("files", [])),
        links=list(data.get("links", [])),
        dirs=list(data.get("dirs", [])),
        units=list(data.get("units", [])),
        sockets=list(data.get("sockets", [])),
    )
