"""A real PulseAudio on the host for the sound tests and benchmark, as a throw-away desktop
user runs it (recipe: shared/recipes/desktop-headless): a null sink ``vmsink`` whose monitor
records what VMs play, and whose monitor is the default source VMs capture from.

``pulseaudio --daemonize=yes`` returns only once the daemon is up (its parent waits for the
child's start-up verdict), so nothing waits for the socket by polling. Measurements use sox's
``stat``: RMS amplitude and its rough dominant frequency.
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import re
import shutil
import signal
import struct
import subprocess
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SINK = "vmsink"


def tone_wav(path: Path, seconds: float, freq: float = 440.0, rate: int = 44100) -> None:
    """A mono 16-bit sine at half volume."""
    frames = bytearray()
    for i in range(int(seconds * rate)):
        frames += struct.pack("<h", int(0.5 * 32767 * math.sin(2 * math.pi * freq * i / rate)))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))


#: The same tone written by the guest's own Python (the guest has no sox).
GUEST_TONE = (
    "import math, struct, sys, wave\n"
    "secs = float(sys.argv[2]); r = 44100\n"
    "w = wave.open(sys.argv[1], 'wb'); w.setnchannels(1); w.setsampwidth(2); w.setframerate(r)\n"
    "w.writeframes(b''.join(struct.pack('<h', int(16383 * math.sin(2 * math.pi * 440 * i / r)))"
    " for i in range(int(secs * r))))\n"
    "w.close()\n"
)


@dataclass(frozen=True)
class Stat:
    rms: float
    freq: float


def sox_stat(path: Path) -> Stat:
    """RMS and rough frequency of ``path`` after its leading silence (the stream's start-up)."""
    p = subprocess.run(
        ["sox", str(path), "-n", "silence", "1", "0.02", "1%", "stat"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rms = re.search(r"RMS\s+amplitude:\s+([0-9.]+)", p.stderr)
    freq = re.search(r"Rough\s+frequency:\s+(-?[0-9]+)", p.stderr)
    assert rms and freq, p.stderr
    return Stat(float(rms.group(1)), float(freq.group(1)))


def assert_tone(stat: Stat, what: str) -> None:
    """Clearly above silence, and 440 Hz within ±10 %."""
    print(f"[sound] {what}: RMS {stat.rms:.3f}, rough frequency {stat.freq:.0f} Hz")
    assert stat.rms > 0.02, f"{what}: RMS {stat.rms} (silence)"
    assert abs(stat.freq - 440) <= 44, f"{what}: dominant frequency {stat.freq} Hz"


@dataclass
class HostPulse:
    """The user's PulseAudio: started, stopped, recorded from, played into."""

    user: pwd.struct_passwd
    home: Path
    runtime: Path
    pid: int | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.runtime),
            "LANG": "C.UTF-8",
        }

    def argv(self, *argv: str) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.user.pw_uid}",
            f"--regid={self.user.pw_gid}",
            "--clear-groups",
            "--",
            *argv,
        ]

    def start(self) -> None:
        p = subprocess.run(
            self.argv(
                "pulseaudio",
                "--daemonize=yes",
                "-n",
                "--exit-idle-time=-1",
                "--use-pid-file=yes",
                "-L",
                "module-native-protocol-unix",
                "-L",
                f"module-null-sink sink_name={SINK}",
                "-L",
                "module-always-sink",
            ),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        self.pid = int((self.runtime / "pulse" / "pid").read_text())
        assert (self.runtime / "pulse" / "native").is_socket()
        assert (self.home / ".config" / "pulse" / "cookie").is_file()

    def stop(self) -> None:
        """A clean exit (SIGTERM): the server removes its socket, as a logout does."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            pidfd = os.pidfd_open(pid)
            try:
                import select

                select.select([pidfd], [], [], 30)
            finally:
                os.close(pidfd)

    def record(self, out: Path) -> subprocess.Popen[bytes]:
        """``parec`` of the sink's monitor into ``out`` (stop it with :meth:`stop_recording`)."""
        out.touch()
        os.chown(out, self.user.pw_uid, self.user.pw_gid)
        return subprocess.Popen(
            self.argv(
                "parec",
                "-d",
                f"{SINK}.monitor",
                "--file-format=wav",
                "--rate=44100",
                "--channels=1",
                str(out),
            ),
            env=self.env,
            stderr=subprocess.PIPE,
        )

    def play(self, wav: Path) -> subprocess.Popen[bytes]:
        """``paplay`` into the sink (whose monitor is the default source VMs capture)."""
        return subprocess.Popen(
            self.argv("paplay", "-d", SINK, str(wav)), env=self.env, stderr=subprocess.PIPE
        )


def stop_recording(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # parec finishes the WAV header and exits
    proc.wait(timeout=30)


@contextlib.contextmanager
def host_pulse(user: pwd.struct_passwd) -> Iterator[HostPulse]:
    """``user``'s home and runtime dir (as a login makes them) and its PulseAudio."""
    home = Path(user.pw_dir)
    made_home = not home.exists()
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, user.pw_uid, user.pw_gid)
    runtime = Path(f"/run/user/{user.pw_uid}")
    runtime.mkdir(parents=True, exist_ok=True)
    os.chown(runtime, user.pw_uid, user.pw_gid)
    runtime.chmod(0o700)
    pulse = HostPulse(user, home, runtime)
    pulse.start()
    try:
        yield pulse
    finally:
        pulse.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        if made_home:
            shutil.rmtree(home, ignore_errors=True)
