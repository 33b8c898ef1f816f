"""The guest agent's ready port (SPEC §6, §10): its hello and farewell, and what the host says
on it after a fastStart restore or before a save (restore line, mount and settle requests).

Apart from the agent's session serving (:mod:`vmsilo.guest.agent`) because it is another job
with its own transport: a virtio port written line by line, held open after the first hello
(a virtio port has one opener) and read in a thread that sleeps while the host end is closed.

Standard library only: this module runs in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import socket
import stat
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Protocol

from vmsilo.channel.protocol import (
    RestoreNotice,
    encode_farewell,
    encode_mounted,
    encode_ready,
    encode_settled,
    is_mount_request,
    is_settle_request,
    parse_restored,
)

log = logging.getLogger("vmsilo.agent")


class _Idle(Protocol):
    auto_shutdown_after: float | None


# --------------------------------------------------------------------------- readiness


def _write_ready_blocking(path: Path, data: bytes) -> None:
    """Write the hello; a virtio-console write blocks until the host end is connected."""
    held = RESTORE.held_fd(path)
    if held is not None:  # a virtio port is opened once at a time: write through our fd
        _write_all(held, data)
        return
    st = os.stat(path)
    if stat.S_ISSOCK(st.st_mode):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(data)
        return
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_APPEND)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_ready_at_once(path: Path, data: bytes) -> int:
    """Write what the virtio port takes right now without blocking (usually all of it: the
    VMM's end is connected long before the guest is up); 0 if it is not a character device
    or would block. Saves a thread start on every boot."""
    if RESTORE.held_fd(path) is not None:
        return 0  # (held open, blocking: the thread writes it)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            return 0
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    finally:
        os.close(fd)


async def send_ready(path: Path, transport: str, *, restored: bool = False) -> None:
    """Announce readiness; a failure is logged, not fatal (sessions may still arrive)."""
    data = encode_ready(transport, os.getpid(), restored=restored)
    # a console port (crosvm's, a tty) is made raw and held before the host may write to it
    RESTORE.listen(path, transport, tty_only=True)
    try:
        rest = data[_write_ready_at_once(path, data) :]
        if rest:
            await asyncio.to_thread(_write_ready_blocking, path, rest)
    except OSError as e:
        # ENXIO: a *console* port opened as /dev/vportNpM (virtio_console serves those only as
        # /dev/hvcN; see _find_ready_console), or pass --ready-path /dev/hvcN.
        log.error("cannot send the readiness hello on %s: %s", path, e)
        return
    log.info("ready (%s) sent on %s", transport, path)
    RESTORE.listen(path, transport)


# --------------------------------------------------------------------------- restore


class RestoreListener:
    """The host's side of a restore (SPEC §10), heard on the ready port.

    After its first hello the agent keeps the ready port (a virtio-serial port, which only one
    opener may hold) open and reads it in a thread. A saved state is taken while the agent sits
    in that read; when the host restores it into a new machine, the supervisor writes one
    :func:`~vmsilo.channel.protocol.encode_restored` line: the agent mixes the host's entropy
    into the pool (QEMU's ``vmgenid`` has the kernel reseed too), sets the clock from the
    host's, and only then says hello again — the new supervisor's readiness (then it forgets
    the old machine's neighbours and has its DHCP clients ask afresh). Nothing else is read
    from the port. A console port (crosvm's: a tty) is made raw first — no echo of the host's
    lines back to it, no line editing, no carriage returns added — and held from before the
    first hello, so that nothing the host writes meets a cooked tty.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self.fd: int | None = None
        self.transport = "channel"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Future[None]] = set()
        #: the host end is closed; the reader waits for SIGIO
        self.hung_up = False
        #: set once the guest is settled (the user's desktop up): a settle request waits on it
        self.settled: asyncio.Event | None = None

    def held_fd(self, path: Path) -> int | None:
        return self.fd if self.fd is not None and path == self.path else None

    def listen(self, path: Path, transport: str, *, tty_only: bool = False) -> None:
        """Hold the ready port ``path`` open and read it (a character device: a virtio port,
        or a console port's tty, made raw); ``tty_only``: only if it is a tty."""
        self.transport = transport
        if self.fd is not None:
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            if not tty_only:
                log.warning("cannot hold the ready port %s for restores: %s", path, e)
            return
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise ValueError("not a character device")
            if os.isatty(fd):
                tty.setraw(fd, termios.TCSANOW)  # (TCSANOW: what the host sent stays)
            elif tty_only:
                raise ValueError("not a tty")
        except (OSError, ValueError, termios.error):
            os.close(fd)
            return
        self.path, self.fd, self.loop = path, fd, asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(fd,), daemon=True, name="ready-port").start()

    def _read(self, fd: int) -> None:
        """The reader thread: one line at a time (bounded), handed to the loop."""
        assert self.loop is not None
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            try:
                if not chunk:  # the host end closed: no restore can come through this boot
                    self.loop.call_soon_threadsafe(self._closed, fd)
                    return
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    self.loop.call_soon_threadsafe(self._line, line)
            except RuntimeError:  # the agent's loop is closed (it is ending): so is this
                return
            buf = buf[-8192:]

    def _closed(self, fd: int) -> None:
        """The host end closed (e.g. a restore's new VMM connecting): keep the port open —
        a close would drop what the host writes next — and read again once the host is back
        (virtio_console signals that with SIGIO, see :meth:`on_sigio`)."""
        if self.fd != fd:
            return
        self.hung_up = True
        try:
            fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        except OSError as e:  # (a tty whose other end is gone for good: nothing to wait for)
            log.info("the ready port %s hung up for good: %s", self.path, e)
            return
        self.on_sigio()

    def on_sigio(self) -> None:
        """SIGIO: if the host end of the held port is back, read it again."""
        fd = self.fd
        if fd is None or not self.hung_up or not host_connected(fd):
            return
        self.hung_up = False
        threading.Thread(target=self._read, args=(fd,), daemon=True, name="ready-port").start()

    def _line(self, line: bytes) -> None:
        if is_mount_request(line) or is_settle_request(line):
            work = self._mount() if is_mount_request(line) else self._settle()
            task = asyncio.ensure_future(work)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        try:
            notice = parse_restored(line)
        except ValueError:
            return
        task = asyncio.ensure_future(self._restored(notice))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _restored(self, notice: RestoreNotice) -> None:
        log.info("restored from a saved state: new entropy, clock from the host")
        try:
            reseed(notice.entropy)
        except OSError as e:
            log.warning("cannot mix the host's entropy in: %s", e)
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, notice.time_ns)
        except (OSError, PermissionError) as e:
            log.warning("cannot set the clock: %s", e)
        if self.path is not None:
            await send_ready(self.path, self.transport, restored=True)
        await asyncio.gather(_forget_neighbours(), asyncio.to_thread(_restart_dhcp))

    async def _settle(self) -> None:
        if self.settled is not None:
            await self.settled.wait()
        if self.path is not None:
            try:
                await asyncio.to_thread(_write_ready_blocking, self.path, encode_settled())
            except OSError as e:
                log.error("cannot answer the settle request: %s", e)

    async def _mount(self) -> None:
        errors = await mount_shares()
        if self.path is not None:
            data = encode_mounted(errors)
            try:
                await asyncio.to_thread(_write_ready_blocking, self.path, data)
            except OSError as e:
                log.error("cannot answer the mount request: %s", e)


#: ``RNDRESEEDCRNG`` (linux/random.h, ``_IO('R', 0x07)``): reseed the kernel's CRNG now.
RNDRESEEDCRNG = 0x5207


def reseed(entropy: bytes) -> None:
    """Mix ``entropy`` into the kernel's input pool and reseed its CRNG from it at once.

    A write to ``/dev/urandom`` only mixes into the input pool: the CRNG keeps the key it had
    in the saved RAM until its next timed reseed, so two restores of one state would read the
    same "random" bytes meanwhile. ``RNDRESEEDCRNG`` (root) makes it take the pool now; under
    QEMU the ``vmgenid`` device has the kernel reseed too, crosvm has no such device."""
    with open("/dev/urandom", "wb", buffering=0) as f:
        f.write(entropy)
        fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)


