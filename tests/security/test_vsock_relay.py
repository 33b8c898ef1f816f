"""SPEC §11.2 on the vsock path: a hostile agent behind the supervisor's per-session relay.

Over vsock every session is its own connection, and the supervisor relays its bytes unchanged
(:func:`vmsilo.channel.relay.relay_to_agent`); the client's filters read them (proven against a
hostile agent in test_hostile_agent.py). This relay must stay transparent and bounded whatever
the agent does: pass exactly what the agent sent (mutated frames, garbage, a close with unread
bytes in its queue) and end — never raise into the supervisor, never hold more of the
guest's output than one read plus the client stream's buffer, and let a client that leaves
hang the agent up at once.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable
from typing import TypeVar

from hostile_rig import raw_frame
from test_hostile_agent import corpus, nasty_bytes, script_of

from vmsilo.channel.relay import relay_to_agent

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 120) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def test_hostile_agent_bytes_pass_unchanged_and_the_relay_ends() -> None:
    """Every corpus session (mutated frames from test_hostile_agent) and seeded garbage, sent
    by the agent, which then closes with the client's last frame unread: the client gets
    exactly those bytes, and the relay returns."""
    rng = random.Random(1411)
    scripts = [b"".join(script_of(frames)(0)) for frames in corpus()[:300]]
    scripts += [nasty_bytes(rng, rng.randrange(1, 200_000)) for _ in range(40)]

    async def one(script: bytes) -> None:
        agent, relay_end = socket.socketpair()
        client, supervisor_end = socket.socketpair()
        relay_end.setblocking(False)
        sr, sw = await asyncio.open_connection(sock=supervisor_end)
        cr, cw = await asyncio.open_connection(sock=client)
        cw.write(raw_frame(6, 1, b"\x00\x00\x10\x00"))  # a CREDIT the agent never reads
        await cw.drain()
        relay = asyncio.create_task(relay_to_agent(sr, sw, relay_end))

        def hostile() -> None:
            agent.sendall(script)
            agent.close()  # with unread bytes: the relay's writes fail from now on

        reading = asyncio.create_task(cr.read())  # to the relay's half-close
        await asyncio.to_thread(hostile)  # (held back while the client has not read)
        assert await reading == script
        await relay  # (raises if the relay raised)
        relay_end.close()
        cw.close()
        sw.close()

    async def main() -> None:
        for script in scripts:
            await one(script)

    run(main())


def test_a_flooding_agent_is_held_back_not_buffered() -> None:
    """An agent that writes without end to a client that reads nothing: the relay stops
    reading once the client's stream is full, so the agent's sends block; what the relay
    holds stays within one read (64 KiB) and the stream's high-water mark."""

    async def main() -> None:
        agent, relay_end = socket.socketpair()
        client, supervisor_end = socket.socketpair()
        relay_end.setblocking(False)
        sr, sw = await asyncio.open_connection(sock=supervisor_end)
        relay = asyncio.create_task(relay_to_agent(sr, sw, relay_end))
        agent.setblocking(False)
        chunk = b"\x1b]52;c;" * 8192
        sent = 0
        idle = 0
        while idle < 20:  # until the agent's sends have not gone through for 1 s
            try:
                sent += agent.send(chunk)
                idle = 0
            except BlockingIOError:
                idle += 1
            await asyncio.sleep(0.05)
        held = sw.transport.get_write_buffer_size()
        assert held <= 64 * 1024 + 2 * 65536, held  # high water + one read, not the flood
        assert sent < 64 << 20  # the agent was held back long before 64 MiB
        client.close()  # the client leaves: the relay ends and hangs the agent up
        await asyncio.wait_for(relay, 10)
        relay_end.close()  # (as relay_vsock_opened does once the relay returns)
        agent.setblocking(True)
        agent.settimeout(10)
        try:
            while agent.recv(65536):
                pass
        except ConnectionResetError:
            pass  # (closed with the agent's bytes unread: also a hang-up)
        agent.close()

    run(main())
