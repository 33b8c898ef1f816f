"""A real headless desktop for the Wayland tests: sway run as a throw-away account, its IPC
spoken directly (i3-ipc framing), clients run as that account, screenshots as PPM.

Readiness is always an event: sway's own ``exec`` writes its socket names into a FIFO the test
reads; windows are awaited through an IPC ``subscribe`` made *before* the client starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import socket
import struct
import subprocess
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vmsilo

SRC = Path(vmsilo.__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
TOOLS = ("sway", "foot", "grim", "wtype", "wl-copy", "wl-paste", "wayland-info")
IPC_MAGIC = b"i3-ipc"
RUN_COMMAND, GET_TREE, SUBSCRIBE = 0, 4, 2


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@dataclass
class Desktop:
    user: pwd.struct_passwd
    runtime: Path
    wayland: str  # the compositor's socket name in ``runtime``
    swaysock: str
    proc: subprocess.Popen[bytes]

    @property
    def socket_path(self) -> str:
        return str(self.runtime / self.wayland)

    def env(self, display: str | None = None, **extra: str) -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.runtime),
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime),
            "WAYLAND_DISPLAY": display or self.wayland,
            **extra,
        }

    def argv(self, *args: str) -> list[str]:
        u = self.user
        return [
            "setpriv",
            f"--reuid={u.pw_uid}",
            f"--regid={u.pw_gid}",
            "--clear-groups",
            "--",
            *args,
        ]

    def popen(self, *args: str, display: str | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args), env=self.env(display), **kw)

    def run(
        self, *args: str, display: str | None = None, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.argv(*args), env=self.env(display), capture_output=True, timeout=timeout, **kw
        )

    def ipc(self) -> SwayIpc:
        return SwayIpc(self.swaysock)

    def keyboard(self) -> subprocess.Popen[bytes]:
        """A keyboard on the seat (wtype's virtual one, held 10 min: the caller kills it), once
        sway has added it. Data devices (wl-copy, wl-paste without data-control) need one:
        started without waiting, a client can race it and find "no keyboard" on the seat."""
        with self.ipc() as ipc:
            assert ipc.request(SUBSCRIBE, '["input"]')["success"]
            kb = self.popen(
                "wtype",
                "-s",
                "600000",
                "-k",
                "Shift_L",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # sway 1.7 announces a virtual keyboard by its keymap ("xkb_keymap", once the seat
            # has it); "added" is what a real device gets
            ipc.wait_event(
                lambda e: (
                    e.get("change") in ("added", "xkb_keymap")
                    and (e.get("input") or {}).get("type") == "keyboard"
                )
            )
        return kb

    def tree_windows(self) -> list[dict[str, Any]]:
        with self.ipc() as ipc:
            return list(windows(ipc.request(GET_TREE)))

    def screenshot(self) -> Ppm:
        p = self.run("grim", "-t", "ppm", "-")
        assert p.returncode == 0, p.stderr
        return Ppm.parse(p.stdout)

    def start_proxy(self, vm: str, color: str, upstream: str | None = None) -> Proxy:
        listen = f"{self.runtime}/vmsilo/{vm}-wayland.socket"
        site = sysconfig.get_paths()["purelib"]
        env = self.env(PYTHONPATH=f"{SRC}:{site}")
        argv = self.argv(
            SYSTEM_PYTHON,
            "-m",
            "vmsilo.wayland.proxy",
            "--vm",
            vm,
            "--color",
            color,
            "--listen",
            listen,
            "--upstream",
            upstream or self.socket_path,
            "--control",
            f"{self.runtime}/vmsilo/{vm}-control.socket",
        )
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready" once it listens (EOF if it failed)
        if line.strip() != b"ready":
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"proxy did not start: {err.decode()}")
        return Proxy(proc, listen, f"{self.runtime}/vmsilo/{vm}-control.socket")


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    listen: str
    control: str

    def stop(self) -> str:
        """Stop it by its pid; its stderr (the log)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=10)
        return err.decode()