#: How long a hot-plugged share may take to show up in the guest (s).
SHARE_WAIT = 20.0


async def mount_shares() -> list[str]:
    """Mount the shares of the kernel command line whose devices the host just hot-plugged
    (fastStart, SPEC §10); the errors. A share's tag is known to virtiofs only once its PCI
    device is probed: a mount that fails is tried again on the next kernel uevent (the
    device's arrival), until :data:`SHARE_WAIT`."""
    from vmsilo.contracts.cmdline import parse_cmdline
    from vmsilo.contracts.mount import sys_mount
    from vmsilo.guest.actions import MakeDir, Mount, share_actions
    from vmsilo.guest.boot import load_modules, make_dir, mounted_targets, read_text

    params = parse_cmdline(read_text("/proc/cmdline"))
    load_modules(["virtiofs"])
    uevents = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    uevents.bind((0, 1))
    uevents.setblocking(False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SHARE_WAIT
    errors: list[str] = []
    try:
        for act in share_actions(params):
            if isinstance(act, MakeDir):
                make_dir(act)
                continue
            if not isinstance(act, Mount) or act.target in mounted_targets():
                continue
            while True:
                try:
                    sys_mount(act.source, act.target, act.fstype, act.flags, act.data)
                    log.info("share %s mounted on %s", act.source, act.target)
                    break
                except OSError as e:
                    left = deadline - loop.time()
                    if left <= 0:
                        errors.append(f"share {act.source}: {e}")
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(loop.sock_recv(uevents, 65536), left)
    finally:
        uevents.close()
    return errors


#: The kernel's uevent netlink family (not in the socket module).
NETLINK_KOBJECT_UEVENT = 15


async def _forget_neighbours() -> None:
    """The restored guest's ARP/NDP entries name the old machine's host taps (new MACs now):
    flush them so that the first packets out do not go to a MAC nobody has."""
    if not any(n != "lo" for n in os.listdir("/sys/class/net")):
        return
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "neigh",
            "flush",
            "all",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await proc.wait()
    except OSError as e:
        log.warning("cannot flush the neighbour tables: %s", e)


def _restart_dhcp() -> None:
    """The DHCP clients ask for their leases afresh (see :mod:`vmsilo.guest.dhcp_restart`);
    only in a vmsilo guest (an agent run on a host, as in tests, must not touch its clients)."""
    from vmsilo.guest.dhcp_restart import restart_dhcp_clients
    from vmsilo.guest.netvm import IMAGE_MARKER

    if not os.path.exists(IMAGE_MARKER):
        return
    try:
        restart_dhcp_clients()
    except OSError as e:
        log.warning("cannot restart the DHCP clients: %s", e)


RESTORE = RestoreListener()


async def send_farewell(path: Path | None, agent: _Idle) -> None:
    """Tell the host the guest powers off because it was idle (best effort, bounded)."""
    if path is None:
        return
    data = encode_farewell("auto-shutdown", agent.auto_shutdown_after)
    try:
        rest = data[_write_ready_at_once(path, data) :]
        if rest:
            await asyncio.wait_for(asyncio.to_thread(_write_ready_blocking, path, rest), 2)
    except (OSError, TimeoutError) as e:
        log.warning("cannot say goodbye on %s: %s", path, e)


def host_connected(fd: int) -> bool:
    """A virtio port reports POLLHUP while its host end is closed (one instant check)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return not any(ev & select.POLLHUP for _, ev in p.poll(0))
