"""``vm-run [options] VM CMD [ARG…]`` — run a command in a VM (SPEC §6).

Options only before VM; everything from CMD on is passed to the guest byte for byte. The exit
status is the guest program's (126/127 when it cannot be executed / found, 128+N when killed by
signal N); every failure of vm-run itself exits 255 with a message.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn, TextIO

from vmsilo.errors import UsageError, VmsiloError

if TYPE_CHECKING:
    from vmsilo.config.users import UserLookup

# Imports are deliberately late in this module: on a cold start vm-run forks the VM's
# supervisor, whose path to the VMM is vmsilo's share of the start-up; asyncio and the client
# library load in vm-run after the fork, on the other CPU, while the supervisor works.

EXIT_FAILURE = 255
USAGE = """usage: vm-run [-t] [--detach] [--user NAME | --root] [--env K=V]... [--cwd DIR]
              [--no-autostart] [--timeout S] [-c FILE] VM CMD [ARG...]"""


@dataclass
class RunArgs:
    vm: str = ""
    argv: list[str] = field(default_factory=list)
    tty: bool = False
    detach: bool = False
    user: str | None = None
    env: list[str] = field(default_factory=list)
    cwd: str | None = None
    autostart: bool = True
    timeout: float | None = None
    config: str | None = None


def parse_args(argv: list[str]) -> RunArgs | None:
    """Hand-rolled so that nothing after the VM name is ever taken as an option."""
    a = RunArgs()
    i = 0

    def value(opt: str) -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise UsageError(f"option {opt} needs a value", USAGE)
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, inline = arg.partition("=")
        if arg in ("-h", "--help"):
            return None
        if arg == "-t":
            a.tty = True
        elif arg == "--detach":
            a.detach = True
        elif arg == "--root":
            a.user = "root"
        elif arg == "--no-autostart":
            a.autostart = False
        elif name in ("--user", "--env", "--cwd", "--timeout", "--config", "-c"):
            text = inline if eq else value(name)
            if name == "--user":
                a.user = text
            elif name == "--env":
                if "=" not in text or text.startswith("="):
                    raise UsageError(f"--env {text!r}: expected K=V", USAGE)
                a.env.append(text)
            elif name == "--cwd":
                a.cwd = text
            elif name == "--timeout":
                try:
                    a.timeout = float(text)
                except ValueError:
                    raise UsageError(f"--timeout {text!r}: expected seconds", USAGE) from None
                if a.timeout <= 0:
                    raise UsageError("--timeout must be positive", USAGE)
            else:
                a.config = text
        else:
            raise UsageError(f"unknown option {arg}", USAGE)
        i += 1
    rest = argv[i:]
    if len(rest) < 2:
        raise UsageError("expected a VM name and a command", USAGE)
    if a.tty and a.detach:
        raise UsageError("-t and --detach cannot be combined", USAGE)
    a.vm, a.argv = rest[0], rest[1:]
    return a


def main(
    argv: list[str] | None = None,
    *,
    users: UserLookup | None = None,
    stderr: TextIO | None = None,
) -> int:
    err = stderr or sys.stderr
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args is None:
            print(USAGE, file=sys.stdout)
            return 0
        return _run(args, users, err)
    except VmsiloError as e:
        print(f"vm-run: {e}", file=err)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


@dataclass
class QuickLook:
    """What vm-run can learn from the config without the typed model (see _run)."""

    path: str
    text: str
    runtime_dir: str
    user: str | None


def quick_look(config: str | None, name: str) -> QuickLook | None:
    """The raw config, if it plainly names VM ``name``; None sends vm-run the full way.

    vm-run to a running VM only needs ``runtimeDir`` and the VM's name, and a cold start can
    reuse the cached plan: skipping the typed model saves most of vm-run's start-up time.
    Anything unusual (no such file, TOML error, an odd runtimeDir) returns None and the full,
    validated path runs, which reports problems properly.
    """
    import tomllib

    from vmsilo.config.location import VM_NAME_RE, config_path

    path = config_path(config)
    try:
        text = path.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except (OSError, ValueError):
        return None
    runtime_dir = data.get("runtimeDir", "/run/vmsilo")
    vms = data.get("vms")
    user = data.get("user")
    if (
        not isinstance(runtime_dir, str)
        or not runtime_dir.startswith("/")
        or not isinstance(vms, dict)
        or name not in vms
        or not VM_NAME_RE.match(name)
    ):
        return None
    return QuickLook(
        str(path), text, runtime_dir.rstrip("/"), user if isinstance(user, str) else None
    )


def _run(args: RunArgs, users: UserLookup | None, err: TextIO) -> int:
    from vmsilo.host.sockets import socket_live
    from vmsilo.supervisor.manage import start_for_client

    watch = None
    socket_path: str | None = None
    look = quick_look(args.config, args.vm) if users is None else None
    if look is not None:
        candidate = f"{look.runtime_dir}/{args.vm}-command.socket"
        if socket_live(candidate):
            socket_path = candidate
        elif args.autostart and os.geteuid() == 0:
            from vmsilo.plan.cache import load_plan

            cached = load_plan(look.runtime_dir, look.text, look.user)
            if cached is not None and args.vm in cached.vms:
                socket_path = cached.vms[args.vm].paths.command_socket
                watch = start_for_client(look.path, cached, cached.vms[args.vm])
    if socket_path is None:
        from vmsilo.cli.common import load, select_vm
        from vmsilo.supervisor.control import command_socket_live

        loaded = load(args.config, users, cache=True)
        vm = select_vm(loaded.plan, args.vm)
        socket_path = vm.paths.command_socket
        if not command_socket_live(vm):
            if not args.autostart:
                raise VmsiloError(f"VM {vm.name} is not running", f"start it: vm-start {vm.name}")
            watch = start_for_client(loaded.path, loaded.plan, vm)

    import asyncio

    from vmsilo.channel.client import run_session, terminal_size
    from vmsilo.channel.protocol import ChannelError, ExecRequest

    tty_fd = None
    rows = cols = 0
    term = None
    if args.tty:
        if not os.isatty(0):
            raise UsageError("-t needs a terminal on standard input", "drop -t")
        tty_fd = 0
        rows, cols = terminal_size(0)
        term = os.environ.get("TERM")
    request = ExecRequest(
        argv=[os.fsencode(a) for a in args.argv],
        env=args.env,
        cwd=args.cwd,
        user=args.user,
        tty=args.tty,
        detach=args.detach,
        term=term,
        rows=rows,
        cols=cols,
    )
    out_filter = None
    if not args.tty and (os.isatty(1) or os.isatty(2)):
        from vmsilo.cli.escapes import EscapeFilter

        out_filter = EscapeFilter()

    async def go() -> int:
        coro = run_session(
            socket_path,
            request,
            stdin=None if args.detach else 0,
            stdout=1,
            stderr=2,
            tty_fd=tty_fd,
            output_filter=out_filter,
        )
        if args.timeout is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout=args.timeout)
        except TimeoutError:
            raise VmsiloError(f"timed out after {args.timeout:g} s") from None

    try:
        return asyncio.run(go())
    except ChannelError as e:
        reason = watch.failure() if watch is not None else None
        if reason is not None:
            raise VmsiloError(f"VM {args.vm} failed to start: {reason}") from None
        raise VmsiloError(e.message if hasattr(e, "message") else str(e), e.hint) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        if watch is not None:
            watch.close()


def entry() -> NoReturn:
    """The ``vm-run`` command: :func:`main`, then exit without tearing the interpreter down.

    vm-run's own output goes straight to file descriptors and everything it opened is closed
    by then, so the finalisation (module teardown, garbage collection) would only add to the
    latency of every call; the standard streams are flushed first.
    """
    status = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
