"""Registering the filter with the compositor's ``wp_security_context_manager_v1`` (SPEC §9.1
item 4), where it is offered (Debian 12's sway 1.7 does not offer it).

The protocol works on a *listening socket*: the filter creates one (next to the filter socket,
in the user's 0700 directory), hands it to the compositor with the VM's metadata (sandbox engine
``org.vmsilo``, app_id ``vmsilo:<vm>:<color>``, instance ``<vm>``) and then opens every upstream
connection on it; the compositor accepts those and knows them as the VM's. The compositor stops
listening when the filter closes its end of the ``close_fd`` pipe, i.e. when the filter exits.

:meth:`SecurityContext.ensure` probes once per compositor (blocking, a single round trip): when
the compositor is not running yet it tries again at the next client.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable

from vmsilo.wayland.policy import SANDBOX_ENGINE, Labels
from vmsilo.wayland.protocol import Interface
from vmsilo.wayland.wire import NewId, Value, WireError, decode, encode, header

MANAGER = "wp_security_context_manager_v1"
TIMEOUT_S = 5.0


class SecurityContext:
    """The filter's security context, if the compositor offers one."""

    def __init__(
        self,
        protocols: dict[str, Interface],
        labels: Labels,
        path: str,
        log: Callable[[str], None],
    ) -> None:
        self.protocols = protocols
        self.labels = labels
        self.path = path
        self.log = log
        self.probed = False
        self.active = False
        self._close_w: int | None = None

    def ensure(self, upstream: str) -> str:
        """The socket to open upstream connections on: the context's, or the compositor's."""
        if not self.probed:
            try:
                self._setup(upstream)
                self.probed = True
            except (OSError, WireError) as e:
                self.log(f"{self.labels.vm}: security context not set up yet: {e}")
        return self.path if self.active else upstream

    def _setup(self, upstream: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(TIMEOUT_S)
            s.connect(upstream)
            c = _Client(s, self.protocols)
            c.send(1, "wl_display", "get_registry", [NewId(2)], "wl_registry")
            c.send(1, "wl_display", "sync", [NewId(3)], "wl_callback")
            name = None
            for oid, event, args in c.until_done(3):
                if oid == 2 and event == "global" and args[1] == MANAGER.encode():
                    name = args[0]
            if name is None:
                return
            assert isinstance(name, int)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            old = os.umask(0o177)
            try:
                listener.bind(self.path)
            finally:
                os.umask(old)
            listener.listen(64)
            close_r, close_w = os.pipe2(os.O_CLOEXEC)
            try:
                app_id = self.labels.app_id.encode()
                c.send(2, "wl_registry", "bind", [name, NewId(4, MANAGER, 1)], MANAGER)
                c.send(
                    4,
                    MANAGER,
                    "create_listener",
                    [NewId(5), listener.fileno(), close_r],
                    "wp_security_context_v1",
                )
                ctx = "wp_security_context_v1"
                c.send(5, ctx, "set_sandbox_engine", [SANDBOX_ENGINE.encode()])
                c.send(5, ctx, "set_app_id", [app_id])
                c.send(5, ctx, "set_instance_id", [self.labels.vm.encode()])
                c.send(5, ctx, "commit", [])
                c.send(5, ctx, "destroy", [])
                c.send(4, MANAGER, "destroy", [])
                c.send(1, "wl_display", "sync", [NewId(6)], "wl_callback")
                for oid, event, args in c.until_done(6):
                    if oid == 1 and event == "error":
                        raise OSError(f"compositor refused the security context: {args[2]!r}")
            except BaseException:
                os.close(close_w)
                raise
            finally:
                os.close(close_r)
                listener.close()
            self._close_w = close_w
            self.active = True
            self.log(f"{self.labels.vm}: registered with the compositor's security context")

    def close(self) -> None:
        """Let the compositor stop listening, and remove the socket."""
        if self._close_w is not None:
            os.close(self._close_w)
            self._close_w = None
        if self.active:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.active = False


class _Client:
    """Just enough of a blocking Wayland client for the set-up round trips."""

    def __init__(self, sock: socket.socket, protocols: dict[str, Interface]) -> None:
        self.sock = sock
        self.protocols = protocols
        self.objects: dict[int, Interface] = {1: protocols["wl_display"]}
        self.buf = b""
        self.fds: deque[int] = deque()

    def send(
        self, oid: int, interface: str, request: str, args: list[Value], new: str | None = None
    ) -> None:
        msg = next(m for m in self.protocols[interface].requests if m.name == request)
        data, fds = encode(oid, msg, args)
        raw = array.array("i", fds).tobytes()
        self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, raw)] if fds else [])
        if new is not None:
            created = next(a for a in args if isinstance(a, NewId))
            self.objects[created.id] = self.protocols[new]

    def until_done(self, callback: int) -> list[tuple[int, str, list[Value]]]:
        """Every event up to ``wl_callback.done`` of ``callback``."""
        seen: list[tuple[int, str, list[Value]]] = []
        while True:
            while len(self.buf) >= 8:
                oid, opcode, size = header(self.buf, 0)
                if len(self.buf) < size:
                    break
                iface = self.objects.get(oid)
                if iface is None or opcode >= len(iface.events) or size < 8:
                    raise OSError(f"unexpected event for object {oid}")
                msg = iface.events[opcode]
                args = decode(msg, self.buf[8:size], self.fds)
                self.buf = self.buf[size:]
                seen.append((oid, msg.name, args))
                if oid == callback and msg.name == "done":
                    return seen
            data = self.sock.recv(65536)
            if not data:
                raise OSError("the compositor closed the connection")
            self.buf += data
