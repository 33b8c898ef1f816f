"""``vmsilo install`` / ``vmsilo uninstall`` and the hidden ``vmsilo _complete`` helper."""

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

    p = sub.add_parser("_complete", help=argparse.SUPPRESS)
    p.add_argument("what", choices=["verbs", "vms"])
    p.set_defaults(handler=cmd_complete)


def cmd_install(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.host.install import install

    loaded = load(args.config, users)
    report = install(loaded.plan, str(loaded.path.resolve()), Path(args.root))
    _print_report(report, out, err)
    print(
        f"installed {len(loaded.plan.vms)} VMs below {args.root}"
        f" ({len(report.written)} written, {len(report.unchanged)} unchanged,"
        f" {len(report.removed)} removed)",
        file=out,
    )
    return 0


def cmd_uninstall(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.host.install import uninstall

    _print_report(uninstall(Path(args.root)), out, err)
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
        from vmsilo.cli.vmsilo import build_parser

        for action in build_parser()._subparsers._group_actions:  # type: ignore[union-attr]
            for name in getattr(action, "choices", {}) or {}:
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
