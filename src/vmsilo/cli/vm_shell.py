"""``vm-shell [--ssh [--root]] VM`` — the VM's console, or a pty shell through the channel.

Without ``--ssh`` it attaches to the console relay (``R/<vm>-console``) in raw mode; Ctrl-]
leaves. The guest starts its console shell when a line is typed there, so Enter gives a
prompt. With ``--ssh`` it opens a login shell on a guest pty over the command channel (no sshd
in the guest), as ``user`` or, with ``--root``, as root.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import tty
from typing import TYPE_CHECKING, TextIO

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
            from vmsilo.cli.vm_run import main as vm_run_main

            run_args = (["-c", args.config] if args.config else []) + ["-t"]
            run_args += ["--root"] if args.root else []
            return vm_run_main([*run_args, vm.name, "/bin/bash", "--login"], app=app)
        if not os.path.exists(vm.paths.console):
            print(f"Console not found: {vm.paths.console}", file=stream)
            print(f"Is the VM running? Use: vm-start {vm.name}", file=stream)
            return EXIT_USAGE
        return attach_console(vm.paths.console, banner=b"Escape character is CTRL+]\r\n")

    return run_tool("vm-shell", body, stream)


def attach_console(path: str, stdin: int = 0, stdout: int = 1, banner: bytes = b"") -> int:
    """Relay the terminal to the console socket until Ctrl-] or the VM goes away.

    Raw mode is set before the banner and without flushing (TCSANOW), so keys typed as soon
    as the banner shows are delivered, not dropped.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin, termios.TCSANOW)
    os.write(stdout, banner)
    try:
        while True:
            ready, _, _ = select.select([stdin, sock.fileno()], [], [])
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
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(OSError):
            sock.close()


if __name__ == "__main__":
    sys.exit(main())
