"""The filter's sockets: one listening socket per VM, and for every client that connects one
upstream connection to the compositor, relayed both ways with their fds (SPEC §9.1).

One thread, one ``selectors`` loop, non-blocking sockets. Each direction keeps a queue of
``(bytes, fds)`` chunks; a partial send keeps the rest (its fds already went with the first
byte, as SCM_RIGHTS attaches them). When a destination's queue passes :data:`HIGH_WATER` the
source is not read until it drains, so a compositor that stops reading slows that client down
instead of growing the proxy. A :class:`~vmsilo.wayland.session.Violation` closes that client's
pair of sockets and nothing else; so does an :class:`OSError` on either of them.

Run it as the desktop user: ``python -m vmsilo.wayland.proxy --vm NAME --color C --listen PATH
--upstream PATH`` (it prints ``ready`` on stdout once it listens), or call :func:`serve`.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vmsilo.wayland import policy, protocol
from vmsilo.wayland.clipboard import CLIPBOARD, PRIMARY, Selection
from vmsilo.wayland.control import ControlServer, listen_private
from vmsilo.wayland.output import Chunk, close_chunks, close_fds
from vmsilo.wayland.protocol import Interface
from vmsilo.wayland.security_context import SecurityContext
from vmsilo.wayland.session import Session, UpstreamError, Violation
from vmsilo.wayland.wire import encode

T = TypeVar("T")

READ_SIZE = 65536
#: SCM_RIGHTS room for one read: more than libwayland sends at once, so a client that sends
#: more has its message truncated (MSG_CTRUNC) and is closed instead of leaking fds into us.
FD_ROOM = socket.CMSG_SPACE(64 * 4)
HIGH_WATER = 4 << 20
#: ``wl_display.error`` code ``implementation`` (wayland.xml).
IMPLEMENTATION_ERROR = 3
#: How long a refused client may take to read why and hang up (s), and how many at once.
REFUSE_LINGER = 5.0
MAX_REFUSING = 16


def _send_and_close(sock: socket.socket, data: bytes, *, linger: float) -> None:
    """Send ``data``, half-close, drop what the peer still sends until it hangs up — for
    ``linger`` s in all, however much it writes meanwhile — then close."""
    try:
        sock.settimeout(1)
        sock.sendall(data)
        if linger > 0:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + linger
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(READ_SIZE):
                    break
    except OSError:  # (TimeoutError too: the peer did not hang up in time)
        pass
    finally:
        sock.close()


class _Side:
    """One socket of a link and what waits to be sent to it."""

    __slots__ = ("callback", "events", "queue", "queued", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: deque[Chunk] = deque()
        self.queued = 0
        self.events = 0  # what the selector watches for (0: not registered)
        self.callback: Callable[[object, int], None] = lambda s, m: None


class Link:
    """A client and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket, session: Session) -> None:
        self.client = _Side(client)
        self.upstream = _Side(upstream)
        self.session = session
        self.closed = False


