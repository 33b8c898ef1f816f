"""``vm-shell [--ssh [--root]] VM`` — the VM's console, or a pty shell through the channel.

Without ``--ssh`` it attaches to the console relay (``R/<vm>-console``) in raw mode; Ctrl-]
leaves. The guest starts its console shell when a line is typed there, so Enter gives a
prompt. The console is a byte stream, so its size travels beside it: through the command
channel, root in the guest sets the console's window size to the terminal's, on attach and
on every SIGWINCH (the shell there gets SIGWINCH like on any terminal).

With ``--ssh`` it opens a login shell on a guest pty over the command channel (no sshd in the
guest), as ``user`` or, with ``--root``, as root.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import termios
import threading
import tty
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from vmsilo.cli.vm_common import EXIT_USAGE, ToolParser, load_for_tool, resolve, run_tool
from vmsilo.config.users import UserLookup

if TYPE_CHECKING:
    from vmsilo.lifecycle.base import App

ESCAPE = 0x1D  # Ctrl-]
USAGE = """Usage: vm-shell [--ssh [--root]] <vm-name>

Options:
 --ssh Open a shell over the vmsilo channel (a pty, no sshd needed)
 --root Connect as root (only with --ssh)

Without --ssh, connects to serial console.
Escape character is CTRL+]"""


def build_parser() -> ToolParser:
    parser = ToolParser("vm-shell", USAGE)
    parser.add_argument("--ssh", action="store_true")
    parser.add_argument("--root", action="store_true")
    parser.add_vm()
    return parser


def main(
    argv: list[str] | None = None,
    *,
    users: UserLookup | None = None,
    err: TextIO | None = None,
    app: App | None = None,
) -> int:
    stream = err or sys.stderr
    args = build_parser().parse(argv, stream)
    if args is None:
        return EXIT_USAGE
    if args.root and not args.ssh:
        print("Error: --root requires --ssh", file=stream)
        return EXIT_USAGE

    def body() -> int:
        loaded = load_for_tool(args.config, users)
        vm = resolve(loaded, args.vm, stream)
        if vm is None:
            return EXIT_USAGE
        if args.ssh:
            if not os.isatty(0):
                print(
                    "vm-shell: --ssh needs a terminal on standard input (hint: for a"
                    f" non-interactive shell, echo 'id' | vm-run {vm.name} sh)",
                    file=stream,
                )
                return EXIT_USAGE
            from vmsilo.cli.vm_run import main as vm_run_main

            run_args = (["-c", args.config] if args.config else []) + ["-t"]
            run_args += ["--root"] if args.root else []
            return vm_run_main(
                [*run_args, vm.name, "/bin/bash", "--login"], app=app, prog="vm-shell"
            )
        if not os.path.exists(vm.paths.console):
            print(f"Console not found: {vm.paths.console}", file=stream)
            print(f"Is the VM running? Use: vm-start {vm.name}", file=stream)
            return EXIT_USAGE
        sizer = ConsoleSize(vm.paths.command_socket)
        return attach_console(
            vm.paths.console, banner=b"Escape character is CTRL+]\r\n", on_resize=sizer.push
        )

    return run_tool("vm-shell", body, stream)


#: Where the guest's console shell runs: the kernel console (``console=hvc0``), as the init's.
GUEST_CONSOLE = "/dev/console"


class ConsoleSize:
    """Keeps the guest console's window size that of our terminal, in the background.

    Each :meth:`push` asks for the current size to be set; a daemon thread runs one short
    ``stty`` session per size as root through the command channel (the supervisor holds it
    until the guest is ready, so a console attached during boot gets its size once the guest
    can take it). Pushes that arrive meanwhile collapse into the latest size. Failures (the VM
    stopping, an old image) only leave the size as it was.
    """

    def __init__(self, command_socket: str) -> None:
        self.command_socket = command_socket
        self._wanted: tuple[int, int] | None = None
        self._sent: tuple[int, int] | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def push(self, rows: int, cols: int) -> None:
        if rows <= 0 or cols <= 0:
            return
        with self._cond:
            self._wanted = (rows, cols)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="winsize", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._wanted is None or self._wanted == self._sent:
                    self._cond.wait()
                size = self._wanted
            if not self._set(*size):
                return
            with self._cond:
                self._sent = size

    def _set(self, rows: int, cols: int) -> bool:
        import asyncio

        from vmsilo.channel.client import run_session
        from vmsilo.channel.protocol import ChannelError, ExecRequest

        argv = ["stty", "-F", GUEST_CONSOLE, "rows", str(rows), "cols", str(cols)]
        request = ExecRequest(argv=[a.encode() for a in argv], user="root")
        try:
            coro = run_session(
                self.command_socket, request, None, None, None, forward_signals=False
            )
            asyncio.run(coro)
        except (ChannelError, OSError, ValueError):
            return False
        return True


def attach_console(
    path: str,
    stdin: int = 0,
    stdout: int = 1,
    banner: bytes = b"",
    on_resize: Callable[[int, int], None] | None = None,
) -> int:
    """Relay the terminal to the console socket until Ctrl-] or the VM goes away.

    Raw mode is set before the banner and without flushing (TCSANOW), so keys typed as soon
    as the banner shows are delivered, not dropped. ``on_resize(rows, cols)`` is called with
    the terminal's size once attached and after every SIGWINCH.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin, termios.TCSANOW)
    winch_r = winch_w = -1
    old_wakeup = -1
    old_handler: Any = None
    if on_resize is not None and os.isatty(stdin):
        winch_r, winch_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_handler = signal.signal(signal.SIGWINCH, lambda _s, _f: None)
        old_wakeup = signal.set_wakeup_fd(winch_w, warn_on_full_buffer=False)
        on_resize(*_size(stdin))
    os.write(stdout, banner)
    watched = [stdin, sock.fileno()] + ([winch_r] if winch_r >= 0 else [])
    try:
        while True:
            try:
                ready, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if winch_r in ready and on_resize is not None:
                with contextlib.suppress(BlockingIOError):
                    os.read(winch_r, 512)
                on_resize(*_size(stdin))
            if sock.fileno() in ready:
                data = sock.recv(65536)
                if not data:
                    return 0
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    return 0
                if ESCAPE in data:
                    before = data[: data.index(ESCAPE)]
                    if before:
                        sock.sendall(before)
                    return 0
                sock.sendall(data)
    finally:
        if winch_r >= 0:
            signal.set_wakeup_fd(old_wakeup)
            signal.signal(signal.SIGWINCH, old_handler)
            os.close(winch_r)
            os.close(winch_w)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(OSError):
            sock.close()


def _size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 0, 0
    return size.lines, size.columns


if __name__ == "__main__":
    sys.exit(main())
