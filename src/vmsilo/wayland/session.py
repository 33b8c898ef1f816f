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
* the compositor's ``wl_data_device`` and primary selection device events are dropped
  (objects they announce stay hidden: a request to one is a violation) and ``start_drag`` too;
  ``set_selection`` of either kind goes to the VM's own selection of that kind
  (:mod:`vmsilo.wayland.clipboard`), never to the compositor, and the VM's clients get the VM's
  selections offered by the filter itself when they have keyboard focus;
* the compositor's own offers (the host's selections, a host drag over a VM window) are
  destroyed upstream once the compositor has said what they are for, as a client that ignores
  them would: else the compositor keeps one object per host selection change per connection.

Ids in the compositor's range (``0xff000000`` up) are *translated*: the client sees the
compositor's visible objects and the filter's own offers numbered densely in one sequence, as
libwayland requires (a client refuses a new server id beyond the next free one, so hidden
objects must not leave gaps and the filter's offers must not collide with the compositor's).

A message the client cannot have meant (unknown object, opcode out of range, bad length, string
without NUL, too many fds, a new id outside its range or in use) raises :class:`Violation`:
the caller closes that client's connection and nothing else.

Per message, the common case is a header read and two dict look-ups; only messages with fds,
new objects or a rewrite are decoded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from vmsilo.wayland import policy
from vmsilo.wayland.clipboard import CLIPBOARD, KINDS, PRIMARY, Kind, Selection
from vmsilo.wayland.host_offers import OFFER_KINDS, HostOffers
from vmsilo.wayland.output import MAX_FDS_PER_SEND, Chunk, Output, close_chunks, close_fds
from vmsilo.wayland.protocol import Arg, Interface, Message
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


@dataclass(slots=True)
class Held:
    """What one connection holds of one of the VM's selections: the selection itself (shared by
    the VM's connections), the client's devices and its sources with their mime types."""

    selection: Selection
    devices: set[int] = field(default_factory=set)
    sources: dict[int, list[bytes]] = field(default_factory=dict)


#: interface name → the selection kind it belongs to
KIND_OF: dict[str, Kind] = {
    iface: k for k in KINDS for iface in (k.manager, k.device, k.source, k.offer)
}

Hook = Callable[["Session", int, Message, list[Value], Output], None]


