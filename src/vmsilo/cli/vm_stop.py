"""``vm-stop [--force] VM`` — stop a VM gracefully; a netvm in use needs ``--force``."""

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
    force = "--force" in rest
    rest = [a for a in rest if a != "--force"]
    if len(rest) != 1 or rest[0].startswith("-"):
        print("Usage: vm-stop [--force] <vm-name>", file=stream)
        return EXIT_USAGE

    def body() -> int:
        from vmsilo.cli.verbs import running_plan
        from vmsilo.supervisor import manage

        loaded = load_for_tool(config, users)
        if resolve(loaded, rest[0], stream) is None:
            return EXIT_USAGE
        plan, vm = running_plan(loaded, rest[0], users)
        manage.stop(loaded.path, plan, vm, force=force)
        return 0

    return run_tool("vm-stop", body, stream)


if __name__ == "__main__":
    sys.exit(main())
