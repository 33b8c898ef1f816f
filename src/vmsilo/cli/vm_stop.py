"""``vm-stop [--with-clients] [--kill] VM`` — stop a VM: gracefully, or at once with ``--kill``.

A netvm whose client VMs run needs ``--with-clients`` (``--force``, its old name, still works
with a note)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from vmsilo.cli.common import add_stop_options, stop_with_clients
from vmsilo.cli.helptext import ToolHelp
from vmsilo.cli.vm_common import EXIT_USAGE, ToolParser, load_for_tool, resolve, run_tool
from vmsilo.config.users import UserLookup

if TYPE_CHECKING:
    from vmsilo.lifecycle.base import App

USAGE = "Usage: vm-stop [--with-clients] [--kill] <vm-name>"
HELP = ToolHelp(
    usage="vm-stop [OPTIONS...] VM",
    summary=(
        "Stop a VM and return once it has stopped; prints `VM: stopped`, or `VM: not running`."
        " By default gracefully: the power button, then the VM is killed if its guest has not"
        " powered off within stopTimeout. Under systemd (after `vmsilo install`) the VM's"
        " service is stopped, which the desktop user may do; otherwise this needs root."
    ),
    exit_statuses=[
        ("0", "the VM has stopped, or was not running"),
        ("1", "usage error, unknown VM, a netvm in use without --with-clients, or the stop failed"),
    ],
    examples=[
        ("vm-stop work", "power `work` off and wait until it has stopped"),
        ("vm-stop --with-clients --kill netvm", "kill the VMs using `netvm`, then `netvm`"),
    ],
)


def build_parser() -> ToolParser:
    parser = ToolParser("vm-stop", USAGE, HELP)
    add_stop_options(parser)
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
    with_clients = stop_with_clients(args, "vm-stop", stream)

    def body() -> int:
        from vmsilo.lifecycle.app import open_app

        loaded = load_for_tool(args.config, users)
        vm = resolve(loaded, args.vm, stream)
        if vm is None:
            return EXIT_USAGE
        lifecycle = app or open_app(loaded.path, state_dir=loaded.plan.state_dir)
        plan, vm = lifecycle.running_plan(loaded.plan, vm, users)
        stopped = lifecycle.stop(plan, vm, with_clients=with_clients, kill=args.kill)
        report = f"{vm.name}: stopped" if stopped else f"{vm.name}: not running"
        print(report, file=out or sys.stdout)
        return 0

    return run_tool("vm-stop", body, stream)


if __name__ == "__main__":
    sys.exit(main())
