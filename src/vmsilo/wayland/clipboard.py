"""One VM's own selections, kept by its filter (SPEC §9.1 item 3, §9.4): its clipboard and
its primary selection (middle-click paste).

The compositor's selections are the host's: no VM may read them or set them. So the filter keeps
each of the VM's selections itself: a client's ``set_selection`` makes its source the VM's
selection of that kind, and every client of the same VM that has keyboard focus is shown it
through the filter's own offers (:meth:`vmsilo.wayland.session.Session.offer_selection`). A
paste (``receive`` on an offer) becomes ``send`` to the owning client with the paster's fd: the
bytes go from one guest program to the other, the filter never holds them.

The two kinds speak two protocols with the same shape (a manager that makes devices and
sources, a device that sets and announces the selection, offers that are read): :class:`Kind`
names one protocol's interfaces and :class:`Selection` is one VM's selection of one kind, so
the clipboard and the primary selection share every line of this logic.

``vm-clipboard`` (the host user's explicit act, as Qubes' Ctrl-Shift-C/V) reads the clipboard
(:meth:`Selection.request`, the owner writes into a pipe the caller reads) and replaces it with
data from the host (:meth:`Selection.set_host`, written to each paster's fd by a thread). It
moves the clipboard only, never the primary selection. These run on the filter's loop thread
(the proxy hands them over); nothing here blocks.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Kind:
    """The interfaces of one selection protocol (their requests and events share names:
    ``set_selection``, ``data_offer``, ``selection``, ``offer``, ``receive``, ``send``,
    ``cancelled``)."""

    name: str
    manager: str
    device: str
    source: str
    offer: str
    #: the manager's requests that make a device and a source
    get_device: str
    create_source: str
    #: the device's destructor
    device_destructor: str


CLIPBOARD = Kind(
    "clipboard",
    manager="wl_data_device_manager",
    device="wl_data_device",
    source="wl_data_source",
    offer="wl_data_offer",
    get_device="get_data_device",
    create_source="create_data_source",
    device_destructor="release",
)
PRIMARY = Kind(
    "primary",
    manager="zwp_primary_selection_device_manager_v1",
    device="zwp_primary_selection_device_v1",
    source="zwp_primary_selection_source_v1",
    offer="zwp_primary_selection_offer_v1",
    get_device="get_device",
    create_source="create_source",
    device_destructor="destroy",
)
KINDS = (CLIPBOARD, PRIMARY)


class Session(Protocol):
    """What a selection needs of a client connection
    (:class:`vmsilo.wayland.session.Session`)."""

    focused: bool

    def offer_selection(self, kind: Kind, mimes: list[bytes] | None) -> None: ...

    def source_event(
        self, kind: Kind, source: int, name: str, args: Sequence[int | bytes]
    ) -> None: ...


#: The types asked for first when the host reads a selection, text before images.
PREFERRED = (
    b"text/plain;charset=utf-8",
    b"UTF8_STRING",
    b"text/plain",
    b"STRING",
    b"TEXT",
    b"image/png",
)
#: Pastes of host data written at once (a thread each): a program that asks again and again
#: without reading gets its further pipes closed, not more threads.
MAX_WRITERS = 8
#: The types offered for text pasted from the host.
TEXT_TYPES = (b"text/plain;charset=utf-8", b"text/plain", b"UTF8_STRING", b"STRING", b"TEXT")


class Selection:
    """One selection of one VM: a client's source, data pasted from the host, or nothing."""

    def __init__(self, kind: Kind = CLIPBOARD) -> None:
        self.kind = kind
        self.sessions: set[Session] = set()
        self.owner: Session | None = None
        self.source = 0
        self.mimes: list[bytes] = []
        self.host: tuple[bytes, bytes] | None = None  # (mime, data) pasted by vm-clipboard

    # ---------------------------------------------------------------- clients

    def join(self, session: Session) -> None:
        self.sessions.add(session)

    def leave(self, session: Session) -> None:
        self.sessions.discard(session)
        if self.owner is session:
            self._clear()

    def current(self) -> list[bytes] | None:
        """The types of the selection (None: there is none)."""
        return list(self.mimes) if (self.owner is not None or self.host is not None) else None

    @property
    def focused(self) -> bool:
        """Whether a window of this VM has keyboard focus."""
        return any(s.focused for s in self.sessions)

    def focus_changed(self) -> None:
        """(A hook for who tracks focus across VMs; nothing to do here.)"""

    def set_selection(self, session: Session, source: int, mimes: Sequence[bytes]) -> None:
        """``source`` of ``session`` (offering ``mimes``) becomes the selection; 0 clears it."""
        if not source:
            self._clear()
            return
        if (self.owner, self.source) != (session, source):
            self._cancel_owner()
        self.owner, self.source, self.host = session, source, None
        self.mimes = list(mimes)
        self._broadcast()

    def source_gone(self, session: Session, source: int) -> None:
        if self.owner is session and self.source == source:
            self._clear()

    def receive(self, mime: bytes, fd: int) -> None:
        """A client pastes: the owner writes ``mime`` into ``fd`` (ours to hand on or close)."""
        if self.host is not None:
            data = self.host[1] if mime in self.mimes else b""
            _start_writer(fd, data)
        elif self.owner is not None and mime in self.mimes:
            self.owner.source_event(self.kind, self.source, "send", [mime, fd])
        else:
            os.close(fd)

    # ---------------------------------------------------------------- the host's side

    def request(self, fd: int) -> bytes | None:
        """Ask the owner to write the selection into ``fd`` (taken); the type chosen, or None
        (``fd`` closed) when the VM has no selection to give."""
        mime = next((m for m in PREFERRED if m in self.mimes), None)
        if self.host is not None and mime is not None:
            _start_writer(fd, self.host[1])
            return mime
        if self.owner is None or mime is None:
            os.close(fd)
            return None
        self.owner.source_event(self.kind, self.source, "send", [mime, fd])
        return mime

    def set_host(self, mime: bytes, data: bytes) -> None:
        """The VM's selection becomes ``data`` (pasted from the host by the user)."""
        self._cancel_owner()
        self.owner, self.source = None, 0
        self.host = (mime, data)
        self.mimes = list(TEXT_TYPES) if mime in TEXT_TYPES else [mime]
        self._broadcast()

    # ---------------------------------------------------------------- internals

    def _cancel_owner(self) -> None:
        if self.owner is not None:
            self.owner.source_event(self.kind, self.source, "cancelled", [])

    def _clear(self) -> None:
        had = self.current() is not None
        self.owner, self.source, self.mimes, self.host = None, 0, [], None
        if had:
            self._broadcast()

    def _broadcast(self) -> None:
        offers = self.current()
        for session in list(self.sessions):
            if session.focused:
                session.offer_selection(self.kind, offers)


_writers = threading.BoundedSemaphore(MAX_WRITERS)


def _start_writer(fd: int, data: bytes) -> None:
    if not _writers.acquire(blocking=False):
        os.close(fd)
        return
    threading.Thread(target=_write_all, args=(fd, data), daemon=True).start()


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to a paster's pipe, then close it (a thread: the pipe may be slow)."""
    try:
        with contextlib.suppress(OSError):
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        with contextlib.suppress(OSError):
            os.close(fd)
    finally:
        _writers.release()
