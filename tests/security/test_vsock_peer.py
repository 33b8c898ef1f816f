"""SPEC §11.1: only the supervisor reaches a guest agent over vsock.

Every host process has CID 2 and any account may open AF_VSOCK, so an agent that checked only
the CID gave any local user a root shell in the guest (``connect(cid=3+n, 5000)`` + OPEN with
``user: root``). The agent now serves only a privileged source port (< 1024: root only), which
the supervisor binds before it connects. Attacks: connections from CID 2 with an unprivileged
port, from another guest's CID, and with a malformed peer address — each closed before a byte
is read, nothing spawned; the supervisor's own port is served. This host has no vhost-vsock, so
the agent's accept path is driven in process with the peer addresses the kernel would report.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

import pytest

from vmsilo.channel.relay import bind_privileged_port
from vmsilo.guest.agent import serve_vsock_connection


class FakeAgent:
    def __init__(self) -> None:
        self.sessions = 0

    async def handle_link(self, link: Any) -> None:
        self.sessions += 1


class FakeWriter:
    def __init__(self, peer: object) -> None:
        self.peer = peer
        self.closed = False

    def get_extra_info(self, key: str) -> object:
        return self.peer if key == "peername" else None

    def close(self) -> None:
        self.closed = True


class UnreadReader:
    async def read(self, n: int = -1) -> bytes:
        raise AssertionError("a refused peer's bytes must never be read")


def _serve(peer: object) -> tuple[int, bool]:
    agent, writer = FakeAgent(), FakeWriter(peer)
    asyncio.run(serve_vsock_connection(agent, UnreadReader(), writer))  # type: ignore[arg-type]
    return agent.sessions, writer.closed


@pytest.mark.parametrize(
    "peer",
    [
        (2, 1024),  # a local user's connect: the kernel gives it an ephemeral port >= 1024
        (2, 49152),
        (2, 65535),
        (3, 1023),  # another guest, even from a low port
        (4, 100),
        (1, 1000),  # loopback
        (2,),  # malformed addresses
        ("2", "1000"),
        None,
        (2, -1),
    ],
)
def test_unprivileged_or_foreign_peers_are_refused_unheard(peer: object) -> None:
    assert _serve(peer) == (0, True)


@pytest.mark.parametrize("port", [1, 600, 1023])
def test_the_supervisors_privileged_port_is_served(port: int) -> None:
    assert _serve((2, port)) == (1, False)


class FakeVsock:
    def __init__(self, busy: set[int], error: int | None = None) -> None:
        self.busy = busy
        self.error = error
        self.tried: list[int] = []

    def bind(self, addr: tuple[int, int]) -> None:
        self.tried.append(addr[1])
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        if addr[1] in self.busy:
            raise OSError(errno.EADDRINUSE, "in use")


def test_the_supervisor_binds_the_highest_free_privileged_port() -> None:
    sock = FakeVsock(busy={1023, 1022})
    assert bind_privileged_port(sock) == 1021  # type: ignore[arg-type]
    assert sock.tried == [1023, 1022, 1021]
    with pytest.raises(OSError, match="every privileged vsock port is in use"):
        bind_privileged_port(FakeVsock(busy=set(range(1, 1024))))  # type: ignore[arg-type]
    with pytest.raises(OSError, match="cannot bind a privileged vsock port"):
        bind_privileged_port(FakeVsock(busy=set(), error=errno.EACCES))  # type: ignore[arg-type]


@pytest.mark.skipif(
    not os.path.exists("/dev/vhost-vsock"), reason="end to end needs a host with vhost-vsock"
)
def test_a_real_unprivileged_vsock_socket_gets_no_low_port() -> None:
    """Where vsock exists: an account without CAP_NET_BIND_SERVICE cannot bind below 1024."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.setgid(65534)
        os.setuid(65534)
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            bind_privileged_port(s)
        except OSError:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
