"""Serving the command socket: every ``vm-run`` connection is one session (SPEC §6).

A session waits until the guest is ready (or the start fails: then it gets the reason), checks
the guest agent's protocol version, and is relayed to the agent — one vsock connection per
session, or a stream on the ``org.vmsilo.channel`` multiplexer. ``{"control": "wait-ready"}``
instead waits until the start is complete (``vm-start``'s readiness wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Callable
from typing import Any

from vmsilo.channel.mux import StreamLink
from vmsilo.channel.protocol import (
    PROTOCOL_VERSION,
    VERSION_HINT,
    FrameType,
    ProtocolError,
    decode_json,
    encode_error,
    encode_frame,
    encode_json,
    is_service_open,
)
from vmsilo.channel.relay import relay_opened, relay_vsock_opened
from vmsilo.plan.model import VmPlan
from vmsilo.supervisor.readiness import Readiness

CONTROL_WAIT_READY = "wait-ready"


class Sessions:
    """The command-socket clients of one VM: served, refused, or told why the start failed."""

    def __init__(self, vm: VmPlan, readiness: Readiness, failure: Callable[[], str | None]) -> None:
        self.vm = vm
        self.readiness = readiness
        #: why the VM failed (None while it has not): what waiting clients are told
        self.failure = failure
        self.clients: set[asyncio.Task[Any]] = set()
        #: clients still waiting for readiness: on a failed start each gets the reason first
        self.waiting: set[asyncio.Task[Any]] = set()

    def _reason(self) -> str:
        return self.failure() or f"VM {self.vm.name} stopped"

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
        client = StreamLink(reader, writer)
        try:
            await self._serve(client)
        except asyncio.CancelledError:
            pass  # a cancelled client task must end normally: asyncio logs cancelled callbacks
        except (ConnectionError, OSError) as e:
            # usually the client went away; logged, since the client sees only a closed socket
            print(f"vmsilo supervisor: a command-socket session ended: {e!r}", file=sys.stderr)
        finally:
            if task is not None:
                self.clients.discard(task)
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _serve(self, client: StreamLink) -> None:
        readiness = self.readiness
        try:
            first = await client.recv()
        except ProtocolError as e:
            await send_error(client, "protocol", str(e))
            return
        if first is None:
            return
        if first.type != FrameType.OPEN:
            await send_error(client, "protocol", "a session must start with an OPEN frame")
            return
        if is_service_open(first.payload):
            # a guest's Wayland streams are the supervisor's to open (SPEC §11.1): a local
            # account must not be able to take a program's window connection
            await send_error(client, "protocol", "service streams are opened by vmsilo only")
            return
        control = _control_request(first.payload)
        task = asyncio.current_task()
        if task is not None:
            self.waiting.add(task)
        try:
            if not await readiness.wait_for(readiness.ready):
                await send_error(client, "start", self._reason())
                return
        finally:
            self.waiting.discard(task)
        hello = readiness.hello
        assert hello is not None
        if not hello.compatible():
            await client.send(
                FrameType.ERROR,
                encode_error(
                    "version",
                    f"guest agent speaks protocol {hello.version}, host"
                    f" {PROTOCOL_VERSION} ({VERSION_HINT})",
                    hello.version,
                ),
            )
            return
        if control == CONTROL_WAIT_READY:
            if not await readiness.wait_for(readiness.operational):
                await send_error(client, "start", self._reason())
                return
            await client.send(FrameType.EXIT, encode_json({"status": 0}))
            return
        if hello.transport == "vsock":
            await relay_vsock_opened(client, first, self.vm.id)
            return
        if readiness.mux is None:
            await send_error(client, "channel", "the guest's channel port is not connected")
            return
        await relay_opened(client, first, readiness.mux)

    async def fail_waiting(self) -> None:
        """Wake clients waiting for readiness and let them send the failure (bounded).

        Without this they would be cancelled with the rest, and ``vm-start`` would see a bare
        "stopped while starting" instead of, say, "crosvm: invalid arguments"."""
        self.readiness.finished.set()
        waiting = set(self.waiting)
        if waiting:
            await asyncio.wait(waiting, timeout=2)


def refuse_queued(sock: socket.socket, failure: str | None) -> None:
    """Answer the connections queued on a command socket whose launch failed before the
    loop ran: each gets the reason (as the clients served later do)."""
    error = encode_frame(
        FrameType.ERROR,
        0,  # a command-socket connection is one session
        encode_error("start", failure or ""),
    )
    sock.setblocking(False)
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:  # none queued any more
            break
        with conn:
            conn.settimeout(1)
            with contextlib.suppress(OSError):
                conn.sendall(error)


def _control_request(payload: bytes) -> str | None:
    try:
        obj = decode_json(payload)  # (deep nesting and the like: ProtocolError, not a crash)
    except ProtocolError:
        return None
    value = obj.get("control")
    return value if isinstance(value, str) else None


async def send_error(client: StreamLink, code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await client.send(
            FrameType.ERROR,
            encode_error(code, message),
        )
