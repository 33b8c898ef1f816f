"""The production install (issue 15.4): `make install` puts the commands on everyone's PATH.

The real script runs into a DESTDIR (a fresh venv built with Debian's python3, the package
installed from this checkout, the commands linked into BINDIR); then the desktop user — a real
non-root account — runs the installed `vm-run --help` and `vmsilo check`. `vmsilo install`
notes a vmsilo that runs from a source checkout, or one the desktop user cannot run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsilo.host.install import exe_notes
from vmsilo.plan.model import HostUserPlan

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (
    "vmsilo",
    "vm-run",
    "vm-copy",
    "vm-clipboard",
    "vm-start",
    "vm-stop",
    "vm-shell",
    "vm-start-debug",
)


def _user(uid: int = 4242, gid: int = 4242) -> HostUserPlan:
    return HostUserPlan("desk", uid, gid, "/home/desk", f"/run/user/{uid}")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every account can reach (pytest's own tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vmsilo-prod-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_notes_for_a_checkout_and_an_unreadable_interpreter(public_dir: Path) -> None:
    tmp_path = public_dir
    checkout = tmp_path / "src" / "vmsilo-git"
    (checkout / ".git").mkdir(parents=True)
    exe = checkout / ".venv" / "bin" / "vmsilo"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    notes = exe_notes([str(exe)], _user())
    assert any(f"source checkout {checkout}" in n and "make install" in n for n in notes), notes

    private = tmp_path / "private"
    (private / "bin").mkdir(parents=True)
    private.chmod(0o700)  # like /root with a pyenv inside
    hidden = private / "bin" / "vmsilo"
    hidden.write_text("#!/bin/sh\n")
    hidden.chmod(0o755)
    notes = exe_notes([str(hidden)], _user())
    assert any(f"{private} is not readable" in n and "user desk" in n for n in notes), notes
    # the owner of that directory is fine
    assert not any("cannot run" in n for n in exe_notes([str(hidden)], _user(os.getuid())))


def test_a_clean_install_has_no_notes(public_dir: Path) -> None:
    exe = public_dir / "opt" / "bin" / "vmsilo"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/usr/bin/python3\n")
    exe.chmod(0o755)
    assert exe_notes([str(exe)], _user()) == []
    # a script whose interpreter the user cannot reach (a pyenv under /root)
    (public_dir / "private").mkdir(mode=0o700)
    exe.write_text(f"#!{public_dir}/private/python3 -E\n")
    notes = exe_notes([str(exe)], _user())
    assert len(notes) == 1 and f"{public_dir}/private is not readable" in notes[0], notes


@pytest.mark.root
def test_make_install_gives_the_desktop_user_the_commands(
    public_dir: Path, host_user: pwd.struct_passwd
) -> None:
    if not os.access("/usr/bin/python3", os.X_OK) or shutil.which("setpriv") is None:
        pytest.fail("Debian's python3 and setpriv are part of the base system")
    tmp_path = public_dir
    dest = tmp_path / "dest"
    env = dict(os.environ, DESTDIR=str(dest), PREFIX="/opt/vmsilo", BINDIR="/usr/local/bin")
    env.pop("VIRTUAL_ENV", None)
    p = subprocess.run(
        ["make", "-s", "install"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout + p.stderr
    for name in COMMANDS:
        link = dest / "usr/local/bin" / name
        assert os.readlink(link) == f"/opt/vmsilo/bin/{name}"
        script = dest / "opt/vmsilo/bin" / name
        first = script.read_text().splitlines()[0]
        # the final place, not the staging one
        assert first.startswith("#!/opt/vmsilo/bin/python"), first
    # the installed package is a copy: the checkout can go away
    site = next((dest / "opt/vmsilo/lib").glob("python3*/site-packages"))
    assert (site / "vmsilo" / "cli" / "vm_run.py").is_file()
    assert not list(site.glob("__editable__*"))

    # The desktop user runs the installed commands (the paths as they will be once copied:
    # run them through the DESTDIR interpreter with the same site-packages).
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text(f'user = "{host_user.pw_name}"\n[vms.work]\nhypervisor = "qemu"\n')
    cfg.chmod(0o644)
    python = dest / "opt/vmsilo/bin/python"

    def as_user(module: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={host_user.pw_uid}",
                f"--regid={host_user.pw_gid}",
                "--clear-groups",
                "--",
                str(python),
                "-m",
                module,
                *args,
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "VMSILO_CONFIG": str(cfg)},
            timeout=60,
        )

    p = as_user("vmsilo.cli.vmsilo", "check")
    assert (p.returncode, p.stdout) == (0, "ok: 1 VM\n"), p.stderr
    p = as_user("vmsilo.cli.vm_run", "--help")
    assert p.returncode == 0 and "vm-run" in p.stdout, p.stderr

    p = subprocess.run(
        ["make", "-s", "uninstall"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert not (dest / "opt/vmsilo").exists()
    assert not any((dest / "usr/local/bin").iterdir())
