"""``vm-start VM`` — start a VM and return once it is ready."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from vmsilo.cli.helptext import ToolHelp
from vmsilo.cli.vm_common import EXIT_USAGE, ToolParser, load_for_tool, resolve, run_tool
from vmsilo.config.users import UserLookup

if TYPE_CHECKING:
    from vmsilo.lifecycle.base import App

HELP = ToolHelp(
    usage="vm-start [OPTIONS...] VM",
    summary=(
        "Start a VM and return once its guest is ready to run programs; prints `VM: running`."
        " A VM that already runs is left as it is. Under systemd (after `vmsilo install`) the"
        " VM's service is started, which the desktop user may do; otherwise the supervisor is"
        " started here, which needs root. Its netvm is started first."
    ),
    exit_statuses=[
        ("0", "the VM runs and its guest is ready"),
        ("1", "usage error, unknown VM, or the VM failed to start (the reason on stderr)"),
    ],
    examples=[
        ("vm-start work", "start the VM `work` and wait until it is ready"),
        ("vm-start -c ./vmsilo.toml banking", "the same with another config file"),
    ],
)


def build_parser() -> ToolParser:
    parser = ToolParser("vm-start", "Usage: vm-start <vm-name>", HELP)
    parser.add_vm()
    return parser


def main(
    argv: list[str] | None = None,
    *,
    users: UserLookup | None = None,
    err: TextIO | None = None,
    out: TextIO | None = None,
    app: App | None = None,
) -> int:
    stream = err or sys.stderr
    args = build_parser().parse(argv, stream, out)
    if args is None:
        return EXIT_USAGE

    def body() -> int:
        from vmsilo.lifecycle.app import open_app

        loaded = load_for_tool(args.config, users, cache=True)
        vm = resolve(loaded, args.vm, stream)
        if vm is None:
            return EXIT_USAGE
        from vmsilo.cli.start_status import start_status

        (app or open_app(loaded.path, state_dir=loaded.plan.state_dir)).start(
            loaded.plan, vm, wait=True, progress=start_status(vm.name, stream)
        )
        print(f"{vm.name}: running", file=out or sys.stdout)
        return 0

    return run_tool("vm-start", body, stream)


if __name__ == "__main__":
    sys.exit(main())