class Proxy:
    """The filter for one VM (see the module docstring)."""

    def __init__(
        self,
        labels: policy.Labels,
        listen: str,
        upstream: str,
        protocols: dict[str, Interface] | None = None,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
        control: str | None = None,
    ) -> None:
        self.labels = labels
        self.listen_path = listen
        self.upstream_path = upstream
        self.protocols = protocols if protocols is not None else protocol.load()
        self.log = log
        self.selector = selectors.DefaultSelector()
        self.links: set[Link] = set()
        self.listener: socket.socket | None = None
        self.context = SecurityContext(self.protocols, labels, listen + ".context", log)
        self._stop_r, self._stop_w = os.pipe()
        #: the VM's own clipboard and primary selection, shared by its connections (SPEC §9.1
        #: item 3); vm-clipboard reaches the clipboard only
        self.clipboard = Selection(CLIPBOARD)
        self.primary = Selection(PRIMARY)
        #: work other threads hand to the loop (:meth:`call`), and the pipe that wakes it
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: vm-clipboard's way in (SPEC §9.4; None: no control socket)
        self.control = ControlServer(self, control) if control is not None else None
        #: room for refused clients still being told why (:meth:`_refuse`)
        self._refusing = threading.BoundedSemaphore(MAX_REFUSING)

    # ------------------------------------------------------------ set-up

    def bind(self) -> None:
        """Make the VM's directory (0700) and listen on the filter socket."""
        d = Path(self.listen_path).parent
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        d.chmod(0o700)
        s = listen_private(self.listen_path, 64)
        s.setblocking(False)
        self.listener = s
        self.selector.register(s, selectors.EVENT_READ, self._accept)
        self.selector.register(self._stop_r, selectors.EVENT_READ, None)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._run_calls)
        if self.control is not None:
            self.control.start()
        self.context.ensure(self.upstream_path)

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler or another thread)."""
        os.write(self._stop_w, b"x")

    def run(self) -> None:
        """Relay until :meth:`stop`; then close everything and remove the socket."""
        try:
            while True:
                for key, mask in self.selector.select():
                    if key.data is None:
                        return
                    key.data(key.fileobj, mask)
        finally:
            self.close()

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for link in list(self.links):
            self._close(link, None)
        if self.listener is not None:
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen_path)
        self.context.close()
        self.selector.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------ other threads

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the loop's thread and return its result (from another thread: the
        control socket's). Raises TimeoutError when the loop does not get to it."""
        done = threading.Event()
        box: list[T] = []

        def run() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self._calls.append(run)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        if not done.wait(timeout):
            raise TimeoutError("the filter is busy")
        if not box:
            raise RuntimeError("the filter failed to do it (see its log)")
        return box[0]

    def _run_calls(self, _fileobj: object, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while self._calls:
            try:
                self._calls.popleft()()
            except Exception as e:  # a failed call must not end the filter
                self.log(f"{self.labels.vm}: clipboard: {e!r}")

    # ------------------------------------------------------------ links

    def _accept(self, listener: object, mask: int) -> None:
        assert self.listener is not None
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            up.connect(self.context.ensure(self.upstream_path))
        except OSError as e:
            up.close()
            self._refuse(client, f"vmsilo: no Wayland compositor at {self.upstream_path} ({e})")
            return
        client.setblocking(False)
        up.setblocking(False)
        session = Session(self.protocols, self.labels, self.clipboard, self.primary)
        link = Link(client, up, session)
        link.session.inject = lambda chunks: self._inject(link, chunks)
        self.links.add(link)
        link.client.callback = lambda s, m: self._ready(link, m, True)
        link.upstream.callback = lambda s, m: self._ready(link, m, False)
        self._update(link)

    def _refuse(self, client: socket.socket, message: str) -> None:
        """Tell the client why (libwayland prints a ``wl_display.error``), then hang up.

        Politely, in a short-lived thread: half-close, and read (dropping it) what the client
        still sends until it hangs up too (at most :data:`REFUSE_LINGER` s). Closed at once,
        the socket would refuse the requests the client writes before it reads the error —
        and waypipe, failing that write, reports its own "internal error" to the guest
        program instead of ours. Past :data:`MAX_REFUSING` at once, the rest close at once."""
        error = self.protocols["wl_display"].events[0]
        data, _ = encode(1, error, [1, IMPLEMENTATION_ERROR, message.encode()])
        self.log(message)
        if not self._refusing.acquire(blocking=False):
            _send_and_close(client, data, linger=0)
            return

        def refuse() -> None:
            try:
                _send_and_close(client, data, linger=REFUSE_LINGER)
            finally:
                self._refusing.release()

        threading.Thread(target=refuse, daemon=True, name="refuse").start()

    def _ready(self, link: Link, mask: int, from_client: bool) -> None:
        src, dst = (link.client, link.upstream) if from_client else (link.upstream, link.client)
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(link, src)
            if mask & selectors.EVENT_READ and not link.closed:
                self._read(link, src, dst, from_client)
        except Violation as e:
            self._close(link, f"{self.labels.vm}: client closed: {e}")
        except UpstreamError as e:
            self._close(link, f"{self.labels.vm}: compositor stream not understood: {e}")
        except OSError as e:
            self._close(link, f"{self.labels.vm}: connection lost: {e}")

    def _read(self, link: Link, src: _Side, dst: _Side, from_client: bool) -> None:
        data, anc, flags, _ = src.sock.recvmsg(READ_SIZE, FD_ROOM)
        fds = _fds(anc)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise Violation("too many fds in one message")
        if not data:
            close_fds(fds)
            self._close(link, None)
            return
        feed = link.session.from_client if from_client else link.session.from_upstream
        for chunk in feed(data, fds):
            dst.queue.append(chunk)
            dst.queued += len(chunk[0])
        self._flush(link, dst)
        if not from_client and not link.closed:
            back = link.session.take_upstream()  # the host's offers the filter destroys
            for chunk in back:
                src.queue.append(chunk)
                src.queued += len(chunk[0])
            if back:
                self._flush(link, src)

    def _flush(self, link: Link, side: _Side) -> None:
        while side.queue:
            data, fds = side.queue[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                sent = side.sock.sendmsg([data], anc)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    break
                raise
            close_fds(fds)
            side.queued -= sent
            if sent < len(data):
                side.queue[0] = (data[sent:], [])
                break
            side.queue.popleft()
        self._update(link)

    def _update(self, link: Link) -> None:
        """Watch for writability where chunks wait; stop reading a side whose peer is full."""
        if link.closed:
            return
        for side, peer in ((link.client, link.upstream), (link.upstream, link.client)):
            events = 0
            if peer.queued < HIGH_WATER:
                events |= selectors.EVENT_READ
            if side.queue:
                events |= selectors.EVENT_WRITE
            if events == side.events:
                continue
            if not side.events:
                self.selector.register(side.sock, events, side.callback)
            elif events:
                self.selector.modify(side.sock, events, side.callback)
            else:
                self.selector.unregister(side.sock)
            side.events = events

    def _inject(self, link: Link, chunks: list[Chunk]) -> None:
        """Messages the filter itself sends a client (its clipboard's offers and requests)."""
        if link.closed:
            close_chunks(chunks)
            return
        for chunk in chunks:
            link.client.queue.append(chunk)
            link.client.queued += len(chunk[0])
        try:
            self._flush(link, link.client)
        except OSError as e:
            self._close(link, f"{self.labels.vm}: connection lost: {e}")

    def _close(self, link: Link, why: str | None) -> None:
        if link.closed:
            return
        link.closed = True
        self.links.discard(link)
        if why:
            self.log(why)
        for side in (link.client, link.upstream):
            if side.events:
                self.selector.unregister(side.sock)
                side.events = 0
            side.sock.close()
            for _, fds in side.queue:
                close_fds(fds)
            side.queue.clear()
        link.session.close()


def _fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def serve(vm: str, color: str, listen: str, upstream: str, control: str | None = None) -> None:
    """Run the filter for one VM until SIGTERM or SIGINT (what the supervisor's starter calls
    in a process of the user's)."""
    proxy = Proxy(policy.Labels(vm, color), listen, upstream, control=control)
    proxy.bind()
    signal.signal(signal.SIGTERM, lambda *_: proxy.stop())
    signal.signal(signal.SIGINT, lambda *_: proxy.stop())
    print("ready", flush=True)
    proxy.run()


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    """The filter's options (this module's command and the bridge's)."""
    p.add_argument("--vm", required=True)
    p.add_argument("--color", required=True)
    p.add_argument("--listen", required=True, help="the VM's filter socket")
    p.add_argument("--upstream", required=True, help="the compositor's socket")
    p.add_argument("--control", help="the control socket for vm-clipboard")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vmsilo.wayland.proxy",
        description="vmsilo's Wayland filter for one VM (SPEC §9.1); run as the desktop user",
    )
    add_filter_arguments(p)
    a = p.parse_args(argv)
    try:
        serve(a.vm, a.color, a.listen, a.upstream, a.control)
    except (OSError, protocol.ProtocolFileError) as e:
        print(f"vmsilo wayland filter: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
