"""crosvm's sound (upstream flavor, SPEC §9.2) against tests/fake_crosvm and
tests/fake_vhost_device_sound: no VM, real supervisor, real processes.

The bug this guards: crosvm's default is ``sound.playback = true`` and its argv carries
``--vhost-user type=sound,socket=R/<vm>-sound.socket``; nothing served that socket, so every
default crosvm VM failed with "failed to connect a device socket". Now the supervisor binds
it before the VMM and runs ``crosvm.soundDevice`` on it; without that daemon a VM that did not
ask for sound by name starts without the device, and one that did fails, naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from crosvm_grammar import assert_valid
from test_crosvm_supervision import VM, CrosvmInstall, make_crosvm_install, start

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MISSING = "/nonexistent/vhost-device-sound"
SOUND_WORDS = ["--vhost-user", f"type=sound,socket={{run}}/{VM}-sound.socket"]


def launched_argv(cv: CrosvmInstall, pid: int) -> list[str]:
    argv: list[str] = next(e for e in cv.seen if e["event"] == "launch" and e["pid"] == pid)["argv"]
    return argv


def event(cv: CrosvmInstall, kind: str) -> dict[str, Any]:
    """The first event of ``kind``, seen already (while waiting for another) or still to come."""
    for ev in cv.seen:
        if ev["event"] == kind:
            return ev
    return cv.next_event(kind)


def test_default_sound_is_served_by_the_sound_daemon(tmp_path: Path) -> None:
    """Default config (sound unset): the daemon serves the pre-bound socket crosvm connects to."""
    cv = make_crosvm_install(tmp_path / "i", sound="")
    try:
        booted = start(cv)
        argv = launched_argv(cv, booted["pid"])
        assert_valid(argv)
        socket_path = cv.inst.run_dir / f"{VM}-sound.socket"
        at = argv.index(f"type=sound,socket={socket_path}")
        assert argv[at - 1] == "--vhost-user"
        daemon = event(cv, "sound-start")
        # handed the listening fd, not a path: the VMM cannot race it
        assert daemon["argv"][0].startswith("--socket-fd=")
        # root's runtime dir has no PipeWire here: the daemon plays into its null backend
        pipewire = Path("/run/user/0/pipewire-0").is_socket()
        assert daemon["backend"] == ("pipewire" if pipewire else "null")
        event(cv, "sound-connected")  # crosvm's connection, queued since before it ran
        st = cv.status()
        assert st["state"] == "running", st
        if not pipewire:
            assert st["sound"] == (
                "unavailable: no PipeWire server at /run/user/0/pipewire-0: the sound is silent"
            )
        run = cv.cmd("vm-run", VM, "true")
        assert run.returncode == 0, run.stderr
        stop = cv.cmd("vmsilo", "stop", VM)
        assert stop.returncode == 0, stop.stderr
        assert cv.status()["state"] == "stopped"
        assert not socket_path.exists()
        with pytest.raises(ProcessLookupError):
            os.kill(daemon["pid"], 0)
    finally:
        cv.cmd("vmsilo", "stop", VM)
        cv.close()


def test_default_sound_without_the_daemon_starts_without_a_sound_device(
    tmp_path: Path,
) -> None:
    cv = make_crosvm_install(tmp_path / "i", sound="", sound_device=MISSING)
    try:
        booted = start(cv)
        argv = launched_argv(cv, booted["pid"])
        assert not any(w.startswith("type=sound") for w in argv), argv
        st = cv.status()
        assert st["state"] == "running"
        assert st["sound"] == (
            f"unavailable: {MISSING} (crosvm.soundDevice) not found: started without sound"
        )
        human = cv.cmd("vmsilo", "status")
        assert human.returncode == 0, human.stderr
        assert f"! {VM}: sound unavailable: {MISSING}".encode() in human.stdout
        doctor = cv.cmd("vmsilo", "doctor")
        assert f"{MISSING}".encode() in doctor.stdout
        assert b"start without sound" in doctor.stdout
        assert b"CONFIG_SND_VIRTIO" in doctor.stdout
        assert not (cv.inst.run_dir / f"{VM}-sound.socket").exists()
    finally:
        cv.cmd("vmsilo", "stop", VM)
        cv.close()


@pytest.mark.parametrize(
    ("tool", "args", "code"),
    [
        ("vmsilo", ("start", VM), 2),
        ("vm-start", (VM,), 1),
        ("vm-run", (VM, "true"), 255),
    ],
)
def test_sound_asked_for_without_the_daemon_fails_the_start(
    tmp_path: Path, tool: str, args: tuple[str, ...], code: int
) -> None:
    """``sound.playback = true`` written in the config: SPEC §6's start failure statuses,
    with the key that lets the VM start named in the hint."""
    cv = make_crosvm_install(
        tmp_path / "i", sound="sound = { playback = true }", sound_device=MISSING
    )
    try:
        started = cv.cmd(tool, *args)
        assert started.returncode == code, started.stderr
        assert b"sound.playback = false" in started.stderr, started.stderr
        assert MISSING.encode() in started.stderr
        cv.wait_supervisor_gone()
        st = cv.status()
        assert st["state"] == "failed"
        assert "sound.playback = false" in st["last_exit"]["reason"]
        assert not any(e["event"] == "launch" for e in cv.seen)  # crosvm never ran
        doctor = cv.cmd("vmsilo", "doctor")
        assert b"cannot start" in doctor.stdout
    finally:
        cv.cmd("vmsilo", "stop", VM)
        cv.close()
