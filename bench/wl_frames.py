#!/usr/bin/env python3
"""A full-window redraw loop as a Wayland client, standard library only: ``python3 wl_frames.py
SECONDS [WIDTH HEIGHT]`` prints ``fps <frames per second>``.

Each frame fills the whole shm buffer with a new shade, attaches it, damages all of it,
asks for a frame callback and commits; the next frame is drawn when the compositor says the
last one was shown (and a buffer is free). So the rate is what the path to the compositor
sustains for full repaints, at most the output's refresh. The bench copies this file into the
guest (``vm-run bench python3 - …`` with it on stdin) and runs it on the host for reference.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import sys
import time

XRGB8888 = 1


class Client:
    def __init__(self) -> None:
        display = os.environ.get("WAYLAND_DISPLAY", "wayland-0")
        path = display if display.startswith("/") else f"{os.environ['XDG_RUNTIME_DIR']}/{display}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.next_id = 2
        self.kinds: dict[int, str] = {1: "display"}
        self.buf = b""
        self.globals: dict[str, tuple[int, int]] = {}
        self.done: set[int] = set()
        self.configured: int | None = None
        self.size = (0, 0)
        self.released: set[int] = set()

    def new(self, kind: str) -> int:
        oid = self.next_id
        self.next_id += 1
        self.kinds[oid] = kind
        return oid

    def send(self, oid: int, opcode: int, args: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        msg = struct.pack("=II", oid, ((8 + len(args)) << 16) | opcode) + args
        if fds:
            self.sock.sendmsg(
                [msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds))]
            )
        else:
            self.sock.sendall(msg)

    @staticmethod
    def string(text: str) -> bytes:
        data = text.encode() + b"\0"
        return struct.pack("=I", len(data)) + data + b"\0" * (-len(data) % 4)

    def dispatch(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise SystemExit("the compositor closed the connection")
        self.buf += data
        while len(self.buf) >= 8:
            oid, word = struct.unpack_from("=II", self.buf)
            size, opcode = word >> 16, word & 0xFFFF
            if len(self.buf) < size:
                return
            body, self.buf = self.buf[8:size], self.buf[size:]
            self.event(self.kinds.get(oid, "?"), oid, opcode, body)

    def event(self, kind: str, oid: int, opcode: int, body: bytes) -> None:
        if kind == "display" and opcode == 0:
            _obj, code, n = struct.unpack_from("=III", body)
            raise SystemExit(f"wl_display.error {code}: {body[12 : 12 + n - 1].decode()}")
        if kind == "registry" and opcode == 0:
            name, n = struct.unpack_from("=II", body)
            iface = body[8 : 8 + n - 1].decode()
            (version,) = struct.unpack_from("=I", body, 8 + n + (-n % 4))
            self.globals[iface] = (name, version)
        elif kind == "callback" and opcode == 0:
            self.done.add(oid)
        elif kind == "wm_base" and opcode == 0:
            self.send(oid, 3, body[:4])  # pong
        elif kind == "xdg_surface" and opcode == 0:
            (self.configured,) = struct.unpack_from("=I", body)
        elif kind == "toplevel" and opcode == 0:
            w, h = struct.unpack_from("=ii", body)
            if w > 0 and h > 0:
                self.size = (w, h)
        elif kind == "buffer" and opcode == 0:
            self.released.add(oid)

    def roundtrip(self) -> None:
        cb = self.new("callback")
        self.send(1, 0, struct.pack("=I", cb))
        while cb not in self.done:
            self.dispatch()

    def bind(self, iface: str, kind: str, version: int) -> int:
        name, offered = self.globals[iface]
        oid = self.new(kind)
        args = struct.pack("=I", name) + self.string(iface)
        self.send(self.registry, 0, args + struct.pack("=II", min(version, offered), oid))
        return oid

    def setup(self) -> None:
        self.registry = self.new("registry")
        self.send(1, 1, struct.pack("=I", self.registry))
        self.roundtrip()
        self.compositor = self.bind("wl_compositor", "compositor", 4)
        self.shm = self.bind("wl_shm", "shm", 1)
        self.wm = self.bind("xdg_wm_base", "wm_base", 1)
        self.surface = self.new("surface")
        self.send(self.compositor, 0, struct.pack("=I", self.surface))
        self.xdg = self.new("xdg_surface")
        self.send(self.wm, 2, struct.pack("=II", self.xdg, self.surface))
        self.toplevel = self.new("toplevel")
        self.send(self.xdg, 1, struct.pack("=I", self.toplevel))
        self.send(self.toplevel, 2, self.string("wl-frames"))
        self.send(self.surface, 6)  # commit: ask for the first configure
        while self.configured is None:
            self.dispatch()
        self.send(self.xdg, 4, struct.pack("=I", self.configured))  # ack_configure

    def buffers(self, width: int, height: int) -> list[tuple[int, int]]:
        stride = width * 4
        size = stride * height
        fd = os.memfd_create("wl-frames")
        os.ftruncate(fd, 2 * size)
        self.map = mmap.mmap(fd, 2 * size)
        pool = self.new("pool")
        self.send(self.shm, 0, struct.pack("=Ii", pool, 2 * size), (fd,))
        out = []
        for i in range(2):
            b = self.new("buffer")
            args = struct.pack("=IiiiiI", b, i * size, width, height, stride, XRGB8888)
            self.send(pool, 0, args)
            self.released.add(b)
            out.append((b, i * size))
        self.frame_size = size
        return out


def main(argv: list[str]) -> int:
    seconds = float(argv[1]) if len(argv) > 1 else 5.0
    c = Client()
    c.setup()
    width, height = c.size if c.size != (0, 0) else (640, 480)
    if len(argv) > 3:
        width, height = int(argv[2]), int(argv[3])
    bufs = c.buffers(width, height)
    frames = 0
    start = time.monotonic()
    pending: int | None = None
    while time.monotonic() - start < seconds:
        while (pending is not None and pending not in c.done) or not c.released & {
            b for b, _ in bufs
        }:
            c.dispatch()
        buffer, offset = next((b, o) for b, o in bufs if b in c.released)
        c.released.discard(buffer)
        shade = 32 + frames * 37 % 200
        c.map[offset : offset + c.frame_size] = bytes([shade, 255 - shade, shade // 2, 0]) * (
            c.frame_size // 4
        )
        c.send(c.surface, 1, struct.pack("=Iii", buffer, 0, 0))  # attach
        c.send(c.surface, 9, struct.pack("=iiii", 0, 0, width, height))  # damage_buffer
        pending = c.new("callback")
        c.send(c.surface, 3, struct.pack("=I", pending))  # frame
        c.send(c.surface, 6)  # commit
        frames += 1
    while pending not in c.done:
        c.dispatch()
    took = time.monotonic() - start
    print(f"fps {frames / took:.2f} {width}x{height}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
