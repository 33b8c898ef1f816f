"""Whether a VM's guest is ready: its hello on ``org.vmsilo.ready``, its channel port, and
the end of the start (SPEC §4, §6).

The VMM connects to both the ready and the channel socket and their accepts may run in either
order; a hello announcing the channel transport means "ready" only once the channel is there
to carry sessions. Everything that waits on readiness waits here, and is woken with a "no"
when the supervisor finishes first.
"""

from __future__ import annotations

import asyncio

from vmsilo.channel.mux import ChannelMux
from vmsilo.channel.protocol import ReadyHello, parse_farewell, parse_ready


class Readiness:
    """The readiness events of one VM, and the two ports that set them."""

    def __init__(self, vm_name: str) -> None:
        self.vm_name = vm_name
        self.ready = asyncio.Event()  # the guest agent said hello: sessions may flow
        #: the VMM's end of the channel port is accepted
        self.channel_up = asyncio.Event()
        self.operational = asyncio.Event()  # and the start is complete (netvm routing too)
        self.finished = asyncio.Event()  # the supervisor is ending: waiters give up
        self.hello: ReadyHello | None = None
        #: what the guest agent said it is doing as it has the guest power off (its farewell
        #: line), e.g. "auto-shutdown: idle for 600 s"
        self.farewell: str | None = None
        self.mux: ChannelMux | None = None

    def reset(self) -> None:
        """Before a reboot (crosvm reset): the new VMM connects and says hello anew."""
        self.ready.clear()
        self.channel_up.clear()
        self.hello = None
        self.farewell = None

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

    async def on_ready_port(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                try:
                    hello = parse_ready(line)
                except ValueError:
                    self._farewell(line)
                    continue
                # (an agent of another protocol version is "ready" at once: clients are told)
                channel = hello.compatible() and hello.transport == "channel"
                if channel and not await self.wait_for(self.channel_up):
                    return
                self.hello = hello
                self.ready.set()
        finally:
            writer.close()

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
