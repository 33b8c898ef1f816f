"""``vm-run [options] VM CMD [ARG…]`` — run a command in a VM (SPEC §6).

Options only before VM; everything from CMD on is passed to the guest byte for byte. The exit
status is the guest program's (126/127 when it cannot be executed / found, 128+N when killed by
signal N, 124 when ``--timeout`` ended it, as with ``timeout(1)``); every failure of vm-run
itself exits 255 with a message.

The way to a VM's command socket — found running, or started — is :mod:`vmsilo.cli.reach`,
shared with vm-copy.
"""

from __future__ import annotations

import os
import sys

from vmsilo.errors import UsageError, VmsiloError

#: ``typing.TYPE_CHECKING`` without importing :mod:`typing` (mypy treats any name spelled so as
#: true): a warm vm-run imports neither typing, argparse, dataclasses, tomllib nor asyncio.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import socket
    from collections.abc import Callable
    from typing import NoReturn, TextIO

    from vmsilo.channel.protocol import ChannelError
    from vmsilo.cli.start_status import StartStatus
    from vmsilo.config.users import UserLookup
    from vmsilo.lifecycle.base import App
    from vmsilo.lifecycle.spawn import StartWatch

# Imports are deliberately late in this module: on a cold start vm-run forks the VM's
# supervisor, whose path to the VMM is vmsilo's share of the start-up; the client library loads
# in vm-run after the fork, on the other CPU, while the supervisor works. On the warm path (a
# running VM, the usual options) vm-run loads only what that path needs: Python's start and one
# round trip to the guest are most of a warm vm-run (docs/BENCHMARKS.md).

EXIT_FAILURE = 255
#: The program's outcome when ``--timeout`` ended it (SPEC §6 leaves it to the program's
#: status; ``timeout(1)`` says 124, so do we).
EXIT_TIMEOUT = 124
USAGE = """usage: vm-run [-t] [--detach] [--user NAME | --root] [--env K=V]... [--cwd DIR]
              [--no-autostart] [--timeout S] [-c FILE] VM CMD [ARG...]"""
HELP = """vm-run [OPTIONS...] VM COMMAND [ARGUMENT...]

Run COMMAND in the vmsilo VM named VM, starting the VM first if it is not running.
Options go before VM; from COMMAND on, every word goes to the guest exactly as given
(no shell in between, nothing after VM is read as an option).

Options:
  -h --help            Show this help
     --version         Show the version
  -t                   Run COMMAND on a terminal (pty) in the guest; needs a terminal
                       here; window size changes and signals are forwarded
     --detach          Return as soon as COMMAND started (0, or 127 if not found);
                       its input and output are /dev/null
     --user NAME       Run as the guest user NAME (default: the guest user "user")
     --root            Run as root in the guest
     --env K=V         Set an environment variable (may be repeated)
     --cwd DIR         Run in the guest directory DIR (default: the user's home)
     --no-autostart    Fail instead of starting a VM that is not running
     --timeout S       End COMMAND after S seconds (it is hung up; exit status 124)
  -c --config FILE     The config file (default: $VMSILO_CONFIG, else %(config)s)

Output to a terminal is filtered of terminal escape sequences unless -t is given;
output to a pipe or file is passed on byte for byte.

Exit status:
  COMMAND's own exit status; 126 if it cannot be executed, 127 if it is not found,
  128+N if it was killed by signal N, 124 if --timeout ended it, and 255 for every
  failure of vm-run itself (usage, unknown VM, the VM failed to start or was not ready
  in time, the connection to the VM was lost), with a message on standard error.

Examples:
  Run a browser in the VM "work" (started if needed):
    vm-run work firefox
  An interactive root shell, giving up after ten minutes:
    vm-run -t --root --timeout 600 work bash --login
"""


