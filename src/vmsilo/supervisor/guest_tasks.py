"""What a supervisor does in or for the running guest besides relaying sessions: turning on a
netvm's routing, holding a session open in its own netvm, and the debug console on a tty."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from vmsilo.plan.model import VmPlan
from vmsilo.supervisor.console import ConsoleRelay


async def configure_netvm(vm: VmPlan) -> str | None:
    """Turn on routing in a netvm guest (vmsilo.guest.netvm) before we call it ready.

    Returns why it failed (None: it worked). The caller keeps that in the state file's
    ``detail``; the VM keeps running so the user can get in and look (`vm-shell`), and
    `vmsilo status` shows why."""
    from vmsilo.channel.client import run_session
    from vmsilo.channel.protocol import ChannelError, ExecRequest

    argv = ["python3", "-m", "vmsilo.guest.netvm"]
    if any(i.name == "upstream" for i in vm.interfaces):
        argv += ["--upstream", "upstream"]
    for i in vm.interfaces:
        if i.injected_for not in (None, "host"):
            argv += ["--client", i.name]
    try:
        status = await run_session(
            vm.paths.command_socket,
            ExecRequest(argv=argv, user="root"),
            stdin=None,
            stdout=sys.stderr.fileno(),
            stderr=sys.stderr.fileno(),
            forward_signals=False,
        )
        detail = f"exit status {status}"
    except ChannelError as e:
        status, detail = 255, str(e)
    if status == 0:
        return None
    message = f"netvm routing setup failed in the guest ({detail})"
    print(f"vmsilo supervisor: {message}", file=sys.stderr)
    return message


async def hold_netvm(netvm: VmPlan) -> None:
    """Keep one session open in our netvm while we run, so its auto-shutdown waits for us.

    The netvm's agent counts sessions; a client VM's supervisor holding ``sleep infinity``
    there is exactly "a session runs". Closing it (our shutdown cancels this task) hangs the
    program up, and the netvm's idle timer starts once its last client is gone.
    """
    from vmsilo.channel.client import run_session
    from vmsilo.channel.protocol import ChannelError, ExecRequest

    with contextlib.suppress(ChannelError, OSError):
        await run_session(
            netvm.paths.command_socket,
            ExecRequest(argv=["sleep", "infinity"]),
            stdin=None,
            stdout=None,
            stderr=None,
            forward_signals=False,
        )


async def pump_tty_input(console: ConsoleRelay) -> None:
    """vm-start-debug: our terminal's input goes to the guest console."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(sys.stdin.fileno(), "rb", 0)
    )
    while data := await reader.read(4096):
        await console.send_input(data)
