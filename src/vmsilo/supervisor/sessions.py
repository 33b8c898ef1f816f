"""Handing an accepted ``vm-run`` connection to the guest, after the supervisor read its OPEN.

The supervisor reads each connection's first frame itself (it may be a control request such as
``wait-ready``, and no session may reach the guest before it is ready), so it needs the relay
entry points that start from an already-read OPEN frame.
"""

from __future__ import annotations

from vmsilo.channel import relay
from vmsilo.channel.mux import ChannelMux, StreamLink
from vmsilo.channel.protocol import ChannelError, Frame, FrameType, encode_error, encode_frame


async def relay_opened(client: StreamLink, first: Frame, mux: ChannelMux) -> None:
    """Open a mux session for ``client`` and bridge it end to end."""
    try:
        session = mux.open_session()
    except ChannelError as e:
        await client.send(FrameType.ERROR, encode_error("channel", e.message))
        return
    try:
        await session.send(FrameType.OPEN, first.payload)
        await relay._bridge(client, session)
    finally:
        session.close()


async def relay_vsock_opened(client: StreamLink, first: Frame, cid: int) -> None:
    """Bridge ``client`` to a fresh vsock connection to the agent, replaying its OPEN."""
    try:
        up_reader, up_writer = await relay.connect_vsock(cid)
    except OSError as e:
        await client.send(
            FrameType.ERROR, encode_error("channel", f"cannot reach the guest agent: {e}")
        )
        return
    up_writer.write(encode_frame(FrameType.OPEN, first.session, first.payload))
    await up_writer.drain()
    await relay.relay_streams(client.reader, client.writer, up_reader, up_writer)
