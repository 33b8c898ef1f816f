"""Unit tests of the agent's pure parts: options, users, environment, idle accounting."""

from __future__ import annotations

import argparse
import asyncio
import os

import pytest

from vmsilo.channel.protocol import ExecRequest
from vmsilo.guest.agent import Agent, accept_vsock_peer, build_parser, parse_user
from vmsilo.guest.agent_exec import UnknownUserError, build_env, resolve_user


def test_parse_user() -> None:
    assert parse_user("1000:100") == (1000, 100)
    for bad in ("1000", "a:b", "-1:0", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_user(bad)


def test_cli_options() -> None:
    args = build_parser().parse_args(
        [
            "--ready-port",
            "org.vmsilo.ready",
            "--channel-port",
            "org.vmsilo.channel",
            "--vsock-port",
            "5000",
            "--user",
            "1000:1000",
            "--auto-shutdown-after",
            "30",
        ]
    )
    assert args.vsock_port == 5000 and args.user == (1000, 1000)
    assert args.auto_shutdown_after == 30.0
    assert accept_vsock_peer(2, 900) and not accept_vsock_peer(3, 900)


def test_resolve_user() -> None:
    root = resolve_user("root", 1000, 1000)
    assert (root.uid, root.gid, root.name) == (0, 0, "root")
    default = resolve_user(None, 65534, 65534)
    assert default.uid == 65534 and default.gid == 65534
    unknown_uid = resolve_user(None, 54321, 54321)  # no passwd entry: still runnable
    assert unknown_uid.name == "54321" and unknown_uid.groups == (54321,)
    with pytest.raises(UnknownUserError):
        resolve_user("no-such-user-vmsilo", 1000, 1000)


def test_build_env() -> None:
    ident = resolve_user("root", 0, 0)
    env = build_env(ident, ExecRequest(argv=["x"], env=["PATH=/opt", "X=a=b"], tty=True))
    assert env[b"PATH"] == b"/opt"  # additions win
    assert env[b"X"] == b"a=b"
    assert env[b"HOME"] == os.fsencode(ident.home)
    assert env[b"TERM"] == b"xterm-256color"
    assert b"TERM" not in build_env(ident, ExecRequest(argv=["x"]))


def test_idle_timer_counts_sessions() -> None:
    async def main() -> None:
        agent = Agent(0, 0, auto_shutdown_after=0.05)
        agent.start()
        agent.session_started()
        await asyncio.sleep(0.15)  # the timer is disarmed while a session lives
        assert not agent.shutdown.is_set()
        agent.session_ended()
        await asyncio.wait_for(agent.shutdown.wait(), 2)
        assert agent.live_sessions == 0

    asyncio.run(main())


def test_no_idle_timer_without_option() -> None:
    async def main() -> None:
        agent = Agent(0, 0)
        agent.start()
        agent.session_started()
        agent.session_ended()
        assert agent._idle_timer is None

    asyncio.run(main())


def test_vsock_connection_from_non_host_is_refused() -> None:
    import socket

    from vmsilo.channel.mux import StreamLink
    from vmsilo.channel.protocol import FrameType
    from vmsilo.guest.agent import serve_vsock_connection

    async def main() -> None:
        agent = Agent(0, 0)
        a, b = socket.socketpair()  # peername is not (2, port): must be refused unserved
        ar, aw = await asyncio.open_connection(sock=a)
        br, bw = await asyncio.open_connection(sock=b)
        client = StreamLink(br, bw)
        await client.send(FrameType.OPEN, ExecRequest(argv=["true"]).encode())
        await asyncio.wait_for(serve_vsock_connection(agent, ar, aw), 5)
        assert await asyncio.wait_for(client.recv(), 5) is None
        assert agent.live_sessions == 0
        await client.aclose()

    asyncio.run(main())


def test_guest_files_are_the_stdlib_only_import_closure() -> None:
    """Importing the agent and the init under the guest's python (no site-packages) loads only
    GUEST_FILES."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from vmsilo.contracts.guest_files import GUEST_FILES

    src = Path(__file__).resolve().parent.parent / "src"
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "import vmsilo.guest.agent, vmsilo.guest.init, vmsilo.guest.netvm, vmsilo.channel,"
        " vmsilo.channel.client;"
        "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items()"
        " if n.split('.')[0] == 'vmsilo')))"
    )
    out = subprocess.run(
        [python, "-S", "-c", code, str(src)], capture_output=True, check=True, timeout=30
    ).stdout
    loaded = {str(Path(f).relative_to(src)) for f in json.loads(out)}
    assert loaded <= set(GUEST_FILES)
    assert "vmsilo/guest/agent_exec.py" in loaded
    for rel in GUEST_FILES:
        assert (src / rel).is_file()


def _read_line(fd: int, timeout: float = 10.0) -> bytes:
    import select

    data = b""
    while b"\n" not in data:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no line within {timeout} s (got {data!r})"
        data += os.read(fd, 4096)
    return data


def test_a_console_ready_port_is_made_raw_held_and_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """crosvm's ready port is a console port, a tty in the guest (``/dev/hvcN``): the agent
    makes it raw before its hello — so a line the host writes is not echoed back to the host
    nor held for line editing — holds it, and answers what the host says on it (here a
    settle request), as on QEMU's virtio-serial port. Tried on a pty, cooked as hvc starts."""
    import termios

    from vmsilo.channel.protocol import encode_settle, is_settled, parse_ready
    from vmsilo.guest import ready_port

    master, slave = os.openpty()
    path = ready_port.Path(os.ttyname(slave))
    assert termios.tcgetattr(slave)[3] & termios.ECHO  # cooked, as a fresh tty is
    listener = ready_port.RestoreListener()
    monkeypatch.setattr(ready_port, "RESTORE", listener)

    async def main() -> None:
        await ready_port.send_ready(path, "vsock")
        assert listener.fd is not None  # held from before the hello
        lflag = termios.tcgetattr(listener.fd)[3]
        assert not lflag & (termios.ECHO | termios.ICANON)
        hello = await asyncio.to_thread(_read_line, master)
        assert parse_ready(hello.rstrip(b"\n")).transport == "vsock"
        assert not hello.endswith(b"\r\n")  # no carriage return added by the tty
        os.write(master, encode_settle())
        answer = await asyncio.to_thread(_read_line, master)
        assert is_settled(answer.rstrip(b"\n")), answer  # not our own line echoed back

    try:
        asyncio.run(main())
    finally:
        for fd in (master, slave):
            os.close(fd)
        if listener.fd is not None:
            os.close(listener.fd)


def test_only_a_tty_ready_port_is_held_before_the_hello(tmp_path: pytest.TempPathFactory) -> None:
    """A virtio-serial port (a character device, not a tty) is held only after the hello,
    as before (its write path saves a thread start); nothing else is held at all."""
    from vmsilo.guest import ready_port

    listener = ready_port.RestoreListener()

    async def main() -> None:
        listener.listen(ready_port.Path("/dev/null"), "vsock", tty_only=True)
        assert listener.fd is None
        listener.listen(ready_port.Path("/nonexistent/port"), "vsock", tty_only=True)
        assert listener.fd is None

    asyncio.run(main())


def test_a_restore_reseeds_the_crng_from_the_pool_with_the_hosts_entropy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writing to /dev/urandom alone leaves the CRNG's saved key in use until its timed
    reseed (two restores would read the same bytes): the agent mixes the host's entropy in,
    then asks for ``RNDRESEEDCRNG``, in that order, on the real device (root may)."""
    from vmsilo.guest import ready_port

    calls: list[tuple[str, int]] = []
    real_ioctl = ready_port.fcntl.ioctl

    def ioctl(fd: int, request: int, *args: object) -> object:
        calls.append(("ioctl", request))
        if os.geteuid() == 0:
            return real_ioctl(fd, request)  # the host's CRNG reseeds: harmless
        return 0

    monkeypatch.setattr(ready_port.fcntl, "ioctl", ioctl)
    ready_port.reseed(os.urandom(32))
    assert calls == [("ioctl", ready_port.RNDRESEEDCRNG)]
