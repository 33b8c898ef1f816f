"""vmsilo.guest.dhcp_restart on real processes: a restored guest's DHCP clients (named by their
pid files) are stopped and started again with the same argv; a pid file naming anything but a
udhcpc is left alone. (The real udhcpc in a restored guest: tests/test_fast_start_netvm.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmsilo.guest.dhcp_restart import dhcp_clients, restart_dhcp_clients

#: A stand-in for ``busybox udhcpc -f ... -p PIDFILE``: writes its pid file, logs its start,
#: then waits for a signal.
FAKE = """import os, signal, sys
pid_file = sys.argv[sys.argv.index("-p") + 1]
with open(pid_file, "w") as f:
    f.write(f"{os.getpid()}\\n")
with open(sys.argv[sys.argv.index("--log") + 1], "a") as f:
    f.write(f"{os.getpid()}\\n")
signal.pause()
"""


def test_clients_restart_with_their_own_argv(tmp_path: Path) -> None:
    script = tmp_path / "udhcpc"
    script.write_text(FAKE)
    log = tmp_path / "starts"
    argv = [sys.executable, str(script), "-f", "-i", "lan", "-p", str(tmp_path / "udhcpc.lan.pid")]
    argv += ["--log", str(log)]
    old = subprocess.Popen(argv)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "udhcpc.other.pid").write_text(f"{other.pid}\n")  # not a udhcpc
        (tmp_path / "udhcpc.stale.pid").write_text("999999999\n")  # no such process
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dhcp_clients(tmp_path) == [(old.pid, argv)]

        [new] = restart_dhcp_clients(tmp_path)
        assert old.wait(timeout=5) == -signal.SIGTERM
        assert new != old.pid
        # (its command line reads empty until its exec is through: wait until it ran)
        while len(log.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text().split() == [str(old.pid), str(new)]
        assert Path(f"/proc/{new}/cmdline").read_bytes().split(b"\0")[:-1] == [
            a.encode() for a in argv
        ]
        assert other.poll() is None  # the process of a foreign pid file was not touched
        assert dhcp_clients(tmp_path) == [(new, argv)]
    finally:
        for pid in [p for p, _ in dhcp_clients(tmp_path)]:
            os.kill(pid, signal.SIGKILL)
        other.kill()
        old.kill()
        other.wait()
        old.wait()
