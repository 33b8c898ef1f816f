"""Sound end to end (SPEC §9.2): real QEMU guests, a real PulseAudio of a throw-away desktop
user on the host, tones measured with sox.

- playback: a 440 Hz tone played in the guest by ``aplay`` (ALSA) and by ``paplay``
  (PulseAudio) arrives on the host's null sink; the VM has no capture device at all;
- capture: a tone played into the host's sink (whose monitor is the default source) is
  recorded in the guest by ``arecord``;
- the host's audio server goes away while the guest plays: the VM runs on, ``vm-run`` works,
  ``status`` says sound is unavailable; a VM started without a server starts (QEMU on
  ``-audiodev none`` with the same card) and says so too.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soundenv import (
    GUEST_TONE,
    HostPulse,
    assert_tone,
    host_pulse,
    sox_stat,
    stop_recording,
    tone_wav,
)
from userenv import Setup

pytestmark = pytest.mark.vm


def write_config(run_dir: Path, state_dir: Path, user: pwd.struct_passwd) -> Path:
    config = run_dir / "vmsilo.toml"
    config.write_text(
        f"""
user = "{user.pw_name}"
stateDir = "{state_dir}"
runtimeDir = "{run_dir}"
startTimeout = 180
stopTimeout = 30
[qemu]
accel = "tcg"
[vms.play]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
sound = {{ playback = true }}
[vms.cap]
hypervisor = "qemu"
memory = 512
cpus = 1
sharedHome = false
sound = {{ capture = true }}
"""
    )
    config.chmod(0o644)
    return config


class Sound:
    """The setup of this module: the config, the host's PulseAudio, helpers."""

    def __init__(self, setup: Setup, pulse: HostPulse, work: Path) -> None:
        self.setup = setup
        self.pulse = pulse
        self.work = work

    def run(self, vm: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.setup.as_user("vm-run", vm, *argv)

    def status(self, vm: str) -> dict[str, Any]:
        p = self.setup.as_root("vmsilo", "status", vm, "--json")
        assert p.returncode == 0, p.stderr
        row: dict[str, Any] = json.loads(p.stdout)["vms"][0]
        return row

    def background(self, vm: str, *argv: str) -> subprocess.Popen[bytes]:
        """``vm-run vm argv…`` (as root) left running."""
        return subprocess.Popen(
            [sys.executable, "-m", "vmsilo.cli.vm_run", vm, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, VMSILO_CONFIG=str(self.setup.config)),
        )

    def start(self, vm: str) -> None:
        p = self.setup.as_root("vmsilo", "start", vm)
        assert p.returncode == 0, p.stderr

    def stop(self, vm: str) -> None:
        self.setup.as_root("vmsilo", "stop", vm)


@pytest.fixture(scope="module")
def snd(image: Any, state_dir: Path, host_user: pwd.struct_passwd) -> Iterator[Sound]:
    run_dir = Path(f"/tmp/vmsilo-sound-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o755)
    config = write_config(run_dir, state_dir, host_user)
    try:
        with host_pulse(host_user) as pulse:
            sound = Sound(Setup(config, run_dir, host_user), pulse, run_dir)
            try:
                yield sound
            finally:
                for vm in ("play", "cap"):
                    sound.stop(vm)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def guest_tone(snd: Sound, vm: str, path: str, seconds: float) -> None:
    p = snd.run(vm, "python3", "-c", GUEST_TONE, path, str(seconds))
    assert p.returncode == 0, p.stderr


def recorded_while(snd: Sound, name: str, vm: str, *argv: str) -> Path:
    """What reached the host's sink while ``vm-run vm argv…`` ran."""
    out = snd.work / f"{name}.wav"
    rec = snd.pulse.record(out)
    try:
        p = snd.run(vm, *argv)
        assert p.returncode == 0, (p.stdout, p.stderr)
    finally:
        stop_recording(rec)
    return out


def test_playback_reaches_the_host_sink(snd: Sound) -> None:
    snd.start("play")
    argv = snd.setup.as_root("vmsilo", "argv", "play")
    assert argv.returncode == 0, argv.stderr
    words = json.loads(argv.stdout)
    assert f"pa,id=snd0,server=unix:{snd.pulse.runtime}/pulse/native" in words
    assert "hda-output,bus=hda0.0,audiodev=snd0,mixer=off" in words
    assert snd.status("play")["sound"] == "playback"
    guest_tone(snd, "play", "/tmp/tone.wav", 3)
    # ALSA: the default device is the guest's PulseAudio
    wav = recorded_while(snd, "aplay", "play", "aplay", "-q", "/tmp/tone.wav")
    assert_tone(sox_stat(wav), "aplay in the guest")
    # PulseAudio directly
    wav = recorded_while(snd, "paplay", "play", "paplay", "/tmp/tone.wav")
    assert_tone(sox_stat(wav), "paplay in the guest")


def test_no_capture_device_unless_asked(snd: Sound) -> None:
    snd.start("play")
    p = snd.run("play", "arecord", "-l")
    # the card is there (aplay lists it), but it has no capture device at all
    assert "card 0" not in p.stdout, p.stdout
    listed = snd.run("play", "aplay", "-l")
    assert listed.returncode == 0 and "card 0" in listed.stdout, listed.stdout + listed.stderr


def test_capture_records_the_host_source(snd: Sound) -> None:
    snd.start("cap")
    assert snd.status("cap")["sound"] == "playback and capture"
    p = snd.run("cap", "arecord", "-l")
    assert p.returncode == 0 and "card 0" in p.stdout, p.stdout + p.stderr
    tone = snd.work / "host-tone.wav"
    tone_wav(tone, 12)
    os.chown(tone, snd.pulse.user.pw_uid, snd.pulse.user.pw_gid)
    player = snd.pulse.play(tone)
    try:
        rec = snd.run(
            "cap",
            "arecord",
            "-q",
            "-d",
            "4",
            "-f",
            "S16_LE",
            "-r",
            "44100",
            "-c",
            "1",
            "/tmp/rec.wav",
        )
        assert rec.returncode == 0, rec.stderr
    finally:
        player.terminate()
        player.wait(timeout=30)
    got = snd.setup.as_root("vm-run", "cap", "base64", "/tmp/rec.wav")
    assert got.returncode == 0, got.stderr
    wav = snd.work / "guest-rec.wav"
    wav.write_bytes(base64.b64decode(got.stdout))
    assert_tone(sox_stat(wav), "arecord in the guest")
    snd.stop("cap")


def test_host_audio_server_going_away(snd: Sound) -> None:
    """Last: stops the host's server. The playing guest runs on; a new start works too."""
    snd.start("play")
    guest_tone(snd, "play", "/tmp/long.wav", 20)
    player = snd.background("play", "aplay", "-q", "/tmp/long.wav")
    # the guest plays (what reaches the sink proves it) while the server goes
    wav = recorded_while(snd, "before-stop", "play", "sh", "-c", "sleep 2")
    assert_tone(sox_stat(wav), "the guest's tone before the server stopped")
    snd.pulse.stop()
    p = snd.run("play", "echo", "still here")
    assert (p.returncode, p.stdout) == (0, "still here\n"), p.stderr
    st = snd.status("play")
    assert st["state"] == "running"
    assert st["sound"] == f"unavailable: no audio server at {snd.pulse.runtime}/pulse/native"
    player.kill()
    player.wait(timeout=30)
    p = snd.run("play", "true")
    assert p.returncode == 0, p.stderr
    # no server at start: QEMU plays into nothing behind the same card, and the VM starts
    snd.stop("play")
    snd.start("play")
    argv = json.loads(snd.setup.as_root("vmsilo", "argv", "play").stdout)
    assert "none,id=snd0" in argv and "hda-output,bus=hda0.0,audiodev=snd0,mixer=off" in argv
    assert snd.status("play")["sound"].startswith("unavailable: no audio server at")
    listed = snd.run("play", "aplay", "-l")
    assert "card 0" in listed.stdout, listed.stdout + listed.stderr
    doctor = snd.setup.as_root("vmsilo", "doctor")
    assert "no PulseAudio/PipeWire-pulse socket" in doctor.stdout, doctor.stdout
