"""Menu entries from a real image build (SPEC §9.3): an image with ``foot`` keeps foot's
entries and icon beside itself, and ``vmsilo install`` turns them into files that pass
``desktop-file-validate``, with the icon's border in the VM colour.

Builds a second image (mmdebstrap with foot: a few minutes the first time; the root is cached
in the test cache). Opening the entry's window in a headless sway needs the Wayland guest
path and is not tested here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import IMAGE_CACHE, require_vm_tests
from fleet import plan_of
from vmsilo.host.install import install
from vmsilo.host.menu import BORDER, ICON_SIZE

pytestmark = pytest.mark.vm


def test_image_with_foot_gives_valid_menu_entries(tmp_path: Path, state_dir: Path) -> None:
    require_vm_tests()
    from vmsilo.image.build import ImageSpec, build_image
    from vmsilo.image.desktop import image_entries

    built = build_image(ImageSpec("desk", "bookworm", ("foot",)), state_dir, cache_dir=IMAGE_CACHE)
    offered = image_entries(built.path)
    assert "foot" in offered and (built.path / "desktop/icons/foot.png").is_file()
    assert not [e for e in offered if e.startswith("python") or "pulse" in e]  # base packages
    cfg = (
        f'user = "alice"\nstateDir = "{state_dir}"\n[images.desk]\npackages = ["foot"]\n'
        '[vms.term]\nimage = "desk"\ncolor = "orange"\ndesktopEntries = ["foot"]\n'
    )
    root = tmp_path / "root"
    install(plan_of(cfg), "/etc/vmsilo/vmsilo.toml", root, ["/usr/bin/vmsilo"], live=False)
    entry = root / "usr/local/share/applications/vmsilo-term-foot.desktop"
    directory = root / "usr/local/share/desktop-directories/vmsilo-term.directory"
    validate = shutil.which("desktop-file-validate")
    assert validate is not None, "scripts/install-deps installs desktop-file-utils"
    for path in (entry, directory):
        p = subprocess.run([validate, str(path)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout
        assert all(": hint: " in ln for ln in p.stdout.splitlines()), p.stdout
    assert "Exec=vm-run --detach term foot\n" in entry.read_text()
    from PIL import Image

    icon = root / "usr/local/share/icons/hicolor/64x64/apps/vmsilo-term-foot.png"
    with Image.open(icon) as img:
        rgba = img.convert("RGBA")
    orange = (255, 165, 0, 255)
    for x, y in ((0, 0), (ICON_SIZE - 1, ICON_SIZE // 2), (ICON_SIZE // 2, BORDER - 1)):
        assert rgba.getpixel((x, y)) == orange
