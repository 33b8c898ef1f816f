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


EXAMPLES = """\
examples:
  vmsilo check                   validate the config, every problem at once
  vmsilo status                  every VM: state, memory, uptime, why it last stopped
  vmsilo stop --kill work        kill the VM `work` now (no power button)
  vmsilo plan work               every value derived for `work`

exit status: 0 done, 2 bad input (config, usage, unknown VM) or the verb failed.
Run `vmsilo VERB --help` for a verb's options. Programs in VMs: vm-run, vm-shell."""


def build_parser() -> argparse.ArgumentParser:
    from vmsilo.cli.helptext import VersionAction

    parser = argparse.ArgumentParser(
        prog="vmsilo",
        description="Run programs in isolated VMs (crosvm or QEMU): configure, start, stop and"
        " inspect them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $VMSILO_CONFIG, else /etc/vmsilo/vmsilo.toml)",
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    sub.add_parser(
        "check",
        help="validate the configuration",
        description=(
            "Validate the config: every problem at once as `path: what is wrong (hint: …)`,"
            " exit 2; else `ok: N VMs`. Warns (stderr, exit 0) about what the config names"
            " but this host lacks yet, such as a share directory that does not exist."
        ),
    )

    p = sub.add_parser(
        "plan",
        help="show the resolved plan",
        description=(
            "Every value derived from the config, per VM: ids, MACs, taps, PCI slots, kernel"
            " parameters, disks, shares, runtime paths."
        ),
    )
    p.add_argument("vm", nargs="?", help="only this VM")
    p.add_argument("--json", action="store_true", help="machine-readable output (one line)")

    p = sub.add_parser(
        "argv",
        help="print the VMM argv of a VM as a JSON array",
        description="The exact VMM command line the supervisor would run, as one JSON array.",
    )
    p.add_argument("vm", help="the VM, by its name in the config")
    p.add_argument("--backend", choices=HYPERVISORS, help="default: the VM's hypervisor")

    p = sub.add_parser(
        "render-launcher",
        help="write the VMM argv as a shell script",
        description=(
            "The VMM command line as a standalone shell script, every word quoted (to run a VM"
            " by hand, without vmsilo's supervisor: no taps, shares or cleanup)."
        ),
    )
    p.add_argument("vm", help="the VM, by its name in the config")
    p.add_argument("--backend", choices=HYPERVISORS, help="default: the VM's hypervisor")
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
        return _dispatch(args, loaded, out, err)

    return guarded(body, EXIT_BAD_INPUT, err)


def plural(n: int, word: str) -> str:
    """``1 VM``, ``2 VMs``, ``0 VMs``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _dispatch(args: argparse.Namespace, loaded: Loaded, out: TextIO, err: TextIO) -> int:
    plan = loaded.plan
    if args.verb == "check":
        from vmsilo.host.dirsafety import unsafe_dir
        from vmsilo.host.preflight import missing_share_dirs, share_setting

        for key, path in (("runtimeDir", plan.runtime_dir), ("stateDir", plan.state_dir)):
            why = unsafe_dir(path)
            if why is not None:
                print(
                    f"warning: {key}: {path} is not safe for vmsilo's root-only files: {why}"
                    " (hint: use a directory only root can write to; vmsilo doctor fails on it)",
                    file=err,
                )
        for vm in plan.vms.values():
            for share in missing_share_dirs(vm):
                print(
                    f"warning: vms.{vm.name}.{share_setting(share)}: {share.host_path} does"
                    f" not exist yet: VM {vm.name} cannot start until it does",
                    file=err,
                )
        print(f"ok: {plural(len(plan.vms), 'VM')}", file=out)
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
