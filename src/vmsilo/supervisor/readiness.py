"""Whether a VM's guest is ready: its hello on ``org.vmsilo.ready``, its channel port, and
the end of the start (SPEC §4, §6).

The VMM connects to both the ready and the channel socket and their accepts may run in either
order; a hello announcing the channel transport means "ready" only once the channel is there
to carry sessions. Everything that waits on readiness waits here, and is woken with a "no"
when the supervisor finishes first.

The ready port is written by the guest, so by guest root too (SPEC §11.2): lines are read with
a bound (a longer one is skipped, not fatal), anything that is not a hello or farewell is
ignored, and readiness is pinned to the first valid hello of a boot — a later one can switch
neither the transport (vsock vs. the channel mux) nor the protocol version.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable

from vmsilo.channel.mux import ChannelMux
from vmsilo.channel.protocol import (
    KNOWN_TRANSPORTS,
    ReadyHello,
    is_restored_hello,
    parse_farewell,
    parse_mounted,
    parse_ready,
)

#: Longest line read from the ready port; a hello is about 80 bytes.
MAX_READY_LINE = 4096


async def read_line(reader: asyncio.StreamReader, limit: int = MAX_READY_LINE) -> bytes | None:
    """The next line (with its newline, or the last bytes before EOF), at most ``limit`` bytes
    of it: the rest of a longer line is read and dropped, so a guest cannot grow our memory or
    end the reader with one. None at EOF."""
    line = b""
    while True:
        try:
            chunk = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            chunk = e.partial
            if not chunk and not line:
                return None
            return line + chunk[: max(0, limit - len(line))]
        except asyncio.LimitOverrunError as e:
            # the stream's own buffer limit without a newline: take what it holds and go on
            chunk = await reader.readexactly(e.consumed)
            line += chunk[: max(0, limit - len(line))]
            continue
        return line + chunk[: max(0, limit - len(line))]


class Readiness:
    """The readiness events of one VM, and the two ports that set them."""

    def __init__(self, vm_name: str) -> None:
        self.vm_name = vm_name
        #: the guest agent said hello (this boot, or after this restore)
        self.said_hello = asyncio.Event()
        #: sessions may flow: the hello, or after it the saved state taken (fastStart)
        self.ready = asyncio.Event()
        #: fastStart's first boot: the supervisor sets ``ready`` itself once the state is
        #: saved, so that no session's traces are in it (SPEC §10)
        self.hold_sessions = False
        #: the VMM's connection on the ready port (the host talks to a restored agent on it)
        self.ready_writer: asyncio.StreamWriter | None = None
        self.ready_port_up = asyncio.Event()
        #: fastStart restore: only a hello answering our restore line counts (see
        #: :func:`~vmsilo.channel.protocol.is_restored_hello`); another one calls
        #: ``on_stale_hello``
        self.await_restored = False
        self.on_stale_hello: Callable[[], None] | None = None
        #: the agent's answer to :meth:`send_mount`
        self.mounted: asyncio.Future[list[str]] | None = None
        #: the agent's answer to :meth:`send_settle`
        self.settled: asyncio.Future[None] | None = None
        #: the VMM's end of the channel port is accepted
        self.channel_up = asyncio.Event()
        self.operational = asyncio.Event()  # and the start is complete (netvm routing too)
        self.finished = asyncio.Event()  # the supervisor is ending: waiters give up
        self.hello: ReadyHello | None = None
        #: what the guest agent said it is doing as it has the guest power off (its farewell
        #: line), e.g. "auto-shutdown: idle for 600 s"
        self.farewell: str | None = None
        self.mux: ChannelMux | None = None
        #: whether a later hello was already reported in this boot (once: a guest could flood)
        self._ignored_reported = False

    def reset(self) -> None:
        """Before a reboot (crosvm reset): the new VMM connects and says hello anew."""
        self.ready.clear()
        self.said_hello.clear()
        self.ready_port_up.clear()
        self.ready_writer = None
        self.channel_up.clear()
        self.hello = None
        self.farewell = None
        self._ignored_reported = False

    async def wait_for(self, event: asyncio.Event) -> bool:
        """Wait for ``event`` unless the supervisor finishes first; whether it came."""
        if event.is_set():
            return True
        came = asyncio.ensure_future(event.wait())
        done = asyncio.ensure_future(self.finished.wait())
        try:
            await asyncio.wait({came, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            came.cancel()
            done.cancel()
        return event.is_set() and not self.finished.is_set()

    def send_restored(self) -> None:
        """Tell a just restored guest's agent the host's clock and fresh entropy (SPEC §10);
        it answers with a new hello."""
        from vmsilo.channel.protocol import RESTORE_ENTROPY, encode_restored

        assert self.ready_writer is not None
        self.ready_writer.write(encode_restored(time.time_ns(), os.urandom(RESTORE_ENTROPY)))

    async def on_ready_port(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.ready_writer = writer
        self.ready_port_up.set()
        try:
            while (line := await read_line(reader)) is not None:
                try:
                    hello = parse_ready(line)
                except ValueError:
                    if not self._mounted(line) and not self._settled(line):
                        self._farewell(line)
                    continue
                if self.hello is not None or (
                    hello.compatible() and hello.transport not in KNOWN_TRANSPORTS
                ):
                    self._ignored(hello)
                    continue
                if self.await_restored and not is_restored_hello(line):
                    # a restored agent re-announcing itself before it took in our restore line
                    # (its ports saw the host reconnect; a line sent while it had the port
                    # closed is lost): say it again, and wait for the hello that answers it
                    if self.on_stale_hello is not None:
                        self.on_stale_hello()
                    continue
                # (an agent of another protocol version is "ready" at once: clients are told)
                channel = hello.compatible() and hello.transport == "channel"
                if channel and not await self.wait_for(self.channel_up):
                    return
                if self.hello is None:  # (none came on another connection meanwhile)
                    self.hello = hello
                    self.said_hello.set()
                    if not self.hold_sessions:
                        self.ready.set()
        except ConnectionError:
            pass  # the VMM went away (its exit is handled elsewhere)
        finally:
            writer.close()

    def _ignored(self, hello: ReadyHello) -> None:
        if not self._ignored_reported:
            self._ignored_reported = True
            print(
                f"vmsilo supervisor: VM {self.vm_name}: ignoring a hello (version"
                f" {hello.version}, transport {hello.transport}): readiness is pinned to the"
                " first one",
                file=sys.stderr,
            )

    def _mounted(self, line: bytes) -> bool:
        """The agent's answer to a mount request (fastStart shares); whether it was one."""
        try:
            errors = parse_mounted(line)
        except ValueError:
            return False
        if self.mounted is not None and not self.mounted.done():
            self.mounted.set_result(errors)
        return True

    def send_settle(self) -> asyncio.Future[None]:
        """Ask the agent to answer once the guest is settled (fastStart's save waits for it)."""
        from vmsilo.channel.protocol import encode_settle

        assert self.ready_writer is not None
        self.settled = asyncio.get_running_loop().create_future()
        self.ready_writer.write(encode_settle())
        return self.settled

    def _settled(self, line: bytes) -> bool:
        from vmsilo.channel.protocol import is_settled

        if not is_settled(line):
            return False
        if self.settled is not None and not self.settled.done():
            self.settled.set_result(None)
        return True

    def send_mount(self) -> asyncio.Future[list[str]]:
        """Ask the agent to mount the shares just hot-plugged; its answer (the errors)."""
        from vmsilo.channel.protocol import encode_mount

        assert self.ready_writer is not None
        self.mounted = asyncio.get_running_loop().create_future()
        self.ready_writer.write(encode_mount())
        return self.mounted

    def _farewell(self, line: bytes) -> None:
        try:
            reason, idle = parse_farewell(line)
        except ValueError:
            return  # console noise
        if reason == "auto-shutdown" and idle is not None:
            self.farewell = f"auto-shutdown: idle for {idle:g} s"
        else:
            self.farewell = reason

    async def on_channel_port(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.mux is not None:
            await self.mux.aclose()
        self.mux = ChannelMux(reader, writer, name=f"{self.vm_name}-channel")
        self.channel_up.set()
        await self.mux.run()
