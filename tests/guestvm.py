"""Test helper: boot a built vmsilo image under QEMU (TCG) with a hand-written argv.

The test side listens on unix sockets and QEMU connects to them (as the supervisor does in
production), so nothing is lost before the test attaches and nothing polls for sockets:

* the console (virtio-console → ``hvc0``), read by a thread into a buffer that tests ``expect``
  on;
* ``org.vmsilo.ready`` (virtserialport), accepted and read the same way;
* QMP (control monitor), accepted on demand.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

QEMU = os.environ.get("VMSILO_TEST_QEMU", "qemu-system-x86_64")


class Stream:
    """A unix-socket listener whose (single) accepted connection is read into a buffer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.buf = bytearray()
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            with self.cond:
                self.closed = True
                self.cond.notify_all()
            return
        with self.cond:
            self.conn = conn
            self.cond.notify_all()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.closed = True
                    self.cond.notify_all()
                    return
                self.buf += data
                self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return self.buf.decode(errors="replace")

    def expect(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the output after offset ``start``."""
        rx = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf.decode(errors="replace"), start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    tail = self.buf.decode(errors="replace")[-3000:]
                    why = "closed" if self.closed else f"timed out after {timeout} s"
                    raise AssertionError(f"{pattern!r} not seen ({why}); output tail:\n{tail}")
                self.cond.wait(left)

    def mark(self) -> int:
        with self.cond:
            return len(self.buf.decode(errors="replace"))

    def send(self, data: str | bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.conn is None and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.path}: QEMU never connected")
                self.cond.wait(left)
            conn = self.conn
        assert conn is not None, f"{self.path}: closed"
        conn.sendall(data.encode() if isinstance(data, str) else data)

    def close(self) -> None:
        for s in (self.conn, self.listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


class GuestVM:
    """One QEMU guest booted from ``image_dir`` (vmlinuz, initrd.img, root.erofs)."""

    def __init__(
        self,
        image_dir: Path,
        workdir: Path,
        params: list[str],
        *,
        overlay: str = "raw",
        memory: int = 512,
        extra_args: list[str] | None = None,
        ports: str = "multiport",
    ) -> None:
        self.image_dir = image_dir
        self.work = workdir
        self.work.mkdir(parents=True, exist_ok=True)
        self.params = params
        self.overlay = overlay
        self.memory = memory
        self.extra_args = extra_args or []
        #: "multiport": console and org.vmsilo.ready on one virtio-serial device (what vmsilo's
        #: QEMU argv does); "single": each on a device of its own without the multiport
        #: feature, as upstream crosvm makes every --serial hardware=virtio-console (the guest
        #: then sees two unnamed hvc consoles)
        self.ports = ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = 0.0

    def argv(self) -> list[str]:
        w, img = self.work, self.image_dir
        append = ["console=hvc0", "panic=-1", "quiet", *self.params]
        if self.overlay == "raw":
            append.append("vmsilo.rootOverlay=raw,ephemeral")
        else:
            append.append("vmsilo.rootOverlay=tmpfs")
        argv = [
            QEMU,
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-machine",
            "q35",
            "-m",
            str(self.memory),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(img / "vmlinuz"),
            "-initrd",
            str(img / "initrd.img"),
            "-append",
            " ".join(append),
            "-drive",
            f"file={img / 'root.erofs'},if=none,id=root,format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=root",
        ]
        if self.overlay == "raw":
            argv += [
                "-drive",
                f"file={w / 'ephemeral.raw'},if=none,id=ephemeral,format=raw,cache=unsafe",
                "-device",
                "virtio-blk-pci,drive=ephemeral,serial=ephemeral",
            ]
        chardevs = [
            "-chardev",
            f"socket,id=con,path={w / 'console.sock'}",
            "-chardev",
            f"socket,id=ready,path={w / 'ready.sock'}",
        ]
        argv += chardevs
        if self.ports == "single":
            argv += [
                "-device",
                "virtio-serial-pci,id=vser0,max_ports=1",
                "-device",
                "virtconsole,bus=vser0.0,chardev=con",
                "-device",
                "virtio-serial-pci,id=vser1,max_ports=1",
                "-device",
                "virtconsole,bus=vser1.0,chardev=ready,name=org.vmsilo.ready",
                # the agent's transport (crosvm's would be vsock, which this host lacks)
                "-chardev",
                f"socket,id=channel,path={w / 'channel.sock'}",
                "-device",
                "virtio-serial-pci,id=vser2",
                "-device",
                "virtserialport,bus=vser2.0,nr=1,chardev=channel,name=org.vmsilo.channel",
            ]
        else:
            argv += [
                "-device",
                "virtio-serial-pci,id=vser",
                "-device",
                "virtconsole,chardev=con",
                "-device",
                "virtserialport,chardev=ready,name=org.vmsilo.ready",
            ]
        argv += [
            "-chardev",
            f"socket,id=qmp,path={w / 'qmp.sock'}",
            "-mon",
            "chardev=qmp,mode=control",
            *self.extra_args,
        ]
        return argv

    def start(self) -> GuestVM:
        if self.overlay == "raw":
            disk = self.work / "ephemeral.raw"
            disk.unlink(missing_ok=True)
            with open(disk, "wb") as f:
                f.truncate(10 * 1024**3)  # fresh sparse disk, as the supervisor makes it
        for name in ("console.sock", "ready.sock", "channel.sock", "qmp.sock"):
            (self.work / name).unlink(missing_ok=True)
        self.console = Stream(self.work / "console.sock")
        self.ready = Stream(self.work / "ready.sock")
        self.channel = Stream(self.work / "channel.sock") if self.ports == "single" else None
        self.qmp_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.qmp_listener.bind(str(self.work / "qmp.sock"))
        self.qmp_listener.listen(1)
        self.qmp_conn: socket.socket | None = None
        self.t0 = time.monotonic()
        with open(self.work / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    # -- console helpers --
    def wait_shell(self, timeout: float = 120) -> float:
        """Wait for the autologin shell's prompt; returns seconds since QEMU started."""
        self.console.expect(r"vmsilo-init: \[.*\] ready", timeout)
        self.run_console("true", timeout=timeout)
        return time.monotonic() - self.t0

    _seq = 0

    def run_console(self, command: str, timeout: float = 30) -> str:
        """Type ``command`` on the console shell; return its output (between markers)."""
        GuestVM._seq += 1
        n = GuestVM._seq
        start = self.console.mark()
        # The markers are computed by the shell so the echoed command line never matches.
        self.console.send(f"echo BEGIN$((1000+{n})); {command}; echo END$((1000+{n}))\n")
        m = self.console.expect(rf"BEGIN{1000 + n}\r?\n(.*?)END{1000 + n}", timeout, start=start)
        return m.group(1).replace("\r\n", "\n")

    # -- QMP --
    def qmp(self, command: str, timeout: float = 10, **arguments: object) -> dict[str, object]:
        if self.qmp_conn is None:
            self.qmp_listener.settimeout(timeout)
            self.qmp_conn, _ = self.qmp_listener.accept()
            self.qmp_conn.settimeout(timeout)
            self.qmp_file = self.qmp_conn.makefile("rwb", buffering=0)
            json.loads(self.qmp_file.readline())  # greeting
            self._qmp_send("qmp_capabilities", {})
        return self._qmp_send(command, arguments)

    def _qmp_send(self, command: str, arguments: dict[str, object]) -> dict[str, object]:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.qmp_file.write(json.dumps(msg).encode() + b"\n")
        while True:
            reply: dict[str, object] = json.loads(self.qmp_file.readline())
            if "return" in reply or "error" in reply:
                return reply

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for s in (getattr(self, n, None) for n in ("console", "ready", "channel")):
            if s is not None:
                s.close()
        if getattr(self, "qmp_conn", None) is not None:
            assert self.qmp_conn is not None
            self.qmp_conn.close()
        if hasattr(self, "qmp_listener"):
            self.qmp_listener.close()

    def __enter__(self) -> GuestVM:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and hasattr(self, "console"):
            print("---- guest console ----\n" + self.console.text()[-6000:])
        self.stop()


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None
