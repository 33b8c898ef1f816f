"""What a supervisor does in or for the running guest besides relaying sessions: turning on a
netvm's routing, holding a session open in its own netvm, and the debug console on a tty."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from vmsilo.channel.escapes import EscapeFilter
from vmsilo.plan.model import VmPlan
from vmsilo.supervisor.console import ConsoleRelay

#: How much of a guest task's output reaches the supervisor's log: the log lives on /run
#: (tmpfs), and a guest must not be able to fill it.
MAX_GUEST_LOG = 8 * 1024


class GuestOutputLog:
    """A guest program's output as supervisor log lines: at most :data:`MAX_GUEST_LOG` bytes,
    filtered of terminal controls (the log is read on terminals), and every line prefixed, so
    that a guest cannot forge a line of the supervisor's own (SPEC §11.2)."""

    def __init__(self, prefix: str, limit: int = MAX_GUEST_LOG) -> None:
        self.prefix = prefix
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0
        self._filter = EscapeFilter()

    def feed(self, _stream: int, data: bytes) -> None:
        """A :func:`run_session` ``sink``: keep what fits, count the rest."""
        room = self.limit - len(self.kept)
        self.kept += data[: max(0, room)]
        self.dropped += max(0, len(data) - max(0, room))

    def lines(self) -> list[str]:
        text = (self._filter(bytes(self.kept)) + self._filter.flush()).decode(errors="replace")
        out = [f"{self.prefix}{line.replace(chr(13), '_')}" for line in text.splitlines()]
        if self.dropped:
            out.append(f"{self.prefix}[{self.dropped} more bytes not logged]")
        return out


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
    output = GuestOutputLog(f"vmsilo supervisor: netvm set-up (guest {vm.name}): ")
    try:
        status = await run_session(
            vm.paths.command_socket,
            ExecRequest(argv=argv, user="root"),
            stdin=None,
            forward_signals=False,
            sink=output.feed,
        )
        detail = f"exit status {status}"
    except ChannelError as e:
        status, detail = 255, str(e)
    for line in output.lines():
        print(line, file=sys.stderr)
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
