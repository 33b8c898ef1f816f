"""The supervisor's side of a session: bridge a command-socket client to the guest agent.

``vm-run`` speaks frames to the VM's command socket; the supervisor accepts the connection, reads
its OPEN and calls :func:`relay_opened` (virtio-serial mux) or :func:`relay_vsock_opened` (one
vsock connection per session); :func:`relay_client` does both steps for a mux. The relay looks
at frame *types* only — payloads pass through untouched — and enforces just what keeps the
host safe from a misbehaving peer:

* frames toward the client sit in the mux session's queue, which is bounded by the credit
  window (flow control is end to end between vm-run and the agent, and the mux fails a session
  whose peer overruns it), so a client that stops reading costs at most one window of memory;
* frames toward the guest are written with back-pressure (``drain``), so nothing accumulates;
* a client that disconnects makes the relay send RESET, and the agent hangs up the program;
* a frame of the wrong type or shape ends that session only, with an ERROR to both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Coroutine
from typing import Any

from vmsilo.channel.mux import ChannelMux, MuxSession, StreamLink, error_code
from vmsilo.channel.protocol import (
    VSOCK_PORT,
    VSOCK_PRIVILEGED_PORTS,
    ChannelError,
    Frame,
    FrameType,
    ProtocolError,
    encode_error,
    encode_frame,
)

#: Frame types a client may send after OPEN.
CLIENT_TYPES = frozenset(
    {
        FrameType.STDIN,
        FrameType.STDIN_EOF,
        FrameType.SIGNAL,
        FrameType.WINSIZE,
        FrameType.CREDIT,
    }
)
#: Frame types the agent may send.
AGENT_TYPES = frozenset(
    {FrameType.STDOUT, FrameType.STDERR, FrameType.CREDIT, FrameType.EXIT, FrameType.ERROR}
)


async def _fail_client(client: StreamLink, exc: BaseException | str) -> None:
    if isinstance(exc, str):
        await client.send(FrameType.ERROR, encode_error("relay", exc))
    else:
        await client.send(FrameType.ERROR, encode_error(error_code(exc), str(exc)))


async def _agent_to_client(session: MuxSession, client: StreamLink) -> None:
    """Forward until a terminal frame; ends on guest loss or a bad frame from the agent."""
    while True:
        try:
            frame = await session.recv()
        except ProtocolError as e:
            await _fail_client(client, e)
            await session.send(FrameType.ERROR, encode_error(error_code(e), str(e)))
            return
        if frame is None:
            await _fail_client(client, "the channel to the guest was lost")
            return
        if frame.type not in AGENT_TYPES:
            msg = f"guest agent sent an unexpected frame (type {frame.type})"
            await _fail_client(client, msg)
            await session.send(FrameType.ERROR, encode_error("protocol", msg))
            return
        await client.send(frame.type, frame.payload)
        if frame.type in (FrameType.EXIT, FrameType.ERROR):
            return


async def _client_to_agent(client: StreamLink, session: MuxSession) -> None:
    """Forward until the client disconnects (→ RESET) or sends a bad frame (→ ERROR)."""
    while True:
        try:
            frame = await client.recv()
        except ProtocolError as e:
            await session.send(FrameType.ERROR, encode_error(error_code(e), str(e)))
            await _fail_client(client, e)
            return
        if frame is None or frame.type in (FrameType.ERROR, FrameType.RESET):
            await session.send(FrameType.RESET)
            return
        if frame.type not in CLIENT_TYPES:
            msg = f"unexpected frame type {frame.type} from the client"
            await session.send(FrameType.ERROR, encode_error("protocol", msg))
            await _fail_client(client, msg)
            return
        await session.send(frame.type, frame.payload)


async def relay_client(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    mux: ChannelMux,
) -> None:
    """Serve one accepted command-socket connection as a new session on ``mux``.

    Suitable as the ``client_connected_cb`` of ``asyncio.start_unix_server`` (wrapped in a
    lambda binding ``mux``). Returns when the session is over; always closes the connection.
    """
    client = StreamLink(client_reader, client_writer)
    try:
        try:
            first = await client.recv()
        except ProtocolError as e:
            await _fail_client(client, e)
            return
        if first is None:
            return
        if first.type != FrameType.OPEN:
            await _fail_client(client, "a session must start with an OPEN frame")
            return
        await relay_opened(client, first, mux)
    finally:
        await client.aclose()


async def relay_opened(client: StreamLink, first: Frame, mux: ChannelMux) -> None:
    """Bridge ``client``, whose OPEN frame ``first`` was already read, onto a new mux session.

    For a supervisor that reads the first frame itself (control requests, waiting for
    readiness). Returns when the session is over; does not close ``client``.
    """
    try:
        session = mux.open_session()
    except ChannelError as e:
        await _fail_client(client, e.message)
        return
    try:
        await session.send(FrameType.OPEN, first.payload)
        await bridge_session(client, session)
    finally:
        session.close()


async def _until_either(*directions: Coroutine[Any, Any, None]) -> None:
    """Run both directions of a relay until either ends; then cancel the other and wait for
    it (an exception in either is raised here)."""
    tasks = [asyncio.create_task(d) for d in directions]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def bridge_session(client: StreamLink, session: MuxSession) -> None:
    """Relay frames both ways between a client stream and an open mux session, to the end."""
    await _until_either(_agent_to_client(session, client), _client_to_agent(client, session))


# --------------------------------------------------------------------------- vsock

#: Tests only (off unless set): a directory where the Unix socket ``<cid>-<port>.sock`` stands
#: in for the guest's vsock port ``port`` at ``cid``. Hosts without vsock (CI) cannot reach a
#: crosvm guest otherwise; the fake crosvm (tests/fake_crosvm) serves that socket with the real
#: agent (``--vsock-path``), so the supervisor's vsock relay runs unchanged apart from the
#: address family.
VSOCK_EMULATION_ENV = "VMSILO_VSOCK_EMULATION_DIR"


def bind_privileged_port(sock: socket.socket) -> int:
    """Bind ``sock`` (AF_VSOCK) to a free source port below 1024, highest first; its port.

    Each session holds one for its lifetime, so about a thousand sessions may be open at once
    across the host's VMs; past that (or without root) this fails with an error saying so.
    """
    for candidate in range(VSOCK_PRIVILEGED_PORTS - 1, 0, -1):
        try:
            sock.bind((socket.VMADDR_CID_ANY, candidate))
            return candidate
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            raise OSError(
                e.errno, f"cannot bind a privileged vsock port (the agent accepts no other): {e}"
            ) from None
    raise OSError(errno.EADDRINUSE, "every privileged vsock port is in use")


async def open_vsock_socket(cid: int, port: int = VSOCK_PORT) -> socket.socket:
    """A connected, non-blocking stream socket to the guest's agent over AF_VSOCK, from a
    privileged source port (the agent serves nothing else: any account can open AF_VSOCK, only
    root can bind such a port; SPEC §11.1). Under the tests' emulation, its Unix socket."""
    emulation_dir = os.environ.get(VSOCK_EMULATION_ENV)
    address: str | tuple[int, int]
    if emulation_dir:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = os.path.join(emulation_dir, f"{cid}-{port}.sock")
    else:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        address = (cid, port)
    sock.setblocking(False)
    try:
        if not emulation_dir:
            bind_privileged_port(sock)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_vsock(
    cid: int, port: int = VSOCK_PORT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`open_vsock_socket` as asyncio streams."""
    return await asyncio.open_connection(sock=await open_vsock_socket(cid, port))


async def relay_vsock_opened(
    client: StreamLink, first: Frame, cid: int, port: int = VSOCK_PORT
) -> None:
    """Bridge ``client`` (OPEN ``first`` already read) to a fresh vsock connection to the agent.

    Replays the OPEN, then relays bytes both ways (:func:`relay_to_agent`). Does not close
    ``client``'s streams: on a connect failure it gets an ERROR frame; after the relay the
    caller ends the client's stream (politely, see :meth:`StreamLink.linger`).
    """
    try:
        sock = await open_vsock_socket(cid, port)
    except OSError as e:
        await _fail_client(client, f"cannot reach the guest agent over vsock: {e}")
        return
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, encode_frame(FrameType.OPEN, 0, first.payload))
        await relay_to_agent(client.reader, client.writer, sock)
    finally:
        sock.close()


async def relay_to_agent(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, agent: socket.socket
) -> None:
    """Relay a session between a client's streams and the agent's socket, to the session's end.

    The agent ends a session by sending its EXIT (or ERROR) and closing. A frame the client
    sends meanwhile (a late CREDIT or STDIN_EOF) then meets a closed socket; with an asyncio
    transport that write error would drop what the agent sent and we had not read yet — the
    program's last output and its EXIT ("the connection to the VM was lost", about one session
    in ten right after a VM resumed). So the agent's side is a plain socket: a failed write
    only stops the client's direction, and the agent's bytes are read to their end. The
    client's EOF (it went away) ends the session at once: closing the agent's socket is what
    tells the agent to hang up the program. The agent's EOF half-closes the client's stream.
    """
    loop = asyncio.get_running_loop()

    async def to_agent() -> bool:
        """The client's bytes to the agent; True at the client's EOF, False once the agent
        takes no more (it closed: what it sent is still to be read)."""
        while data := await client_reader.read(65536):
            try:
                await loop.sock_sendall(agent, data)
            except OSError:
                return False
        return True

    async def to_client() -> None:
        with contextlib.suppress(OSError):  # (ConnectionError: the client or the agent went)
            while data := await loop.sock_recv(agent, 65536):
                client_writer.write(data)
                await client_writer.drain()
        with contextlib.suppress(OSError):  # the agent's end, closed or reset: so is ours
            if client_writer.can_write_eof():
                client_writer.write_eof()

    up = asyncio.create_task(to_agent())
    down = asyncio.create_task(to_client())
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if not down.done() and not up.cancelled() and up.exception() is None and not up.result():
            await down  # the agent closed its side: its last bytes, then the end
    finally:
        for task in (up, down):
            task.cancel()
        for task in (up, down):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
