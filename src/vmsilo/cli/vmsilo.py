"""``vmsilo``: the administrative verbs (check, plan, argv, render-launcher, image, …).

Verb names and outputs are stable; other tools parse them. Bad input exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from vmsilo.backends.features import HYPERVISORS
from vmsilo.backends.script import launcher_script
from vmsilo.cli.common import Loaded, guarded, load, select_vm
from vmsilo.config.users import UserLookup
from vmsilo.errors import UsageError
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.plan.serialize import plan_to_json

if TYPE_CHECKING:
    from vmsilo.lifecycle.base import App

EXIT_BAD_INPUT = 2


def vmm_argv(plan: Plan, vm: VmPlan, backend: str | None = None) -> list[str]:
    """The VMM argv for ``vm`` under ``backend`` (default: the VM's own hypervisor).

    The supervisor's own call (:func:`vmsilo.backends.registry.launch_argv`), reading QEMU's
    accelerator verdict from the cache instead of running a test boot."""
    from vmsilo.backends import registry

    chosen = registry.get(backend) if backend is not None else None
    return registry.launch_argv(plan, vm, probe=False, backend=chosen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmsilo", description="Run programs in isolated VMs (crosvm or QEMU)."
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $VMSILO_CONFIG, else /etc/vmsilo/vmsilo.toml)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    sub.add_parser("check", help="validate the configuration")

    p = sub.add_parser("plan", help="show the resolved plan")
    p.add_argument("vm", nargs="?", help="only this VM")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("argv", help="print the VMM argv of a VM as a JSON array")
    p.add_argument("vm")
    p.add_argument("--backend", choices=HYPERVISORS, help="default: the VM's hypervisor")

    p = sub.add_parser("render-launcher", help="write the VMM argv as a shell script")
    p.add_argument("vm")
    p.add_argument("--backend", choices=HYPERVISORS)
    p.add_argument("-o", "--output", metavar="FILE", help="default: standard output")

    from vmsilo.cli import verbs

    verbs.register(sub)
    return parser


def main(
    argv: list[str] | None = None,
    *,
    users: UserLookup | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    app: App | None = None,
) -> int:
    """``vmsilo``; ``app`` is the lifecycle app the VM verbs use (default: this host's)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = build_parser().parse_args(argv)

    def body() -> int:
        if getattr(args, "handler", None) is not None:
            status: int = args.handler(args, out=out, err=err, users=users, app=app)
            return status
        loaded = load(args.config, users)
        return _dispatch(args, loaded, out)

    return guarded(body, EXIT_BAD_INPUT, err)


def _dispatch(args: argparse.Namespace, loaded: Loaded, out: TextIO) -> int:
    plan = loaded.plan
    if args.verb == "check":
        print(f"ok: {len(plan.vms)} VMs", file=out)
        return 0
    if args.verb == "plan":
        if args.vm is not None:
            select_vm(plan, args.vm)
        if args.json:
            # One call into the C encoder (``indent`` would force the pure-Python one, which
            # streams about a million small writes for 1000 VMs): one line of JSON.
            out.write(json.dumps(plan_to_json(plan, args.vm)) + "\n")
        else:
            from vmsilo.cli.plan_view import print_plan

            print_plan(plan, args.vm, out)
        return 0
    if args.verb == "argv":
        vm = select_vm(plan, args.vm)
        json.dump(vmm_argv(plan, vm, args.backend), out)
        out.write("\n")
        return 0
    if args.verb == "render-launcher":
        vm = select_vm(plan, args.vm)
        text = launcher_script(
            vmm_argv(plan, vm, args.backend),
            vm.name,
            note=f"Generated from {loaded.path} by `vmsilo render-launcher`.",
        )
        if args.output:
            target = Path(args.output)
            target.write_text(text)
            os.chmod(target, 0o755)
        else:
            out.write(text)
        return 0
    raise UsageError(f"unknown verb {args.verb}")


if __name__ == "__main__":
    sys.exit(main())
