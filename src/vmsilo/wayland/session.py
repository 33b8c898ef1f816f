"""One guest client's connection through the filter, without sockets: bytes and fds in, the
bytes and fds to forward out (SPEC §9.1).

The session follows every object the client and the compositor create (typed new_ids, registry
binds, ``wl_display.delete_id``) so that it can find each message's signature, and therefore its
fds and new objects, and applies :mod:`vmsilo.wayland.policy` on the way:

* ``wl_registry.global`` events for interfaces outside the allowlist are dropped (their versions
  capped to what the XML describes); a bind to a name never offered, to another interface or a
  higher version is a violation;
* ``xdg_toplevel.set_title``/``set_app_id`` are rewritten; a new toplevel is given
  ``[vm]`` and the VM's app_id at once, before the client's first commit;
* ``wl_data_device`` events are dropped (objects they announce stay hidden: a request to one is
  a violation) and its ``set_selection``/``start_drag`` requests too.

A message the client cannot have meant (unknown object, opcode out of range, bad length, string
without NUL, too many fds, a new id outside its range or in use) raises :class:`Violation`:
the caller closes that client's connection and nothing else.

Per message, the common case is a header read and two dict look-ups; only messages with fds,
new objects or a rewrite are decoded.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vmsilo.wayland import policy
from vmsilo.wayland.protocol import Interface, Message
from vmsilo.wayland.wire import (
    MAX_MESSAGE,
    SERVER_ID_BASE,
    NewId,
    Value,
    WireError,
    decode,
    encode,
    header,
)

#: libwayland receives at most 28 fds per ``recvmsg`` (``MAX_FDS_OUT``): never send more.
MAX_FDS_PER_SEND = 28
#: fds that may wait for the rest of their message; more is a client sending fds it should not.
MAX_WAITING_FDS = MAX_FDS_PER_SEND


class Violation(Exception):
    """The guest client broke the protocol or the policy: it loses its connection."""


class UpstreamError(Exception):
    """The compositor sent something the filter cannot follow: the connection ends."""


@dataclass(slots=True)
class Obj:
    iface: Interface
    hidden: bool = False


Chunk = tuple[bytes, list[int]]


class Output:
    """Messages to send, grouped so that no send carries more than 28 fds."""

    __slots__ = ("_data", "_fds", "chunks")

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self._data = bytearray()
        self._fds: list[int] = []

    def add(self, data: bytes | bytearray, fds: list[int] | tuple[()] = ()) -> None:
        if fds and len(self._fds) + len(fds) > MAX_FDS_PER_SEND:
            self._cut()
        self._data += data
        self._fds.extend(fds)

    def _cut(self) -> None:
        if self._data:
            self.chunks.append((bytes(self._data), self._fds))
        self._data = bytearray()
        self._fds = []

    def take(self) -> list[Chunk]:
        self._cut()
        chunks, self.chunks = self.chunks, []
        return chunks


Hook = Callable[["Session", int, Message, list[Value], Output], None]


class Session:
    """The state of one client connection (see the module docstring)."""

    def __init__(self, protocols: dict[str, Interface], labels: policy.Labels) -> None:
        self.protocols = protocols
        self.labels = labels
        self.objects: dict[int, Obj] = {1: Obj(protocols["wl_display"])}
        self.globals: dict[int, tuple[str, int]] = {}
        self._cbuf = bytearray()
        self._cfds: deque[int] = deque()
        self._ubuf = bytearray()
        self._ufds: deque[int] = deque()
        self.toplevel = protocols.get("xdg_toplevel")

    # ----------------------------------------------------------------- feeding

    def from_client(self, data: bytes, fds: list[int]) -> list[Chunk]:
        """What to send the compositor for these bytes of the client's."""
        return self._feed(data, fds, self._cbuf, self._cfds, self._request, Violation)

    def from_upstream(self, data: bytes, fds: list[int]) -> list[Chunk]:
        """What to send the client for these bytes of the compositor's."""
        return self._feed(data, fds, self._ubuf, self._ufds, self._event, UpstreamError)

    def _feed(
        self,
        data: bytes,
        fds: list[int],
        buf: bytearray,
        fdq: deque[int],
        handle: Callable[[bytearray, int, int, int, int, Output], None],
        error: type[Exception],
    ) -> list[Chunk]:
        fdq.extend(fds)
        buf += data
        out = Output()
        pos, n = 0, len(buf)
        try:
            while n - pos >= 8:
                oid, opcode, size = header(buf, pos)
                if size < 8 or size & 3 or size > MAX_MESSAGE:
                    raise error(f"message of {size} bytes")
                if n - pos < size:
                    break
                handle(buf, pos, oid, opcode, size, out)
                pos += size
            if len(fdq) > MAX_WAITING_FDS:
                raise error(f"{len(fdq)} fds without a message")
        except BaseException:
            for chunk in out.take():
                close_fds(chunk[1])
            raise
        finally:
            del buf[:pos]
        return out.take()

    def close(self) -> None:
        """Close the fds still waiting for their messages."""
        close_fds(self._cfds)
        close_fds(self._ufds)
        self._cfds.clear()
        self._ufds.clear()

    # ---------------------------------------------------------------- requests

    def _request(
        self, buf: bytearray, pos: int, oid: int, opcode: int, size: int, out: Output
    ) -> None:
        obj = self.objects.get(oid)
        if obj is None or obj.hidden:
            raise Violation(f"request to unknown object {oid}")
        try:
            msg = obj.iface.requests[opcode]
        except IndexError:
            raise Violation(f"{obj.iface.name}: no request {opcode}") from None
        hook = REQUEST_HOOKS.get((obj.iface.name, msg.name))
        if hook is None and msg.plain:
            out.add(buf[pos : pos + size])
            if msg.destructor and oid >= SERVER_ID_BASE:
                del self.objects[oid]
            return
        try:
            args = decode(msg, bytes(buf[pos + 8 : pos + size]), self._cfds)
        except WireError as e:
            raise Violation(str(e)) from None
        for arg, value in zip(msg.args, args, strict=True):
            if arg.code == "n" and arg.interface is not None:
                assert isinstance(value, NewId)
                self._new_client_object(value.id, arg.interface)
        if hook is not None:
            hook(self, oid, msg, args, out)
        else:
            out.add(buf[pos : pos + size], _fds_of(msg, args))

    def _new_client_object(self, oid: int, interface: str) -> None:
        if not 0 < oid < SERVER_ID_BASE or oid in self.objects:
            raise Violation(f"new id {oid} out of range or in use")
        iface = self.protocols.get(interface)
        if iface is None:
            raise Violation(f"unknown interface {interface}")
        self.objects[oid] = Obj(iface)

    def _bind(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        name, new = args
        assert isinstance(name, int) and isinstance(new, NewId)
        offered = self.globals.get(name)
        if offered is None or offered[0] != new.interface or not 1 <= new.version <= offered[1]:
            raise Violation(f"bind to {new.interface} v{new.version}: not offered")
        self._new_client_object(new.id, offered[0])
        out.add(encode(oid, msg, args)[0])

    def _set_title(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        title = args[0]
        assert title is None or isinstance(title, bytes)
        out.add(encode(oid, msg, [self.labels.title(title or b"")])[0])

    def _set_app_id(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        out.add(encode(oid, msg, [self.labels.app_id.encode()])[0])

    def _get_toplevel(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        out.add(encode(oid, msg, args)[0])
        new = args[0]
        assert isinstance(new, NewId) and self.toplevel is not None
        by_name = {m.name: m for m in self.toplevel.requests}
        out.add(encode(new.id, by_name["set_title"], [self.labels.bare_title.encode()])[0])
        out.add(encode(new.id, by_name["set_app_id"], [self.labels.app_id.encode()])[0])

    def _drop(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        close_fds(_fds_of(msg, args))

    # ------------------------------------------------------------------ events

    def _event(
        self, buf: bytearray, pos: int, oid: int, opcode: int, size: int, out: Output
    ) -> None:
        obj = self.objects.get(oid)
        if obj is None:
            raise UpstreamError(f"event for unknown object {oid}")
        try:
            msg = obj.iface.events[opcode]
        except IndexError:
            raise UpstreamError(f"{obj.iface.name}: no event {opcode}") from None
        silenced = obj.hidden or obj.iface.name in policy.SILENCED_INTERFACES
        hook = EVENT_HOOKS.get((obj.iface.name, msg.name))
        if hook is None and msg.plain and not silenced:
            out.add(buf[pos : pos + size])
            return
        try:
            args = decode(msg, bytes(buf[pos + 8 : pos + size]), self._ufds)
        except WireError as e:
            raise UpstreamError(str(e)) from None
        for arg, value in zip(msg.args, args, strict=True):
            if arg.code == "n" and isinstance(value, NewId):
                iface = self.protocols.get(arg.interface or "")
                if iface is None:
                    raise UpstreamError(f"unknown interface {arg.interface}")
                self.objects[value.id] = Obj(iface, hidden=silenced)
        if silenced:
            close_fds(_fds_of(msg, args))
        elif hook is not None:
            hook(self, oid, msg, args, out)
        else:
            out.add(buf[pos : pos + size], _fds_of(msg, args))

    def _global(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        name, interface, version = args
        assert isinstance(name, int) and isinstance(interface, bytes)
        assert isinstance(version, int)
        iname = interface.decode("ascii", "replace")
        known = self.protocols.get(iname)
        if known is None or not policy.allowed(iname):
            return
        capped = min(version, known.version)
        self.globals[name] = (iname, capped)
        out.add(encode(oid, msg, [name, interface, capped])[0])

    def _global_remove(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        if args[0] in self.globals:
            out.add(encode(oid, msg, args)[0])

    def _delete_id(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        gone = args[0]
        assert isinstance(gone, int)
        self.objects.pop(gone, None)
        out.add(encode(oid, msg, args)[0])


def _fds_of(msg: Message, args: list[Value]) -> list[int]:
    if not msg.nfds:
        return []
    return [v for a, v in zip(msg.args, args, strict=True) if a.code == "h" and isinstance(v, int)]


def close_fds(fds: list[int] | deque[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


REQUEST_HOOKS: dict[tuple[str, str], Hook] = {
    ("wl_registry", "bind"): Session._bind,
    ("xdg_toplevel", "set_title"): Session._set_title,
    ("xdg_toplevel", "set_app_id"): Session._set_app_id,
    ("xdg_surface", "get_toplevel"): Session._get_toplevel,
    **{key: Session._drop for key in policy.DROPPED_REQUESTS},
}
EVENT_HOOKS: dict[tuple[str, str], Hook] = {
    ("wl_registry", "global"): Session._global,
    ("wl_registry", "global_remove"): Session._global_remove,
    ("wl_display", "delete_id"): Session._delete_id,
}