class SwayIpc:
    """sway's IPC: ``i3-ipc`` + length + type, JSON payloads."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(30)

    def __enter__(self) -> SwayIpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("sway closed its IPC socket")
            buf += chunk
        return buf

    def read(self) -> tuple[int, Any]:
        head = self._read(14)
        size, kind = struct.unpack("=II", head[6:])
        return kind, json.loads(self._read(size))

    def request(self, kind: int, payload: str = "") -> Any:
        data = payload.encode()
        self.sock.sendall(IPC_MAGIC + struct.pack("=II", len(data), kind) + data)
        return self.read()[1]

    def wait_event(self, match: Callable[[Any], bool], timeout: float = 30) -> Any:
        """After :meth:`request` (SUBSCRIBE, …): the first event ``match`` accepts."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            _kind, event = self.read()
            if isinstance(event, dict) and match(event):
                return event

    def wait_window(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 30, change: str = ""
    ) -> dict[str, Any]:
        """After :meth:`request` (SUBSCRIBE, '["window"]'): the first window event whose
        container ``match`` accepts."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            _kind, event = self.read()
            container = event.get("container") if isinstance(event, dict) else None
            if change and event.get("change") != change:
                continue
            if container and match(container):
                return dict(container)


def windows(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if node.get("type") in ("con", "floating_con") and not node.get("nodes") and node.get("pid"):
        yield node
    for child in [*node.get("nodes", []), *node.get("floating_nodes", [])]:
        yield from windows(child)


@dataclass
class Ppm:
    width: int
    height: int
    pixels: bytes  # RGB

    @classmethod
    def parse(cls, data: bytes) -> Ppm:
        fields: list[bytes] = []
        pos = 0
        while len(fields) < 4:
            while data[pos : pos + 1].isspace():
                pos += 1
            end = pos
            while not data[end : end + 1].isspace():
                end += 1
            fields.append(data[pos:end])
            pos = end
        assert fields[0] == b"P6" and fields[3] == b"255", fields
        w, h = int(fields[1]), int(fields[2])
        return cls(w, h, data[pos + 1 : pos + 1 + 3 * w * h])

    def crop(self, x: int, y: int, w: int, h: int) -> Ppm:
        rows = [
            self.pixels[((y + r) * self.width + x) * 3 : ((y + r) * self.width + x + w) * 3]
            for r in range(h)
        ]
        return Ppm(w, h, b"".join(rows))

    def colours(self) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for i in range(0, len(self.pixels), 3):
            px = self.pixels[i : i + 3]
            out[px] = out.get(px, 0) + 1
        return out


@contextlib.contextmanager
def desktop(user: pwd.struct_passwd, tmp: Path) -> Iterator[Desktop]:
    """sway on a headless 800x600 output, run as ``user``; stopped by its pid afterwards."""
    runtime = Path(f"/run/user/{user.pw_uid}")
    shutil.rmtree(runtime, ignore_errors=True)
    runtime.mkdir(mode=0o700, parents=True)
    os.chown(runtime, user.pw_uid, user.pw_gid)
    fifo = runtime / "ready.fifo"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, user.pw_uid, user.pw_gid)
    cfg = runtime / "sway.cfg"
    cfg.write_text(
        "output HEADLESS-1 resolution 800x600\n"
        "default_border pixel 0\n"
        f"exec sh -c 'echo \"$WAYLAND_DISPLAY $SWAYSOCK\" > {fifo}'\n"
    )
    os.chown(cfg, user.pw_uid, user.pw_gid)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(runtime),
        "XDG_RUNTIME_DIR": str(runtime),
        "WLR_BACKENDS": "headless",
        "WLR_LIBINPUT_NO_DEVICES": "1",
        "WLR_RENDERER": "pixman",
    }
    u = user
    argv = ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups", "--"]
    log = (tmp / "sway.log").open("wb")
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    proc = subprocess.Popen([*argv, "sway", "-c", str(cfg)], env=env, stdout=log, stderr=log)
    try:
        ready, _, _ = select.select([rfd], [], [], 60)
        line = os.read(rfd, 4096).decode().split() if ready else []
        if len(line) != 2:
            raise AssertionError(f"sway did not start: {(tmp / 'sway.log').read_text()[-2000:]}")
        yield Desktop(user, runtime, line[0], line[1], proc)
    finally:
        os.close(rfd)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(runtime, ignore_errors=True)
