#!/usr/bin/env python3
"""Windows of a real guest (QEMU; TCG where KVM cannot run) on a real headless sway run as a
throw-away desktop user (SPEC §9.1), measured in one run:

1. time from launching ``vm-run bench foot`` on a running VM to the window in sway's tree
   (an IPC ``window`` event subscribed before the launch): the VM's first window, which also
   starts its bridge, then the median of later ones; the host's own ``foot`` for reference;
2. repaint throughput: frames per second of a full-window redraw loop (bench/wl_frames.py, a
   stdlib Wayland client: fill, attach, damage, frame callback, commit) in the guest with the
   filter in the path, then with the host's waypipe client connected straight to the
   compositor (the filter socket swapped for a link to sway's for that run only), and the same
   loop on the host alone (the output refreshes at 60 Hz: that is the ceiling).

Measured, not asserted. The filter's own cost per message is bench/wayland_filter.py's.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from benchvm import bench_vm  # noqa: E402

from desktop import RUN_COMMAND, SUBSCRIBE, Desktop, desktop  # noqa: E402

RUNS = 5
SECONDS = 10
FRAMES = ROOT / "bench" / "wl_frames.py"


def window_time(desk: Desktop, launch: list[str], env: dict[str, str], app_id: str) -> float:
    """Seconds from launching ``launch`` to its window in sway's tree; the window is closed."""
    with desk.ipc() as ipc:
        assert ipc.request(SUBSCRIBE, '["window"]')["success"]
        t = time.perf_counter()
        proc = subprocess.Popen(
            launch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        win = ipc.wait_window(lambda c: c.get("app_id") == app_id, timeout=120, change="new")
        took = time.perf_counter() - t
    with desk.ipc() as ipc:
        ipc.request(RUN_COMMAND, f"[con_id={win['id']}] kill")
    proc.wait(timeout=60)
    return took


def fps(output: str) -> float:
    for line in output.splitlines():
        if line.startswith("fps "):
            return float(line.split()[1])
    raise SystemExit(f"no fps in {output!r}")


def main() -> int:
    name = f"vmsilo-bwl{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    user = pwd.getpwnam(name)
    tmp = Path(f"/tmp/vmsilo-bwl-{os.getpid()}")
    tmp.mkdir()
    try:
        with desktop(user, tmp) as desk:
            more = (
                'image = "benchdesk"\n'
                f'gpu = {{ wayland = true, waylandSocket = "{desk.socket_path}" }}\n'
                '[images.benchdesk]\npackages = ["foot"]\n'
            )
            with bench_vm(user.pw_name, more) as vm:
                return measure(desk, vm)
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(desk: Desktop, vm: object) -> int:
    built = vm.cmd("vmsilo", "image", "build", "benchdesk")  # type: ignore[attr-defined]
    if built.returncode != 0:
        raise SystemExit(built.stderr.decode())
    vm.start()  # type: ignore[attr-defined]
    env = vm.env  # type: ignore[attr-defined]
    vm_run = [sys.executable, "-m", "vmsilo.cli.vm_run", "bench"]
    status = subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vmsilo", "status", "bench", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    app_id = f"vmsilo:bench:{json.loads(status.stdout)['vms'][0]['color']}"
    foot = ["foot", "-T", "bench", "sleep", "600"]
    first = window_time(desk, [*vm_run, *foot], env, app_id)
    guest = [window_time(desk, [*vm_run, *foot], env, app_id) for _ in range(RUNS)]
    host = [window_time(desk, desk.argv(*foot), desk.env(), "foot") for _ in range(RUNS)]
    print(f"time to window, vm-run bench foot: first {first:.2f} s (starts the bridge),")
    print(
        f"  then median of {RUNS}: {statistics.median(guest):.2f} s"
        f" (min {min(guest):.2f}); host foot alone: {statistics.median(host):.2f} s"
    )

    script = FRAMES.read_text()

    def guest_fps() -> float:
        p = subprocess.run(
            [*vm_run, "python3", "-", str(SECONDS)],
            input=script,
            env=env,
            capture_output=True,
            text=True,
            timeout=SECONDS + 120,
        )
        if p.returncode != 0:
            raise SystemExit(p.stderr)
        return fps(p.stdout)

    filtered = guest_fps()
    runtime = Path(f"/run/user/{desk.user.pw_uid}/vmsilo")
    sock = runtime / "bench-wayland.socket"
    aside = runtime / "bench-wayland.socket.aside"
    sock.rename(aside)
    sock.symlink_to(desk.socket_path)  # waypipe's next connection goes straight to sway
    try:
        direct = guest_fps()
    finally:
        sock.unlink()
        aside.rename(sock)
    filtered2 = guest_fps()
    copy = desk.runtime / "wl_frames.py"
    shutil.copy(FRAMES, copy)
    alone = fps(desk.run("python3", str(copy), str(SECONDS), timeout=SECONDS + 60).stdout.decode())
    best = max(filtered, filtered2)
    print(
        f"repaint, full 640x480 window, {SECONDS} s each: guest through the filter"
        f" {filtered:.1f} and {filtered2:.1f} fps, guest with waypipe straight to sway"
        f" {direct:.1f} fps: ratio {best / direct:.2f} (goal >= 0.9);"
        f" host alone {alone:.1f} fps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
