"""``vmsilo install`` / ``vmsilo uninstall``, ``vmsilo desktop rules`` (what install writes for
the compositor) and the hidden ``vmsilo _complete`` helper."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vmsilo.cli.common import load
from vmsilo.config.users import UserLookup

if TYPE_CHECKING:
    from vmsilo.host.install import Report
    from vmsilo.lifecycle.base import App


def register(sub: Any) -> None:
    p = sub.add_parser(
        "install", help="install systemd units, tmpfiles, polkit rule and bash completion"
    )
    p.add_argument(
        "--root", default="/", metavar="DIR", help="write below DIR only (default: /, live)"
    )
    p.set_defaults(handler=cmd_install)

    p = sub.add_parser("uninstall", help="remove everything `vmsilo install` installed")
    p.add_argument("--root", default="/", metavar="DIR", help="the root installed into")
    p.set_defaults(handler=cmd_uninstall)

    p = sub.add_parser("desktop", help="desktop integration (compositor rules)")
    dsub = p.add_subparsers(dest="desktop_cmd", required=True)
    p = dsub.add_parser(
        "rules",
        help="print the compositor rules marking each VM's windows in its colour",
        description="The rules `vmsilo install` writes (SPEC §9.1): a sway include"
        " (etc/sway/config.d/vmsilo.conf) or a KWin kwinrulesrc.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sway", dest="compositor", action="store_const", const="sway")
    which.add_argument("--kwin", dest="compositor", action="store_const", const="kwin")
    p.set_defaults(handler=cmd_desktop_rules)

    # no help=: a sub-parser added without one is not listed in `vmsilo --help` at all
    # (help=argparse.SUPPRESS would list it as "_complete ==SUPPRESS==")
    p = sub.add_parser("_complete")
    p.add_argument("what", choices=["verbs", "vms"])
    # the verb names are read off this very sub-parser table when asked (all registered by
    # then), so completion needs no second parser and no import of the command module
    p.set_defaults(handler=cmd_complete, verbs=lambda: list(sub.choices))


def cmd_install(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.host.install import install

    loaded = load(args.config, users, cache=True)
    report = install(loaded.plan, str(loaded.path.resolve()), Path(args.root))
    if Path(args.root).resolve() == Path("/"):
        # the KVM probe (cached in stateDir) is paid here rather than by the first start
        from vmsilo.backends.doctor import check_kvm

        report.notes += [f"{f.check}: {f.detail}" for f in check_kvm(loaded.plan)]
    _print_report(report, out, err)
    print(
        f"installed {len(loaded.plan.vms)} VMs below {args.root}"
        f" ({len(report.written)} written, {len(report.unchanged)} unchanged,"
        f" {len(report.removed)} removed)",
        file=out,
    )
    return 0


def cmd_desktop_rules(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.host.desktop_rules import render_kwin, render_sway

    loaded = load(args.config, users, cache=True)
    render = render_sway if args.compositor == "sway" else render_kwin
    out.write(render(loaded.plan, str(loaded.path.resolve())))
    return 0


def cmd_uninstall(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.config.problems import ConfigErrors
    from vmsilo.defaults import STATE_DIR
    from vmsilo.host.install import uninstall

    # the manifest lives in the config's stateDir; without a readable config, the default's
    try:
        state_dir = load(args.config, users).plan.state_dir
    except ConfigErrors:
        state_dir = STATE_DIR
    _print_report(uninstall(Path(args.root), state_dir), out, err)
    return 0


def _print_report(report: Report, out: TextIO, err: TextIO) -> None:
    """What an install or uninstall did: files on ``out``, notes on ``err``."""
    for rel in report.written:
        print(f"wrote {rel}", file=out)
    for rel in report.removed:
        print(f"removed {rel}", file=out)
    for note in report.notes:
        print(f"note: {note}", file=err)


def cmd_complete(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    """Words for the bash completion; silent and empty rather than an error on a bad config."""
    if args.what == "verbs":
        for name in args.verbs():
            if not name.startswith("_"):
                print(name, file=out)
        return 0
    try:
        loaded = load(args.config, users)
    except Exception:
        return 0
    for name in loaded.plan.vms:
        print(name, file=out)
    return 0
