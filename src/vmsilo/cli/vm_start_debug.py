"""``vm-start-debug VM`` — run the VM's supervisor in the foreground, console on this terminal.

Root only. The same supervisor code as systemd and ``vmsilo start`` run; Ctrl-C stops the VM
the graceful way.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from vmsilo.cli.vm_common import EXIT_USAGE, pop_config


def main(argv: list[str] | None = None, *, err: TextIO | None = None) -> int:
    stream = err or sys.stderr
    config, rest = pop_config(sys.argv[1:] if argv is None else argv)
    if len(rest) != 1 or rest[0].startswith("-"):
        print("Usage: vm-start-debug <vm-name>", file=stream)
        print("Note: Requires root privileges (use sudo)", file=stream)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print("Error: vm-start-debug requires root privileges", file=stream)
        print(f"Run: sudo vm-start-debug {rest[0]}", file=stream)
        return EXIT_USAGE
    from vmsilo.cli.vmsilo import main as vmsilo_main

    args = (["-c", config] if config else []) + ["service", "vm", rest[0], "--console"]
    status = vmsilo_main(args)
    return EXIT_USAGE if status == 2 else status


if __name__ == "__main__":
    sys.exit(main())
