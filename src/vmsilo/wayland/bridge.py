"""The desktop user's side of one VM's windows (SPEC §9.1): the filter, and under QEMU the
waypipe client that turns the VM's channel streams back into Wayland connections to it.

One process, run as the desktop user by the VM's supervisor (``python -m vmsilo.wayland.bridge``)
in a process group of its own that the supervisor ends with the VM: the filter runs in this
process, ``waypipe client`` is its child. Every file under the user's runtime directory is
made by this process, as the user — never by root, who would follow whatever the user put
there.

It prints ``ready`` once the sockets accept connections: the filter's is bound before the
waypipe client starts; the client's own appears when waypipe binds it, awaited with inotify
(no polling). If the waypipe client dies, so does this process (the supervisor starts a new
one for the next window); a stale socket of a previous run is removed first (waypipe refuses
to bind over one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from asyncinotify import Inotify, Mask

from vmsilo.wayland import policy, protocol
from vmsilo.wayland.proxy import Proxy

#: How long waypipe may take to bind its socket.
WAYPIPE_START_TIMEOUT = 10.0


class BridgeError(Exception):
    """The bridge could not come up (the message says why)."""


def waypipe_argv(binary: str, socket_path: str) -> list[str]:
    """``waypipe client`` for the VM's streams: no GPU (no render node in VMs' path)."""
    return [binary, "--no-gpu", "--socket", socket_path, "client"]


def start_waypipe(binary: str, socket_path: str, display: str) -> subprocess.Popen[bytes]:
    """Start the waypipe client (Wayland connections to ``display``, the filter) and return
    once it listens on ``socket_path``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    path = Path(socket_path)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/"),
        "XDG_RUNTIME_DIR": str(path.parent),
        "WAYLAND_DISPLAY": display,
        "LANG": "C.UTF-8",
    }
    with Inotify() as inotify:
        inotify.add_watch(path.parent, Mask.CREATE | Mask.MOVED_TO)
        inotify.sync_timeout = WAYPIPE_START_TIMEOUT
        try:
            child = subprocess.Popen(
                waypipe_argv(binary, socket_path), env=env, stdin=subprocess.DEVNULL
            )
        except OSError as e:
            raise BridgeError(f"cannot start {binary}: {e}") from None
        while not path.exists():
            event = inotify.sync_get()
            if child.poll() is not None:
                raise BridgeError(f"waypipe client exited with status {child.returncode}")
            if event is None:
                child.kill()
                child.wait()
                raise BridgeError(f"waypipe client did not listen within {WAYPIPE_START_TIMEOUT} s")
    return child


def run(
    vm: str,
    color: str,
    listen: str,
    upstream: str,
    waypipe: str | None,
    waypipe_socket: str | None,
    control: str | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (0) or until the waypipe client dies (1)."""
    proxy = Proxy(policy.Labels(vm, color), listen, upstream, control=control)
    proxy.bind()
    child: subprocess.Popen[bytes] | None = None
    ended = {"child": False}

    def on_child(_sig: int, _frame: object) -> None:
        if child is not None and child.poll() is not None:
            ended["child"] = True
            proxy.stop()

    signal.signal(signal.SIGTERM, lambda *_: proxy.stop())
    signal.signal(signal.SIGINT, lambda *_: proxy.stop())
    try:
        if waypipe is not None and waypipe_socket is not None:
            child = start_waypipe(waypipe, waypipe_socket, listen)
            signal.signal(signal.SIGCHLD, on_child)
            on_child(0, None)  # it may have died before the handler was there
        print("ready", flush=True)
        proxy.run()
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if waypipe_socket is not None:
            with contextlib.suppress(OSError):
                os.unlink(waypipe_socket)
    if ended["child"]:
        code = child.returncode if child is not None else None
        print(f"vmsilo wayland bridge: waypipe client exited ({code})", file=sys.stderr)
        return 1
    return 0


def become(uid: int, gid: int) -> None:
    """Drop every privilege for the desktop user's, before touching any of their files.

    The supervisor starts the bridge as root and the bridge drops here, after its imports:
    the interpreter and the vmsilo package may live where the user cannot read (a checkout in
    root's home), and nothing the bridge does afterwards needs them on disk."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    os.umask(0o077)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vmsilo.wayland.bridge",
        description="the desktop user's side of a VM's windows (SPEC §9.1); run as that user",
    )
    p.add_argument("--vm", required=True)
    p.add_argument("--color", required=True)
    p.add_argument("--listen", required=True, help="the VM's filter socket")
    p.add_argument("--upstream", required=True, help="the compositor's socket")
    p.add_argument("--waypipe", help="the waypipe program (QEMU path)")
    p.add_argument("--waypipe-socket", help="where the waypipe client listens (QEMU path)")
    p.add_argument("--control", help="the filter's control socket (vm-clipboard)")
    p.add_argument("--uid", type=int, help="become this user first (started by root)")
    p.add_argument("--gid", type=int, help="and this group")
    a = p.parse_args(argv)
    try:
        if a.uid is not None:
            become(a.uid, a.gid if a.gid is not None else a.uid)
        return run(a.vm, a.color, a.listen, a.upstream, a.waypipe, a.waypipe_socket, a.control)
    except (OSError, BridgeError, protocol.ProtocolFileError) as e:
        print(f"vmsilo wayland bridge: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
