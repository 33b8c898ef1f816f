"""SPEC §11.1 for the window path (§9.1): a guest's Wayland connections are streams only the
supervisor opens. A local account that can reach a VM's command socket (``vm-run``'s door)
must not be able to open the Wayland control stream (and read which program connections wait)
nor claim a waiting connection by its ticket (and play compositor to a guest program).

Before the fix the supervisor relayed any OPEN payload to the agent verbatim, so both were one
frame away: the attack below reached the guest agent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from hostile_rig import Rig

from vmsilo.channel.mux import StreamLink
from vmsilo.channel.protocol import (
    SERVICE_WAYLAND,
    SERVICE_WAYLAND_CONTROL,
    FrameType,
    ServiceRequest,
    decode_error,
)


def test_a_local_client_cannot_open_service_streams(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        await rig.start()
        try:
            for request in (
                ServiceRequest(SERVICE_WAYLAND_CONTROL),
                ServiceRequest(SERVICE_WAYLAND, 1),
            ):
                r, w = await asyncio.open_unix_connection(str(rig.cmd_path))
                client = StreamLink(r, w)
                await client.send(FrameType.OPEN, request.encode())
                frame = await asyncio.wait_for(client.recv(), 10)
                assert frame is not None and frame.type == FrameType.ERROR, frame
                assert "opened by vmsilo only" in decode_error(frame.payload).message
                await client.aclose()
            # nothing reached the agent: its script queue was never asked for a session
            assert rig.frames_sent == 0
            assert rig.supervisor_alive()
        finally:
            await rig.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
