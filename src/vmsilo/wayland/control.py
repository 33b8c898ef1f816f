"""The filter's control socket: what ``vm-clipboard`` asks a VM's filter (SPEC §9.4).

``/run/user/<uid>/vmsilo/<vm>-control.socket`` (0600, in the user's 0700 directory: only the
desktop user reaches it). One request per connection, a JSON line; the answer a JSON line, with
the selection's bytes after it for ``copy``:

* ``{"op": "focus"}`` → ``{"ok": true, "focused": bool}`` — a window of the VM has keyboard
  focus (so ``vm-clipboard`` without a VM name picks that VM, as Qubes' Ctrl-Shift-C/V do);
* ``{"op": "copy"}`` → ``{"ok": true, "mime": M, "size": N}`` + N bytes — the VM's selection,
  written by the guest program that owns it (at most :data:`MAX_CLIPBOARD` bytes, within
  :data:`COPY_TIMEOUT`);
* ``{"op": "paste", "mime": M, "size": N}`` + N bytes → ``{"ok": true}`` — the VM's selection
  becomes those bytes.

"Selection" here is the VM's clipboard only: the primary selection (middle-click paste) stays
inside its VM and no request reaches it.

Each connection is served by a thread; the clipboard itself is only touched on the filter's
loop (:meth:`vmsilo.wayland.proxy.Proxy.call`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from vmsilo.wayland.clipboard import Selection
from vmsilo.wayland.policy import Labels

T = TypeVar("T")


class Proxy(Protocol):
    """What the control socket needs of the filter (:class:`vmsilo.wayland.proxy.Proxy`)."""

    clipboard: Selection
    labels: Labels

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T: ...


#: The largest selection that crosses (text, or one image).
MAX_CLIPBOARD = 16 << 20
#: How long the guest program that owns the selection may take to write it.
COPY_TIMEOUT = 10.0
MAX_REQUEST = 4096


def listen_private(path: str, backlog: int) -> socket.socket:
    """A listening Unix socket at ``path`` (a stale one replaced) that only its owner can
    connect to: 0600 from the moment it exists (bound under umask 0177)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.listen(backlog)
    return s


class ControlError(Exception):
    """A request that cannot be served (the message goes back to the asker)."""


class ControlServer:
    def __init__(self, proxy: Proxy, path: str) -> None:
        self.proxy = proxy
        self.path = path
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self.sock = listen_private(self.path, 8)
        s = self.sock
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(COPY_TIMEOUT + 5)
            reader = conn.makefile("rb")
            try:
                request = json.loads(reader.readline(MAX_REQUEST) or b"null")
                if not isinstance(request, dict):
                    raise ControlError("bad request")
                answer, data = self._answer(request, reader)
            except (ControlError, TimeoutError, RuntimeError, ValueError) as e:
                answer, data = {"ok": False, "error": str(e)}, b""
            except OSError:
                return
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n" + data)

    def _answer(self, request: dict[str, Any], reader: Any) -> tuple[dict[str, Any], bytes]:
        clipboard = self.proxy.clipboard
        op = request.get("op")
        if op == "focus":
            return {"ok": True, "focused": self.proxy.call(lambda: clipboard.focused)}, b""
        if op == "copy":
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                mime = self.proxy.call(lambda: clipboard.request(w))
                if mime is None:
                    raise ControlError(f"nothing is selected in {self.proxy.labels.vm}")
                data = read_pipe(r, MAX_CLIPBOARD, COPY_TIMEOUT)
            finally:
                os.close(r)
            return {"ok": True, "mime": mime.decode("ascii", "replace"), "size": len(data)}, data
        if op == "paste":
            mime, size = request.get("mime"), request.get("size")
            if not isinstance(mime, str) or not mime.isprintable() or len(mime) > 200:
                raise ControlError("bad mime type")
            if not isinstance(size, int) or not 0 <= size <= MAX_CLIPBOARD:
                raise ControlError(f"a selection is at most {MAX_CLIPBOARD} bytes")
            data = reader.read(size)
            if len(data) != size:
                raise ControlError("the selection was cut short")
            self.proxy.call(lambda: clipboard.set_host(mime.encode(), data))
            return {"ok": True}, b""
        raise ControlError(f"unknown request {str(op)[:40]!r}")


def read_pipe(fd: int, limit: int, timeout: float) -> bytes:
    """Everything written to ``fd`` until EOF: at most ``limit`` bytes within ``timeout``."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ControlError(f"the program holding the selection did not give it in {timeout} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        size += len(data)
        if size > limit:
            raise ControlError(f"the selection is larger than {limit} bytes")
        chunks.append(data)
