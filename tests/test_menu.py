"""Menu entries (SPEC §9.3) without booting a VM: the entries an image keeps, what ``vmsilo
install`` writes for them (every file through ``desktop-file-validate``, the icon's border in
the VM colour, Exec lines), a VM removed from the config leaving no entry, and a failed menu
launch reaching the journal and a desktop notification.

The image side runs on a root made from the host's own ``foot`` package (its dpkg file list,
its ``.desktop`` files and icons), laid out as in a built image; the real image build with
``foot`` is the same code (``collect_entries`` on the assembled root).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fleet import USERS, plan_of
from vmsilo.cli import vm_run
from vmsilo.errors import VmsiloError
from vmsilo.host.install import install, uninstall
from vmsilo.host.menu import (
    BORDER,
    ICON_SIZE,
    escape_string,
    menu_exec,
    quote_exec_arg,
    split_exec,
    unescape_string,
)
from vmsilo.image.desktop import collect_entries, image_entries

FOOT_LIST = Path("/var/lib/dpkg/info/foot.list")
needs_foot = pytest.mark.skipif(not FOOT_LIST.exists(), reason="the host has no foot package")
VALIDATE = shutil.which("desktop-file-validate")


def fake_root(tmp_path: Path) -> Path:
    """A guest root holding foot (from the host), a base package with its own entry, and an
    extra package whose entry needs a terminal and whose icon is an absolute symlink."""
    root = tmp_path / "root"
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    lines = FOOT_LIST.read_text().splitlines()
    (info / "foot.list").write_text("\n".join(lines) + "\n")
    for line in lines:
        src = Path(line)
        if src.is_file() and ("/applications/" in line or "/icons/" in line):
            dst = root / line.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    apps = root / "usr/share/applications"
    (apps / "base-tool.desktop").write_text(
        "[Desktop Entry]\nType=Application\nName=Base\nExec=base\n"
    )
    (info / "base:amd64.list").write_text("/usr/share/applications/base-tool.desktop\n")
    (apps / "htop.desktop").write_text(
        "[Desktop Entry]\nType=Application\nName=Htop\nComment=Process viewer\n"
        'Exec=htop --sort "a b" %F\nIcon=htop\nTerminal=true\n'
    )
    (apps / "hidden.desktop").write_text(
        "[Desktop Entry]\nType=Application\nName=Hidden\nExec=hidden\nNoDisplay=true\n"
    )
    pix = root / "usr/share/pixmaps"
    pix.mkdir(parents=True)
    from PIL import Image

    Image.new("RGBA", (32, 32), (0, 0, 255, 255)).save(pix / "htop-real.png")
    os.symlink("/usr/share/pixmaps/htop-real.png", pix / "htop.png")  # absolute: in the root
    (info / "htop:amd64.list").write_text(
        "/usr/share/applications/htop.desktop\n/usr/share/applications/hidden.desktop\n"
        "/usr/share/pixmaps/htop.png\n"
    )
    return root


def built_image(tmp_path: Path, state: Path, name: str, packages: tuple[str, ...]) -> list[str]:
    """An image version under ``state`` with the entries kept as the builder keeps them."""
    version = state / "images" / name / "v1"
    version.mkdir(parents=True)
    os.symlink("v1", state / "images" / name / "current")
    return collect_entries(fake_root(tmp_path), packages, version / "desktop")


def config(state: Path, vms: str) -> str:
    return (
        f'user = "alice"\nstateDir = "{state}"\n[images.desk]\npackages = ["foot", "htop"]\n' + vms
    )


WORK = '[vms.work]\nimage = "desk"\ncolor = "red"\n'
BANK = '[vms.bank]\nimage = "desk"\ncolor = "#00ff00"\ndesktopEntries = ["foot"]\n'


@needs_foot
def test_the_image_keeps_only_its_own_packages_entries(tmp_path: Path) -> None:
    ids = built_image(tmp_path, tmp_path / "state", "desk", ("foot", "htop"))
    assert "foot" in ids and "htop" in ids
    assert "base-tool" not in ids and "hidden" not in ids  # base system / NoDisplay
    version = tmp_path / "state/images/desk/current"
    assert set(image_entries(version)) == set(ids)
    assert (version / "desktop/icons/foot.png").is_file()
    assert (version / "desktop/icons/htop.png").read_bytes() == (
        tmp_path / "root/usr/share/pixmaps/htop-real.png"
    ).read_bytes()  # the absolute link was resolved inside the root


@needs_foot
@pytest.mark.skipif(VALIDATE is None, reason="desktop-file-validate missing (install-deps)")
def test_install_writes_valid_entries_with_bordered_icons(tmp_path: Path) -> None:
    state = tmp_path / "state"
    built_image(tmp_path, state, "desk", ("foot", "htop"))
    root = tmp_path / "inst"
    install(plan_of(config(state, WORK + BANK)), "/etc/vmsilo.toml", root, ["/x"], live=False)
    apps = root / "usr/local/share/applications"
    written = sorted(p.name for p in apps.iterdir())
    assert "vmsilo-work-foot.desktop" in written and "vmsilo-work-htop.desktop" in written
    assert [w for w in written if w.startswith("vmsilo-bank-")] == ["vmsilo-bank-foot.desktop"]
    checked = [
        *apps.iterdir(),
        *(root / "usr/local/share/desktop-directories").iterdir(),
    ]
    for path in checked:
        p = subprocess.run([VALIDATE, str(path)], capture_output=True, text=True)
        # only hints allowed: the one category (X-vmsilo-<vm>) is meant to be no main category
        problems = [ln for ln in p.stdout.splitlines() if ": hint: " not in ln]
        assert p.returncode == 0 and problems == [] and p.stderr == "", (path, p.stdout)
    for menu in (root / "etc/xdg/menus/applications-merged").iterdir():
        tree = ET.parse(menu)
        assert tree.getroot().tag == "Menu"
    foot = (apps / "vmsilo-work-foot.desktop").read_text()
    assert "Name=Foot (work)\n" in foot and "Exec=vm-run --detach work foot\n" in foot
    assert "Terminal=false\n" in foot and "Categories=X-vmsilo-work;\n" in foot
    htop = (apps / "vmsilo-work-htop.desktop").read_text()
    assert 'Exec=vm-run -t work htop --sort "a b"\n' in htop and "Terminal=true\n" in htop

    from PIL import Image

    for vm, color in (("work", (255, 0, 0, 255)), ("bank", (0, 255, 0, 255))):
        icon = root / f"usr/local/share/icons/hicolor/64x64/apps/vmsilo-{vm}-foot.png"
        with Image.open(icon) as img:
            rgba = img.convert("RGBA")
        assert rgba.size == (ICON_SIZE, ICON_SIZE)
        edge = [
            rgba.getpixel((x, y))
            for x in range(ICON_SIZE)
            for y in range(ICON_SIZE)
            if min(x, y, ICON_SIZE - 1 - x, ICON_SIZE - 1 - y) < BORDER
        ]
        assert set(edge) == {color}, vm
        assert rgba.getpixel((ICON_SIZE // 2, ICON_SIZE // 2)) != color  # the icon inside


@needs_foot
def test_reinstall_changes_nothing_and_a_removed_vm_leaves_no_entry(tmp_path: Path) -> None:
    state = tmp_path / "state"
    built_image(tmp_path, state, "desk", ("foot", "htop"))
    root = tmp_path / "inst"
    both = plan_of(config(state, WORK + BANK))
    install(both, "/c", root, ["/x"], live=False)
    again = install(both, "/c", root, ["/x"], live=False)
    assert again.written == []
    report = install(plan_of(config(state, BANK)), "/c", root, ["/x"], live=False)
    everything = [str(p.relative_to(root)) for p in root.rglob("*")]
    assert not [p for p in everything if "vmsilo-work" in p], everything
    assert any("vmsilo-bank-foot.desktop" in p for p in everything)
    assert any("vmsilo-work-foot.png" in r for r in report.removed)
    uninstall(root, str(state), live=False)
    assert not [p for p in root.rglob("*") if "vmsilo-bank" in p.name]


@needs_foot
def test_desktop_entries_selection_and_unknown_ids(tmp_path: Path) -> None:
    state = tmp_path / "state"
    built_image(tmp_path, state, "desk", ("foot", "htop"))
    none = '[vms.work]\nimage = "desk"\ndesktopEntries = []\n'
    report = install(plan_of(config(state, none)), "/c", tmp_path / "a", ["/x"], live=False)
    assert not [w for w in report.written if "applications" in w or "icons" in w]
    bad = '[vms.work]\nimage = "desk"\ndesktopEntries = ["foot", "nope"]\n'
    with pytest.raises(VmsiloError) as e:
        install(plan_of(config(state, bad)), "/c", tmp_path / "b", ["/x"], live=False)
    assert "vms.work.desktopEntries: unknown desktop entry nope" in str(e.value)
    assert "available: " in str(e.value) and "foot" in str(e.value) and "htop" in str(e.value)


def test_image_not_built_is_an_error_only_when_entries_are_named(tmp_path: Path) -> None:
    state = tmp_path / "state"
    plan = plan_of(config(state, '[vms.work]\nimage = "desk"\n'))
    install(plan, "/c", tmp_path / "a", ["/x"], live=False)  # nothing to offer yet: no entries
    named = plan_of(config(state, '[vms.work]\nimage = "desk"\ndesktopEntries = ["foot"]\n'))
    with pytest.raises(VmsiloError, match="image desk is not built"):
        install(named, "/c", tmp_path / "b", ["/x"], live=False)


@pytest.mark.parametrize(
    ("exec_value", "argv"),
    [
        ("foot", ["foot"]),
        ("firefox-esr %u", ["firefox-esr"]),
        ('sh -c "echo \\\\"hi\\\\" \\\\$HOME" %U', ["sh", "-c", 'echo "hi" $HOME']),
        ("prog --pct=50%% %f", ["prog", "--pct=50%"]),
        ('"/opt/my app/run" --x', ["/opt/my app/run", "--x"]),
    ],
)
def test_exec_field_codes_dropped_and_quoting_round_trips(exec_value: str, argv: list[str]) -> None:
    got = split_exec(unescape_string(exec_value))
    assert got == argv
    line = menu_exec("work", got, terminal=False)
    assert split_exec(unescape_string(line)) == ["vm-run", "--detach", "work", *argv]
    assert escape_string("a\\b") == "a\\\\b" and quote_exec_arg("a b") == '"a b"'


def test_a_failed_menu_launch_reaches_the_journal_and_the_desktop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "notified"
    fake = tmp_path / "bin" / "notify-send"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
    logged: list[str] = []
    import syslog

    monkeypatch.setattr(syslog, "syslog", lambda _prio, text: logged.append(text))
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text(f'user = "alice"\nruntimeDir = "{tmp_path}/run"\n[vms.work]\n')
    err = io.StringIO()
    status = vm_run.main(["-c", str(cfg), "--detach", "nosuch", "foot"], users=USERS, stderr=err)
    assert status == 255
    assert logged and "nosuch: unknown VM: nosuch" in logged[0]
    shown = record.read_text()
    assert "nosuch: the program did not start" in shown and "Available VMs: work" in shown
    # on a terminal, or without --detach, nothing is sent
    record.unlink()
    assert vm_run.main(["-c", str(cfg), "nosuch", "foot"], users=USERS, stderr=err) == 255
    assert not record.exists()


@needs_foot
def test_image_build_refuses_an_unknown_desktop_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vmsilo image build`` checks ``desktopEntries`` of the VMs using the image it built
    (exit 2, listing what the image offers); ``vmsilo check`` does not need images."""
    from fleet import run_vmsilo
    from vmsilo.image import build as image_build

    state = tmp_path / "state"
    built_image(tmp_path, state, "desk", ("foot", "htop"))
    version = state / "images/desk/v1"
    monkeypatch.setattr(
        image_build,
        "build_image",
        lambda spec, *a, **kw: image_build.BuiltImage(spec.name, "v1", version, reused=True),
    )
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text(config(state, '[vms.work]\nimage = "desk"\ndesktopEntries = ["nope"]\n'))
    assert run_vmsilo(["-c", str(cfg), "check"])[0] == 0
    status, _out, err = run_vmsilo(["-c", str(cfg), "image", "build", "desk"])
    assert status == 2
    assert "vms.work.desktopEntries: unknown desktop entry nope (image desk)" in err
    assert "foot" in err and "htop" in err
    cfg.write_text(config(state, '[vms.work]\nimage = "desk"\ndesktopEntries = ["htop"]\n'))
    assert run_vmsilo(["-c", str(cfg), "image", "build", "desk"])[0] == 0
