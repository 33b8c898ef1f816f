"""vmsilo.channel: the framed, versioned command channel between host and guest.

* :mod:`.protocol` — frames, flow-control constants, :class:`ExecRequest`, readiness hello,
  :func:`accept_vsock_peer`, errors.
* :mod:`.mux` — :class:`StreamLink` (one session per stream) and :class:`ChannelMux` (many
  sessions over the ``org.vmsilo.channel`` virtio-serial stream).
* :mod:`.relay` — what the supervisor runs per command-socket connection.
* :mod:`.client` — :func:`run_session`, the asyncio client library (host only).
* :mod:`.blocking_client` — the same session without asyncio or threads: what ``vm-run``
  runs, so its start-up does not pay for importing asyncio (host only).
* :mod:`.pipes` — asyncio protocols for pipes and ptys used by the agent.

This package is copied into guest images: standard library only. Every name below is loaded
from its submodule on first use, so importing one submodule (``vm-run`` needs only
``protocol``, ``escapes`` and ``blocking_client``) does not import asyncio with the others.
"""

from __future__ import annotations

import sys

#: ``typing.TYPE_CHECKING`` without importing typing (mypy takes any name spelled so for it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from vmsilo.channel.client import run_session
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
        relay_to_agent,
        relay_vsock_opened,
    )

#: Where each public name lives.
_HOMES = {
    "client": ("run_session",),
    "mux": ("ChannelMux", "Link", "MuxSession", "StreamLink"),
    "protocol": (
        "CHANNEL_PORT_NAME",
        "MAX_FRAME",
        "PROTOCOL_VERSION",
        "READY_PORT_NAME",
        "VERSION_HINT",
        "VSOCK_PORT",
        "WINDOW",
        "ChannelError",
        "ExecRequest",
        "ProtocolError",
        "ProtocolVersionError",
        "ReadyHello",
        "accept_vsock_peer",
        "encode_ready",
        "parse_ready",
    ),
    "relay": (
        "bridge_session",
        "connect_vsock",
        "relay_client",
        "relay_opened",
        "relay_to_agent",
        "relay_vsock_opened",
    ),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

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
    "relay_to_agent",
    "relay_vsock_opened",
    "run_session",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    __import__(f"{__name__}.{module}")
    value = getattr(sys.modules[f"{__name__}.{module}"], name)
    globals()[name] = value
    return value