class RunArgs:
    """vm-run's parsed command line."""

    __slots__ = (
        "argv",
        "autostart",
        "config",
        "cwd",
        "detach",
        "env",
        "timeout",
        "tty",
        "user",
        "vm",
    )

    def __init__(
        self,
        vm: str = "",
        argv: list[str] | None = None,
        tty: bool = False,
        detach: bool = False,
        user: str | None = None,
        env: list[str] | None = None,
        cwd: str | None = None,
        autostart: bool = True,
        timeout: float | None = None,
        config: str | None = None,
    ) -> None:
        self.vm = vm
        self.argv: list[str] = [] if argv is None else argv
        self.tty = tty
        self.detach = detach
        self.user = user
        self.env: list[str] = [] if env is None else env
        self.cwd = cwd
        self.autostart = autostart
        self.timeout = timeout
        self.config = config

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunArgs) and self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"RunArgs({fields})"


class _BadUsage(Exception):
    pass


class _BadValue(ValueError):
    """An option's value failed its check (argparse reports it as ArgumentTypeError)."""


def _env(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise _BadValue(f"--env {text!r}: expected K=V")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _BadValue(f"--timeout {text!r}: expected seconds") from None
    if value <= 0:
        raise _BadValue("--timeout must be positive")
    return value


def _checked(check: Callable[[str], object]) -> Callable[[str], object]:
    """``check`` as an argparse type: its complaint becomes argparse's own."""
    import argparse

    def typed(text: str) -> object:
        try:
            return check(text)
        except _BadValue as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = check.__name__
    return typed


def build_parser() -> argparse.ArgumentParser:
    """Options, then everything else as one verbatim list: the VM and the command.

    The single ``argparse.REMAINDER`` positional is what keeps "options only before VM":
    from the first word that is not an option on, nothing is taken as an option, not even
    ``--help`` or ``--`` (a ``--`` before the VM ends the options, as usual).
    """
    import argparse

    class _Parser(argparse.ArgumentParser):
        """argparse, reporting through :class:`UsageError` (so: one line and exit 255)."""

        def error(self, message: str) -> NoReturn:
            raise _BadUsage(message)

    p = _Parser(prog="vm-run", usage=USAGE, add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--version", action="store_true")
    p.add_argument("-t", dest="tty", action="store_true")
    p.add_argument("--detach", action="store_true")
    p.add_argument("--user")
    p.add_argument("--root", dest="user", action="store_const", const="root")
    p.add_argument("--env", action="append", default=[], type=_checked(_env))
    p.add_argument("--cwd")
    p.add_argument("--no-autostart", dest="autostart", action="store_false")
    p.add_argument("--timeout", type=_checked(_seconds))
    p.add_argument("-c", "--config")
    p.add_argument("words", nargs=argparse.REMAINDER)
    return p


#: The options the fast parser takes: flags (with the value they store) and options with a value.
_FLAGS: dict[str, tuple[str, object]] = {
    "-t": ("tty", True),
    "--detach": ("detach", True),
    "--root": ("user", "root"),
    "--no-autostart": ("autostart", False),
}
_VALUED: dict[str, str] = {
    "--user": "user",
    "--env": "env",
    "--cwd": "cwd",
    "--timeout": "timeout",
    "-c": "config",
    "--config": "config",
}


def _fast_parse(argv: list[str]) -> RunArgs | None:
    """The common command lines without argparse (whose import is a tenth of a warm vm-run's
    own time): options spelled out in full (``--user U``, ``--user=U``, ``-t``…), then the VM
    and the command. Anything else — help, version, ``--``, combined or unknown options, a
    value that looks like an option, a value that fails its check, a usage error — returns
    None and argparse decides, so the result and every message are argparse's
    (tests/test_cli_lifecycle.py checks that both parsers agree)."""
    args = RunArgs()
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-"):
            break
        name, eq, value = word.partition("=")
        if not eq and word in _FLAGS:
            dest, const = _FLAGS[word]
            setattr(args, dest, const)
            i += 1
            continue
        dest = _VALUED.get(name, "")
        if not dest or (eq and name == "-c"):
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        if value.startswith("-"):
            return None
        i += 1
        try:
            if dest == "env":
                args.env.append(_env(value))
            elif dest == "timeout":
                args.timeout = _seconds(value)
            else:
                setattr(args, dest, value)
        except _BadValue:
            return None
    if len(argv) - i < 2 or not argv[i] or (args.tty and args.detach):
        return None
    args.vm, args.argv = argv[i], argv[i + 1 :]
    return args


def parse_args(argv: list[str]) -> RunArgs | str | None:
    """vm-run's arguments; None for ``--help``, "version" for ``--version``. Usage errors raise
    :class:`UsageError`."""
    fast = _fast_parse(argv)
    if fast is not None:
        return fast
    import argparse

    try:
        ns, unknown = build_parser().parse_known_args(argv)
    except _BadUsage as e:
        raise UsageError(_usage_message(str(e), argv), USAGE) from None
    except argparse.ArgumentError as e:  # a type check, reported by argparse before error()
        raise UsageError(e.message, USAGE) from None
    if ns.help:
        return None
    if ns.version:
        return "version"
    if unknown:
        raise UsageError(f"unknown option {unknown[0]}", USAGE)
    words: list[str] = ns.words
    if words[:1] == ["--"]:
        words = words[1:]
    if len(words) < 2:
        raise UsageError("expected a VM name and a command", USAGE)
    if ns.tty and ns.detach:
        raise UsageError("-t and --detach cannot be combined", USAGE)
    return RunArgs(
        vm=words[0],
        argv=words[1:],
        tty=ns.tty,
        detach=ns.detach,
        user=ns.user,
        env=ns.env,
        cwd=ns.cwd,
        autostart=ns.autostart,
        timeout=ns.timeout,
        config=ns.config,
    )


def _usage_message(message: str, argv: list[str]) -> str:
    """vm-run's own wording for argparse's complaints."""
    head, _, detail = message.partition(": ")
    if head.startswith("argument ") and detail == "expected one argument":
        names = head.removeprefix("argument ").split("/")
        used = next((a for a in reversed(argv) if a in names), names[-1])
        return f"option {used} needs a value"
    if head.startswith("argument ") and detail:
        return detail  # the type checks' own message
    return message


def help_text() -> str:
    from vmsilo.defaults import CONFIG_FILE

    return HELP % {"config": CONFIG_FILE}


def main(
    argv: list[str] | None = None,
    *,
    users: UserLookup | None = None,
    stderr: TextIO | None = None,
    app: App | None = None,
    prog: str = "vm-run",
) -> int:
    """vm-run; ``prog`` names the tool in messages (``vm-shell --ssh`` runs through here)."""
    err = stderr or sys.stderr
    args: RunArgs | str | None = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args is None:
            print(help_text(), end="", file=sys.stdout)
            return 0
        if isinstance(args, str):
            from vmsilo import __version__

            print(f"vm-run (vmsilo) {__version__}", file=sys.stdout)
            return 0
        status = _run(args, users, err, app, prog)
        if status in (126, 127):
            what = "was not found" if status == 127 else "cannot be executed"
            _unattended_failure(args, err, prog, f"{args.argv[0]} {what}")
        return status
    except VmsiloError as e:
        print(f"{prog}: {e}", file=err)
        _unattended_failure(args, err, prog, str(e))
        return EXIT_FAILURE
    except OSError as e:  # e.g. PermissionError: one line, never a traceback
        from vmsilo.cli.common import os_error

        print(f"{prog}: {os_error(e)}", file=err)
        _unattended_failure(args, err, prog, str(os_error(e)))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _unattended_failure(args: RunArgs | str | None, err: TextIO, prog: str, text: str) -> None:
    """A ``--detach`` launch without a terminal (a menu entry, SPEC §9.3) has nobody reading
    standard error: its failure also goes to the journal and a desktop notification."""
    if not isinstance(args, RunArgs) or not args.detach:
        return
    try:
        if os.isatty(err.fileno()):
            return
    except (OSError, ValueError, AttributeError):
        pass
    from vmsilo.cli.notify import report_launch_failure

    report_launch_failure(prog, args.vm, text)


def _run(args: RunArgs, users: UserLookup | None, err: TextIO, app: App | None, prog: str) -> int:
    from vmsilo.cli.reach import reach_vm

    reached = reach_vm(
        args.config,
        args.vm,
        autostart=args.autostart,
        users=users,
        err=err,
        app=app,
        keep_connection=True,
    )
    try:
        target: str | socket.socket = reached.socket_path if reached.sock is None else reached.sock
        return _session(args, target, reached.watch, reached.status, prog, err)
    finally:
        if reached.status is not None:
            reached.status.done()  # before any message about the outcome


def _session(
    args: RunArgs,
    target: str | socket.socket,
    watch: StartWatch | None,
    status: StartStatus | None,
    prog: str,
    err: TextIO,
) -> int:
    """The session: the blocking client (no asyncio, no threads), or the asyncio client for a
    terminal session (-t: raw mode, window size changes)."""
    from vmsilo.channel.blocking_client import SessionTimeout, run_blocking_session
    from vmsilo.channel.protocol import ChannelError, ExecRequest

    try:
        if args.tty:
            return _tty_session(args, target, status, prog, err)
        new_filter = None
        if os.isatty(1) or os.isatty(2):
            from vmsilo.channel.escapes import EscapeFilter

            new_filter = EscapeFilter  # one per stream (see run_blocking_session)
        request = ExecRequest(
            argv=[os.fsencode(a) for a in args.argv],
            env=args.env,
            cwd=args.cwd,
            user=args.user,
            detach=args.detach,
        )
        try:
            return run_blocking_session(
                target,
                request,
                stdin=None if args.detach else 0,
                stdout=1,
                stderr=2,
                new_output_filter=new_filter,
                prog=prog,
                on_output=None if status is None else status.done,
                timeout=args.timeout,
            )
        except SessionTimeout:
            # the session was hung up, which hangs up the guest program: its outcome
            if status is not None:
                status.done()
            print(f"{prog}: timed out after {args.timeout:g} s", file=err)
            return EXIT_TIMEOUT
    except ChannelError as e:
        raise channel_failure(args.vm, e, watch.failure() if watch is not None else None) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        if watch is not None:
            watch.close()


def _tty_session(
    args: RunArgs,
    target: str | socket.socket,
    status: StartStatus | None,
    prog: str,
    err: TextIO,
) -> int:
    """``-t``: the asyncio client, which puts the local terminal in raw mode for the session
    and forwards window size changes."""
    import asyncio

    from vmsilo.channel.client import run_session, terminal_size
    from vmsilo.channel.protocol import ExecRequest

    if not os.isatty(0):
        raise UsageError("-t needs a terminal on standard input", "drop -t")
    rows, cols = terminal_size(0)
    request = ExecRequest(
        argv=[os.fsencode(a) for a in args.argv],
        env=args.env,
        cwd=args.cwd,
        user=args.user,
        tty=True,
        term=os.environ.get("TERM"),
        rows=rows,
        cols=cols,
    )

    async def go() -> int:
        if isinstance(target, str):
            connection: str | tuple[asyncio.StreamReader, asyncio.StreamWriter] = target
        else:
            connection = await asyncio.open_unix_connection(sock=target)
        coro = run_session(
            connection,
            request,
            stdin=0,
            stdout=1,
            stderr=2,
            tty_fd=0,
            prog=prog,
            on_output=None if status is None else status.done,
        )
        if args.timeout is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout=args.timeout)
        except TimeoutError:
            # the session is cancelled, which hangs up the guest program: its outcome
            if status is not None:
                status.done()
            print(f"{prog}: timed out after {args.timeout:g} s", file=err)
            return EXIT_TIMEOUT

    return asyncio.run(go())


def channel_failure(vm: str, exc: ChannelError, start_failure: str | None) -> VmsiloError:
    """vm-run's message for a failed session: either may quote the guest (an ERROR frame's
    text, the agent's farewell as the reason a start failed), so both are made printable."""
    from vmsilo.channel.escapes import printable

    if start_failure is not None:
        return VmsiloError(f"VM {vm} failed to start: {printable(start_failure)}")
    return VmsiloError(printable(exc.message), exc.hint)


def entry() -> NoReturn:
    """The ``vm-run`` command: :func:`main`, then exit without tearing the interpreter down.

    vm-run's own output goes straight to file descriptors and everything it opened is closed
    by then, so the finalisation (module teardown, garbage collection) would only add to the
    latency of every call; the standard streams are flushed first.
    """
    status = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue
    os._exit(status)


if __name__ == "__main__":
    entry()
