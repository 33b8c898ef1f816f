"""``vm-start-debug VM`` — run the VM's supervisor in the foreground, console on this terminal.

Root only. The same supervisor code as systemd and ``vmsilo start`` run; Ctrl-C stops the VM
the graceful way.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, TextIO

from vmsilo.cli.helptext import ToolHelp
from vmsilo.cli.vm_common import EXIT_USAGE, ToolParser

if TYPE_CHECKING:
    from vmsilo.lifecycle.base import App


HELP = ToolHelp(
    usage="vm-start-debug [OPTIONS...] VM",
    summary=(
        "Run a VM's supervisor in the foreground with the VM's console on this terminal"
        " (kernel and init messages, a console shell on Enter): to see why a VM does not"
        " start. The same supervisor systemd and `vmsilo start` run. Ctrl-C stops the VM the"
        " graceful way, Ctrl-\\ kills it at once. Needs root."
    ),
    exit_statuses=[
        ("0", "the VM ran and stopped"),
        ("1", "usage error, not root, unknown VM, or the VM failed (the reason on stderr)"),
    ],
    examples=[
        ("sudo vm-start-debug work", "boot `work` with its console here"),
        ("sudo vm-start-debug -c ./vmsilo.toml work", "the same with another config file"),
    ],
)


def build_parser() -> ToolParser:
    parser = ToolParser(
        "vm-start-debug",
        "Usage: vm-start-debug <vm-name>\nNote: Requires root privileges (use sudo)",
        HELP,
    )
    parser.add_vm()
    return parser


def main(
    argv: list[str] | None = None, *, err: TextIO | None = None, app: App | None = None
) -> int:
    stream = err or sys.stderr
    args = build_parser().parse(argv, stream)
    if args is None:
        return EXIT_USAGE
    if os.geteuid() != 0:
        print("Error: vm-start-debug requires root privileges", file=stream)
        print(f"Run: sudo vm-start-debug {args.vm}", file=stream)
        return EXIT_USAGE
    from vmsilo.cli.vmsilo import main as vmsilo_main

    config = ["-c", args.config] if args.config else []
    status = vmsilo_main([*config, "service", "vm", args.vm, "--console"], stderr=err, app=app)
    return EXIT_USAGE if status == 2 else status


if __name__ == "__main__":
    sys.exit(main())
