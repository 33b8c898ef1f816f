"""vmsilo.channel: the framed, versioned command channel between host and guest.

* :mod:`.protocol` — frames, flow-control constants, :class:`ExecRequest`, readiness hello,
  :func:`accept_vsock_peer`, errors.
* :mod:`.mux` — :class:`StreamLink` (one session per stream) and :class:`ChannelMux` (many
  sessions over the ``org.vmsilo.channel`` virtio-serial stream).
* :mod:`.relay` — what the supervisor runs per command-socket connection.
* :mod:`.client` — :func:`run_session`, the library behind ``vm-run`` (host only).
* :mod:`.pipes` — asyncio protocols for pipes and ptys used by the agent.

This package is copied into guest images: standard library only. (``client`` is imported
lazily here because the guest never needs it.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmsilo.channel.mux import ChannelMux, Link, MuxSession, StreamLink
from vmsilo.channel.protocol import (
    CHANNEL_PORT_NAME,
    MAX_FRAME,
    PROTOCOL_VERSION,
    READY_PORT_NAME,
    VERSION_HINT,
    VSOCK_PORT,
    WINDOW,
    ChannelError,
    ExecRequest,
    ProtocolError,
    ProtocolVersionError,
    ReadyHello,
    accept_vsock_peer,
    encode_ready,
    parse_ready,
)
from vmsilo.channel.relay import (
    bridge_session,
    connect_vsock,
    relay_client,
    relay_opened,
    relay_streams,
    relay_vsock_opened,
)

if TYPE_CHECKING:
    from vmsilo.channel.client import run_session

__all__ = [
    "CHANNEL_PORT_NAME",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "READY_PORT_NAME",
    "VERSION_HINT",
    "VSOCK_PORT",
    "WINDOW",
    "ChannelError",
    "ChannelMux",
    "ExecRequest",
    "Link",
    "MuxSession",
    "ProtocolError",
    "ProtocolVersionError",
    "ReadyHello",
    "StreamLink",
    "accept_vsock_peer",
    "bridge_session",
    "connect_vsock",
    "encode_ready",
    "parse_ready",
    "relay_client",
    "relay_opened",
    "relay_streams",
    "relay_vsock_opened",
    "run_session",
]


def __getattr__(name: str) -> Any:
    if name == "run_session":
        from vmsilo.channel.client import run_session

        return run_session
    raise AttributeError(name)
