#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 that runs the real guest agent on the host.

It reads the QEMU argv vmsilo generates, connects to the console, ready and channel sockets the
supervisor listens on (as QEMU's chardev clients do), serves QMP on the QMP socket, and runs
``vmsilo.guest.agent`` as its "guest" with ``--ready-path``/``--channel-path``. QMP
``system_powerdown`` powers the fake guest off (exit 0), like the guest init would. It lets the
supervisor, relay, autostart and stop logic be tested in a second, with no VM; the ``vm`` tests
prove the same paths against real QEMU.

Environment: ``FAKE_QEMU_LOG`` — a file that gets one line per launch (to count starts);
``FAKE_QEMU_ARGV`` — a file that gets the launch's argv as one JSON line (``argv[0]`` as the
supervisor executed it, passed on by the wrapper as ``FAKE_QEMU_ARGV0``);
``autoShutdown`` on the kernel command line is passed on to the agent, whose idle power-off
ends the fake (exit 0). ``FAKE_QEMU_FAIL`` — exit with this status right away (a VMM that
crashes at start);
``FAKE_AGENT_VERSION`` — announce this protocol version instead of running the agent (an
image built by another vmsilo); ``FAKE_HELLO_FIRST`` — send the hello itself before the agent
has connected the channel (the supervisor must still wait for the channel).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import sys


def chardevs(argv: list[str]) -> dict[str, str]:
    out = {}
    for i, word in enumerate(argv):
        if word == "-chardev" and i + 1 < len(argv):
            fields = dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:] if "=" in kv)
            kind_id = argv[i + 1].split(",")
            cid = next(f.split("=", 1)[1] for f in kind_id if f.startswith("id="))
            out[cid] = fields["path"]
    return out


def user_param(argv: list[str]) -> str:
    append = argv[argv.index("-append") + 1]
    for word in append.split():
        if word.startswith("vmsilo.user="):
            return word.split("=", 1)[1]
    return "0:0"


async def qmp_server(path: str, powerdown: asyncio.Event) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        await writer.drain()
        while line := await reader.readline():
            cmd = json.loads(line).get("execute")
            writer.write(b'{"return": {}}\n')
            await writer.drain()
            if cmd == "system_powerdown":
                powerdown.set()

    if os.path.exists(path):
        os.unlink(path)
    await asyncio.start_unix_server(handle, path=path)


async def main() -> int:
    argv = sys.argv[1:]
    if os.environ.get("FAKE_QEMU_LOG"):
        with open(os.environ["FAKE_QEMU_LOG"], "a") as f:
            f.write(f"{os.getpid()}\n")
    if os.environ.get("FAKE_QEMU_ARGV"):
        with open(os.environ["FAKE_QEMU_ARGV"], "a") as f:
            f.write(json.dumps([os.environ.get("FAKE_QEMU_ARGV0", ""), *argv]) + "\n")
    if os.environ.get("FAKE_QEMU_FAIL"):
        return int(os.environ["FAKE_QEMU_FAIL"])
    devs = chardevs(argv)
    console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    console.connect(devs["console"])
    console.sendall(b"fake-qemu: booting\r\n")
    powerdown = asyncio.Event()
    await qmp_server(devs["qmp"], powerdown)
    if os.environ.get("FAKE_AGENT_VERSION"):
        hello = {
            "hello": "vmsilo-agent",
            "version": int(os.environ["FAKE_AGENT_VERSION"]),
            "transport": "channel",
            "pid": 1,
        }
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ready.connect(devs["ready"])
        ready.sendall(json.dumps(hello).encode() + b"\n")
        await powerdown.wait()
        return 0
    ready_args = ["--ready-path", devs["ready"]]
    if os.environ.get("FAKE_HELLO_FIRST"):
        hello = {"hello": "vmsilo-agent", "version": 1, "transport": "channel", "pid": 1}
        early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        early.connect(devs["ready"])
        early.sendall(json.dumps(hello).encode() + b"\n")
        ready_args = ["--ready-port", ""]  # the agent announces nothing itself
    libc = ctypes.CDLL(None, use_errno=True)
    # the guest init passes autoShutdown from the kernel command line on to the agent
    cmdline = argv[argv.index("-append") + 1].split() if "-append" in argv else []
    if "autoShutdown.enable=1" in cmdline:
        after = next(w.split("=", 1)[1] for w in cmdline if w.startswith("autoShutdown.after="))
        ready_args += ["--auto-shutdown-after", after]
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmsilo.guest.agent",
        *ready_args,
        "--channel-path",
        devs["channel"],
        "--user",
        user_param(argv),
        preexec_fn=lambda: libc.prctl(1, signal.SIGKILL),  # PR_SET_PDEATHSIG
    )
    done = asyncio.ensure_future(agent.wait())
    off = asyncio.ensure_future(powerdown.wait())
    await asyncio.wait({done, off}, return_when=asyncio.FIRST_COMPLETED)
    if off.done() and agent.returncode is None:
        console.sendall(b"fake-qemu: power button\r\n")
        agent.terminate()
        await agent.wait()
    console.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
