"""``vmsilo image gc``: which image versions go, which stay.

The rule: ``current`` stays; a version a running VM uses stays (what its VMM holds open, or what
its snapshot's paths resolve to; all versions of its image when that cannot be known yet);
everything else goes. Nothing is built here: versions are fake directories, or hard-linked
copies of the session's real image for the test with a real QEMU.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import USERS
from vmsilo.cli.vmsilo import main as vmsilo_main
from vmsilo.image.store import IMAGE_FILES, gc_images, list_images
from vmsilo.lifecycle.images import images_in_use


def fake_version(images: Path, name: str, version: str, size: int = 4096) -> Path:
    d = images / name / version
    d.mkdir(parents=True)
    for f in IMAGE_FILES:
        (d / f).write_bytes(b"\1" * size)
    return d


def set_current(images: Path, name: str, version: str) -> None:
    link = images / name / "current"
    link.unlink(missing_ok=True)
    link.symlink_to(version)


class FakeSupervisor:
    """Holds ``R/<vm>.lock`` like a supervisor and writes its state and plan snapshot."""

    def __init__(self, run: Path, vm: str) -> None:
        self.run, self.vm = run, vm
        self.fd = os.open(run / f"{vm}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def write(self, vmm_pid: int | None, vm_json: dict[str, Any]) -> None:
        (self.run / f"{self.vm}.state.json").write_text(
            json.dumps({"state": "running", "vmm_pid": vmm_pid})
        )
        (self.run / f"{self.vm}.plan.json").write_text(
            json.dumps({"configPath": "x", "configText": "", "vm": vm_json})
        )

    def release(self) -> None:
        os.close(self.fd)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Any]:
    """Start a process that keeps a file open (a stand-in VMM); all killed afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(path: Path) -> int:
        code = (
            "import sys\nf = open(sys.argv[1], 'rb')\nprint('open', flush=True)\nsys.stdin.read()"
        )
        p = subprocess.Popen(
            [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline() == b"open\n"
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_the_rule_on_fake_versions(tmp_path: Path, holder: Any) -> None:
    images = tmp_path / "state" / "images"
    run = tmp_path / "run"
    run.mkdir()
    for v in ("v1", "v2", "v3", "v4"):
        fake_version(images, "default", v)
    for v in ("o1", "o2"):
        fake_version(images, "other", v)
    set_current(images, "default", "v4")
    set_current(images, "other", "o2")

    # VM a: its VMM has v1's root open; its snapshot names v2 explicitly, and current/
    a = FakeSupervisor(run, "a")
    a.write(
        holder(images / "default" / "v1" / "root.erofs"),
        {
            "image": "default",
            "kernel": str(images / "default" / "v2" / "vmlinuz"),
            "initramfs": str(images / "default" / "current" / "initrd.img"),
            "disks": [{"path": str(images / "default" / "current" / "root.erofs")}],
        },
    )
    # VM b is starting (no VMM yet): every version of its image is kept
    b = FakeSupervisor(run, "b")
    b.write(None, {"image": "other", "kernel": "/boot/vmlinuz", "disks": []})
    # VM c is not running (nobody holds its lock): what its stale files say does not count
    (run / "c.lock").touch()
    (run / "c.state.json").write_text(json.dumps({"state": "stopped", "vmm_pid": os.getpid()}))

    in_use, notes = images_in_use(str(tmp_path / "state"), str(run))
    assert {p.relative_to(images).as_posix() for p in in_use} == {
        "default/v1",
        "default/v2",
        "default/v4",  # current/, as the snapshot names it: resolved now
        "other/o1",
        "other/o2",
    }
    assert len(notes) == 1 and "VM b" in notes[0] and "other" in notes[0]

    would = gc_images(tmp_path / "state", in_use, dry_run=True)
    assert [(i.name, i.version) for i in would] == [("default", "v3")]
    assert (images / "default" / "v3").is_dir()
    removed = gc_images(tmp_path / "state", in_use)
    assert [(i.name, i.version) for i in removed] == [("default", "v3")]
    assert removed[0].size >= 3 * 4096
    assert not (images / "default" / "v3").exists()
    assert sorted(i.version for i in list_images(tmp_path / "state")) == [
        "o1",
        "o2",
        "v1",
        "v2",
        "v4",
    ]

    # the VMs stop: only the current versions remain
    a.release()
    b.release()
    in_use, notes = images_in_use(str(tmp_path / "state"), str(run))
    assert in_use == set() and notes == []
    removed = gc_images(tmp_path / "state", in_use)
    assert sorted(i.version for i in removed) == ["o1", "v1", "v2"]
    assert sorted((i.name, i.version) for i in list_images(tmp_path / "state")) == [
        ("default", "v4"),
        ("other", "o2"),
    ]
    assert not [p for p in images.rglob(".gc-*")]


def test_cli_prints_what_was_removed_and_the_space_freed(tmp_path: Path) -> None:
    images = tmp_path / "state" / "images"
    fake_version(images, "default", "old", size=1 << 20)
    fake_version(images, "default", "new")
    set_current(images, "default", "new")
    config = tmp_path / "vmsilo.toml"
    config.write_text(
        f'user = "alice"\nstateDir = "{tmp_path}/state"\nruntimeDir = "{tmp_path}/run"\n'
        "[vms.work]\n"
    )

    def gc(*extra: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = vmsilo_main(
            ["-c", str(config), "image", "gc", *extra], users=USERS, stdout=out, stderr=err
        )
        return status, out.getvalue(), err.getvalue()

    status, out, _ = gc("--dry-run")
    assert status == 0 and out.startswith("would remove default old (3.0 MiB)\n"), out
    status, out, _ = gc()
    assert status == 0
    assert out == "removed default old (3.0 MiB)\nfreed 3.0 MiB in 1 version(s)\n"
    status, out, _ = gc("--json")
    assert status == 0 and json.loads(out)["removed"] == [] and json.loads(out)["freed"] == 0
    assert [i.version for i in list_images(tmp_path / "state")] == ["new"]


@pytest.mark.vm
def test_a_running_qemu_keeps_the_version_it_booted(image: Any, tmp_path: Path) -> None:
    """Boot from version A, move ``current`` to B (a 'rebuild'), gc: A stays until the VM stops."""
    state = tmp_path / "state"
    images = state / "images"
    (images / "default").mkdir(parents=True)
    a, b = images / "default" / "aaaa", images / "default" / "bbbb"
    subprocess.run(["cp", "-al", str(image.path), str(a)], check=True)
    set_current(images, "default", "aaaa")
    stale = fake_version(images, "default", "stale")
    run = Path(f"/tmp/vmsilo-gc-{os.getpid()}")
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    config = run / "vmsilo.toml"
    config.write_text(
        f"""
user = "root"
stateDir = "{state}"
runtimeDir = "{run}"
startTimeout = 120
[qemu]
accel = "tcg"
[vms.gc]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
"""
    )
    env = dict(os.environ, VMSILO_CONFIG=str(config))

    def vmsilo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vmsilo.cli.vmsilo", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )

    try:
        p = vmsilo("start", "gc")
        assert p.returncode == 0, p.stderr
        subprocess.run(["cp", "-al", str(a), str(b)], check=True)
        set_current(images, "default", "bbbb")
        p = vmsilo("image", "gc")
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[0].startswith("removed default stale ("), p.stdout
        assert a.is_dir() and b.is_dir() and not stale.exists()
        p = vmsilo("stop", "gc")
        assert p.returncode == 0, p.stderr
        p = vmsilo("image", "gc")
        assert p.returncode == 0 and "removed default aaaa (" in p.stdout, p.stdout + p.stderr
        assert not a.exists() and b.is_dir()
    finally:
        vmsilo("stop", "gc")
        shutil.rmtree(run, ignore_errors=True)


def test_gc_removes_saved_states_no_current_key_uses(tmp_path: Path) -> None:
    """fastStart (SPEC §10): the state the VM would restore now stays; a state of an older
    key, and every state of a VM no longer configured, go."""
    from vmsilo.backends.registry import backend_for
    from vmsilo.config.load import parse_config
    from vmsilo.plan.build import build_plan
    from vmsilo.supervisor.saved import state_key

    config = tmp_path / "vmsilo.toml"
    config.write_text(
        f'user = "alice"\nstateDir = "{tmp_path}/state"\nruntimeDir = "{tmp_path}/run"\n'
        '[qemu]\naccel = "tcg"\n'
        '[vms.fast]\nhypervisor = "qemu"\nsharedHome = false\nfastStart = true\n'
    )
    plan = build_plan(parse_config(config.read_text(), USERS), USERS)
    vm = plan.vms["fast"]
    backend = backend_for(vm)
    key = state_key(plan, vm, backend, backend.host_facts(plan, vm, probe=False))
    saved = tmp_path / "state" / "fast" / "saved"
    for d in (saved / key, saved / "0ld", tmp_path / "state" / "gone" / "saved" / "k"):
        d.mkdir(parents=True)
        (d / "state").write_bytes(b"x" * 4096)
    out, err = io.StringIO(), io.StringIO()
    status = vmsilo_main(
        ["-c", str(config), "image", "gc", "--json"], users=USERS, stdout=out, stderr=err
    )
    assert status == 0, err.getvalue()
    assert sorted(json.loads(out.getvalue())["savedStates"]) == [
        str(tmp_path / "state" / "fast" / "saved" / "0ld"),
        str(tmp_path / "state" / "gone" / "saved" / "k"),
    ]
    assert (saved / key).exists() and not (saved / "0ld").exists()
    assert not (tmp_path / "state" / "gone" / "saved" / "k").exists()
