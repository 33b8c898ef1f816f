#!/usr/bin/env python3
"""Sound latency on a real guest (QEMU; TCG where KVM cannot run): from launching
``vm-run bench aplay tone.wav`` to the first non-silent samples on the host's sink.

A throw-away desktop user runs a real PulseAudio with a null sink (tests/soundenv.py);
``parec --latency-msec=5`` reads its monitor as raw samples and each chunk is stamped as it
arrives. The tone starts at its first sample, so the first chunk holding a sample above the
noise floor marks when the guest's sound reached the host. For reference the same run
measures ``vm-run bench true`` (the command's own cost); the difference is what playing
sound adds (the guest's aplay and PulseAudio start-up, the emulated HDA card, QEMU's pa
stream and the host server). Measured, not asserted.
"""

from __future__ import annotations

import array
import os
import pwd
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchvm import bench_vm

from soundenv import GUEST_TONE, host_pulse

RATE = 44100
THRESHOLD = 1000  # of 32767: far above the null sink's exact silence
N = 10


class Monitor:
    """The sink's monitor as raw s16le mono, every chunk stamped with its arrival time."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE)
        self.first_loud: float | None = None
        self.armed = threading.Event()
        self.heard = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            now = time.perf_counter()
            if not self.armed.is_set() or len(chunk) < 2:
                continue
            samples = array.array("h", chunk[: len(chunk) // 2 * 2])
            if max(abs(s) for s in samples) > THRESHOLD and self.first_loud is None:
                self.first_loud = now
                self.heard.set()

    def arm(self) -> None:
        self.first_loud = None
        self.heard.clear()
        self.armed.set()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def make_user() -> pwd.struct_passwd:
    name = f"vmsilo-b{os.getpid() % 100000}"
    subprocess.run(["userdel", name], capture_output=True, check=False)
    subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    return pwd.getpwnam(name)


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("run as root (it boots a VM)")
    user = make_user()
    try:
        sound_on = "sound = { playback = true }\n"
        with bench_vm(user.pw_name, sound_on) as vm, host_pulse(user) as pulse:
            vm.start()
            p = vm.cmd("vm-run", "bench", "python3", "-c", GUEST_TONE, "/tmp/tone.wav", "1")
            assert p.returncode == 0, p.stderr
            monitor = Monitor(
                pulse.argv(
                    "parec",
                    "-d",
                    "vmsink.monitor",
                    "--raw",
                    "--format=s16le",
                    f"--rate={RATE}",
                    "--channels=1",
                    "--latency-msec=5",
                ),
                pulse.env,
            )
            plain: list[float] = []
            sound: list[float] = []
            try:
                for _ in range(N):
                    t = time.perf_counter()
                    vm.cmd("vm-run", "bench", "true")
                    plain.append(time.perf_counter() - t)
                    monitor.arm()
                    t = time.perf_counter()
                    p = vm.cmd("vm-run", "bench", "aplay", "-q", "/tmp/tone.wav")
                    if not monitor.heard.wait(10) or monitor.first_loud is None:
                        raise SystemExit(f"no sound reached the sink: {p.stderr.decode()}")
                    sound.append(monitor.first_loud - t)
                    monitor.armed.clear()
            finally:
                monitor.close()
        med_plain = statistics.median(plain) * 1000
        med_sound = statistics.median(sound) * 1000
        print(f"vm-run bench true (median of {N}): {med_plain:.0f} ms")
        print(
            f"vm-run bench aplay → first non-silent samples on the host sink (median of {N}):"
            f" {med_sound:.0f} ms (min {min(sound) * 1000:.0f}, max {max(sound) * 1000:.0f})"
        )
        print(f"added by sound (difference of medians): {med_sound - med_plain:+.0f} ms")
    finally:
        subprocess.run(["userdel", user.pw_name], capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