class Session:
    """The state of one client connection (see the module docstring)."""

    def __init__(
        self,
        protocols: dict[str, Interface],
        labels: policy.Labels,
        clipboard: Selection | None = None,
        primary: Selection | None = None,
    ) -> None:
        self.protocols = protocols
        self.labels = labels
        self.objects: dict[int, Obj] = {1: Obj(protocols["wl_display"])}
        self.globals: dict[int, tuple[str, int]] = {}
        self._cbuf = bytearray()
        self._cfds: deque[int] = deque()
        self._ubuf = bytearray()
        self._ufds: deque[int] = deque()
        self.toplevel = protocols.get("xdg_toplevel")
        #: compositor-range ids: the compositor's visible objects ↔ the client's numbers
        self.up2cl: dict[int, int] = {}
        self.cl2up: dict[int, int] = {}
        #: the filter's own objects in the client's compositor range (its selection offers)
        self.local: dict[int, Kind] = {}
        self._srv_next = SERVER_ID_BASE
        self._srv_free: list[int] = []
        #: the VM's selections (shared by the VM's connections) and what it needs of this one
        self.held: dict[str, Held] = {
            CLIPBOARD.name: Held(clipboard if clipboard is not None else Selection(CLIPBOARD)),
            PRIMARY.name: Held(primary if primary is not None else Selection(PRIMARY)),
        }
        #: the compositor's offers the client never sees, still alive upstream
        self.host_offers = HostOffers()
        #: requests the filter itself sends the compositor (:meth:`take_upstream`)
        self._upstream = Output()
        self.focused = False  # one of its surfaces has keyboard focus
        #: sends messages the filter makes itself to this client (set by the proxy)
        self.inject: Callable[[list[Chunk]], None] = close_chunks
        for held in self.held.values():
            held.selection.join(self)

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

    def take_upstream(self) -> list[Chunk]:
        """Requests of the filter's own for the compositor, made while reading its events
        (destroying the host's offers): the proxy sends them after what :meth:`from_upstream`
        returned went to the client."""
        return self._upstream.take()

    def close(self) -> None:
        """Close the fds still waiting for their messages; leave the VM's selections."""
        for held in self.held.values():
            held.selection.leave(self)
        close_fds(self._cfds)
        close_fds(self._ufds)
        self._cfds.clear()
        self._ufds.clear()

    # ---------------------------------------------------------------- requests

    def _request(
        self, buf: bytearray, pos: int, oid: int, opcode: int, size: int, out: Output
    ) -> None:
        up = oid
        if oid >= SERVER_ID_BASE:
            if oid in self.local:
                self._local_request(buf, pos, oid, opcode, size)
                return
            mapped = self.cl2up.get(oid)
            if mapped is None:
                raise Violation(f"request to unknown object {oid}")
            up = mapped
        obj = self.objects.get(up)
        if obj is None or obj.hidden:
            raise Violation(f"request to unknown object {oid}")
        try:
            msg = obj.iface.requests[opcode]
        except IndexError:
            raise Violation(f"{obj.iface.name}: no request {opcode}") from None
        hook = REQUEST_HOOKS.get((obj.iface.name, msg.name))
        translate = up != oid or (msg.objects and bool(self.cl2up or self.local))
        if hook is None and msg.plain and not translate:
            out.add(buf[pos : pos + size])
            return
        try:
            args = decode(msg, bytes(buf[pos + 8 : pos + size]), self._cfds)
        except WireError as e:
            raise Violation(str(e)) from None
        for arg, value in zip(msg.args, args, strict=True):
            if arg.code == "n" and arg.interface is not None:
                assert isinstance(value, NewId)
                self._new_client_object(value.id, arg.interface)
        if translate:
            pairs = zip(msg.args, args, strict=True)
            args = [self._upstream_ref(a, v) if a.code == "o" else v for a, v in pairs]
        if hook is not None:
            hook(self, up, msg, args, out)
        else:
            out.add(*encode(up, msg, args))
        if msg.destructor and oid >= SERVER_ID_BASE:
            self._forget_server(oid)

    def _upstream_ref(self, arg: Arg, value: Value) -> Value:
        """An object argument of the client's, in the compositor's numbers."""
        if not isinstance(value, int) or value < SERVER_ID_BASE:
            return value
        mapped = self.cl2up.get(value)
        if mapped is None:  # one of the filter's own offers, or nothing: not the compositor's
            raise Violation(f"{arg.name}: object {value} is not the compositor's")
        return mapped

    def _client_ref(self, arg: Arg, value: Value) -> Value | _Drop:
        """An object argument of the compositor's, in the client's numbers (or drop the
        message: it names an object the client never saw)."""
        if not isinstance(value, int) or value < SERVER_ID_BASE:
            return value
        mapped = self.up2cl.get(value)
        if mapped is not None:
            return mapped
        return 0 if arg.nullable else DROP

    def _alloc_server_id(self) -> int:
        if self._srv_free:
            return self._srv_free.pop()
        oid = self._srv_next
        self._srv_next += 1
        return oid

    def _forget_server(self, cl: int) -> None:
        up = self.cl2up.pop(cl, None)
        if up is not None:
            self.up2cl.pop(up, None)
            self.objects.pop(up, None)
        self._srv_free.append(cl)

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

    # ---------------------------------------------------- the VM's own selections

    def _held_of(self, oid: int) -> tuple[Kind, Held]:
        kind = KIND_OF[self.objects[oid].iface.name]
        return kind, self.held[kind.name]

    def _get_device(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        kind, held = self._held_of(oid)
        new = args[0]
        assert isinstance(new, NewId)
        held.devices.add(new.id)
        out.add(*encode(oid, msg, args))  # the compositor's device: its events stay silenced
        offers = held.selection.current()
        if self.focused and offers is not None:  # as a compositor does for a focused client
            self.offer_selection(kind, offers, devices=[new.id])

    def _create_source(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        _, held = self._held_of(oid)
        new = args[0]
        assert isinstance(new, NewId)
        held.sources[new.id] = []
        out.add(*encode(oid, msg, args))

    def _source_offer(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        _, held = self._held_of(oid)
        mime = args[0]
        offered = held.sources.get(oid)
        if isinstance(mime, bytes) and offered is not None and len(offered) < MAX_MIME_TYPES:
            offered.append(mime)
        out.add(*encode(oid, msg, args))

    def _source_destroy(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        _, held = self._held_of(oid)
        held.sources.pop(oid, None)
        held.selection.source_gone(self, oid)
        out.add(*encode(oid, msg, args))

    def _device_gone(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        _, held = self._held_of(oid)
        held.devices.discard(oid)
        out.add(*encode(oid, msg, args))

    def _set_selection(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        """The VM's selection changes; the compositor never hears of it (SPEC §9.1, 3)."""
        _, held = self._held_of(oid)
        source = args[0]
        assert isinstance(source, int)
        if source and source not in held.sources:
            raise Violation(f"set_selection with unknown source {source}")
        held.selection.set_selection(self, source, held.sources.get(source, []))

    def _keyboard_enter(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        self.focused = True
        for kind in KINDS:
            selection = self.held[kind.name].selection
            selection.focus_changed()
            offers = selection.current()
            if offers is not None:
                self.offer_selection(kind, offers, out)  # before enter, as compositors do
        out.add(*encode(oid, msg, args))

    def _keyboard_leave(self, oid: int, msg: Message, args: list[Value], out: Output) -> None:
        self.focused = False
        for held in self.held.values():
            held.selection.focus_changed()
        out.add(*encode(oid, msg, args))

    def _local_request(self, buf: bytearray, pos: int, oid: int, opcode: int, size: int) -> None:
        """A request to one of the filter's own offers: nothing of it reaches the compositor."""
        kind = self.local[oid]
        iface = self.protocols[kind.offer]
        try:
            msg = iface.requests[opcode]
        except IndexError:
            raise Violation(f"{kind.offer}: no request {opcode}") from None
        try:
            args = decode(msg, bytes(buf[pos + 8 : pos + size]), self._cfds)
        except WireError as e:
            raise Violation(str(e)) from None
        if msg.name == "receive":
            mime, fd = args
            assert isinstance(fd, int)
            selection = self.held[kind.name].selection
            selection.receive(mime if isinstance(mime, bytes) else b"", fd)
        elif msg.destructor:
            del self.local[oid]
            self._srv_free.append(oid)
        # accept, finish, set_actions: drag-and-drop bookkeeping, which never starts here

    def offer_selection(
        self,
        kind: Kind,
        mimes: list[bytes] | None,
        out: Output | None = None,
        devices: Iterable[int] | None = None,
    ) -> None:
        """Show the client the VM's selection of ``kind`` (``None``: there is none) on each of
        its devices of that kind (or on ``devices``): a fresh offer of the filter's own, its
        types, then ``selection``."""
        o = out if out is not None else Output()
        device = self.protocols[kind.device]
        data_offer, selection = (
            _event_named(device, "data_offer"),
            _event_named(device, "selection"),
        )
        offer_type = _event_named(self.protocols[kind.offer], "offer")
        targets = self.held[kind.name].devices if devices is None else devices
        for dev in sorted(targets):
            if mimes is None:
                o.add(*encode(dev, selection, [0]))
                continue
            mine = self._alloc_server_id()
            self.local[mine] = kind
            o.add(*encode(dev, data_offer, [NewId(mine)]))
            for mime in mimes:
                o.add(*encode(mine, offer_type, [mime]))
            o.add(*encode(dev, selection, [mine]))
        if out is None:
            self.inject(o.take())

    def source_event(self, kind: Kind, source: int, name: str, args: Sequence[Value]) -> None:
        """Tell the client something about its own source (``send`` with an fd, ``cancelled``)."""
        if source not in self.held[kind.name].sources:
            close_fds([v for v in args if isinstance(v, int) and name == "send"])
            return
        o = Output()
        o.add(*encode(source, _event_named(self.protocols[kind.source], name), list(args)))
        self.inject(o.take())

    def _destroy_host_offers(self, offers: list[tuple[int, Kind]]) -> None:
        """Give the compositor back offers of its own the client never saw (:mod:`.host_offers`).
        Each stays in ``objects`` (hidden): events may still be on their way to it, and the
        compositor reuses the id for its next new object, which replaces it there."""
        for oid, kind in offers:
            destroy = next(m for m in self.protocols[kind.offer].requests if m.name == "destroy")
            self._upstream.add(*encode(oid, destroy, []))

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
        cl = oid
        if oid >= SERVER_ID_BASE and not silenced:
            mapped = self.up2cl.get(oid)
            if mapped is None:
                raise UpstreamError(f"event for unmapped object {oid}")
            cl = mapped
        translate = cl != oid or (msg.objects and bool(self.up2cl))
        if hook is None and msg.plain and not silenced and not translate:
            out.add(buf[pos : pos + size])
            return
        try:
            args = decode(msg, bytes(buf[pos + 8 : pos + size]), self._ufds)
        except WireError as e:
            raise UpstreamError(str(e)) from None
        for i, (arg, value) in enumerate(zip(msg.args, args, strict=True)):
            if arg.code == "n" and isinstance(value, NewId):
                iface = self.protocols.get(arg.interface or "")
                if iface is None:
                    raise UpstreamError(f"unknown interface {arg.interface}")
                self.objects[value.id] = Obj(iface, hidden=silenced)
                if silenced and value.id >= SERVER_ID_BASE and iface.name in OFFER_KINDS:
                    kind = OFFER_KINDS[iface.name]
                    self._destroy_host_offers(self.host_offers.announced(value.id, kind))
                if value.id >= SERVER_ID_BASE and not silenced:
                    mine = self._alloc_server_id()
                    self.up2cl[value.id] = mine
                    self.cl2up[mine] = value.id
                    args[i] = NewId(mine)
        if silenced:
            close_fds(_fds_of(msg, args))
            gone = self.host_offers.device_event(obj.iface.name, msg.name, list(args))
            self._destroy_host_offers(gone)
            return
        if hook is not None:
            hook(self, oid, msg, args, out)
            return
        mapped_args: list[Value] = []
        for arg, value in zip(msg.args, args, strict=True):
            ref = self._client_ref(arg, value) if arg.code == "o" else value
            if ref is DROP:
                close_fds(_fds_of(msg, args))
                return
            assert not isinstance(ref, _Drop)
            mapped_args.append(ref)
        out.add(*encode(cl, msg, mapped_args))

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


class _Drop:
    """The marker of a message that names an object its receiver never saw."""


DROP = _Drop()
#: Mime types a source may offer (more are ignored).
MAX_MIME_TYPES = 32


def _event_named(iface: Interface, name: str) -> Message:
    return next(m for m in iface.events if m.name == name)


def _fds_of(msg: Message, args: list[Value]) -> list[int]:
    if not msg.nfds:
        return []
    return [v for a, v in zip(msg.args, args, strict=True) if a.code == "h" and isinstance(v, int)]


REQUEST_HOOKS: dict[tuple[str, str], Hook] = {
    ("wl_registry", "bind"): Session._bind,
    ("xdg_toplevel", "set_title"): Session._set_title,
    ("xdg_toplevel", "set_app_id"): Session._set_app_id,
    ("xdg_surface", "get_toplevel"): Session._get_toplevel,
    **{
        key: hook
        for k in KINDS
        for key, hook in (
            ((k.manager, k.get_device), Session._get_device),
            ((k.manager, k.create_source), Session._create_source),
            ((k.source, "offer"), Session._source_offer),
            ((k.source, "destroy"), Session._source_destroy),
            ((k.device, k.device_destructor), Session._device_gone),
            ((k.device, "set_selection"), Session._set_selection),
        )
    },
    **{key: Session._drop for key in policy.DROPPED_REQUESTS},
}
EVENT_HOOKS: dict[tuple[str, str], Hook] = {
    ("wl_registry", "global"): Session._global,
    ("wl_registry", "global_remove"): Session._global_remove,
    ("wl_display", "delete_id"): Session._delete_id,
    ("wl_keyboard", "enter"): Session._keyboard_enter,
    ("wl_keyboard", "leave"): Session._keyboard_leave,
}
