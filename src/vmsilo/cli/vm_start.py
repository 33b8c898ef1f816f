"""``vm-start VM`` — start a VM and return once it is ready."""

from __future__ import annotations

import sys
from typing import TextIO

from vmsilo.cli.vm_common import EXIT_USAGE, load_for_tool, pop_config, resolve, run_tool
from vmsilo.config.users import UserLookup


def main(
    argv: list[str] | None = None, *, users: UserLookup | None = None, err: TextIO | None = None
) -> int:
    stream = err or sys.stderr
    config, rest = pop_config(sys.argv[1:] if argv is None else argv)
    if len(rest) != 1 or rest[0].startswith("-"):
        print("Usage: vm-start <vm-name>", file=stream)
        return EXIT_USAGE

    def body() -> int:
        from vmsilo.supervisor import manage

        loaded = load_for_tool(config, users, cache=True)
        vm = resolve(loaded, rest[0], stream)
        if vm is None:
            return EXIT_USAGE
        manage.start(loaded.path, loaded.plan, vm, wait=True)
        return 0

    return run_tool("vm-start", body, stream)


if __name__ == "__main__":
    sys.exit(main())
