"""``vmsilo doctor [--json]``: check the host for the configured VMs (exit 1 on a failure)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TextIO

from vmsilo.cli.common import load
from vmsilo.config.users import UserLookup

if TYPE_CHECKING:
    from vmsilo.lifecycle.base import App


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check that this host can run the configured VMs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.backends.doctor import VMM_CHECKS
    from vmsilo.host.doctor import diagnose

    loaded = load(args.config, users)
    findings = diagnose(loaded.plan, str(loaded.path), VMM_CHECKS)
    failed = any(f.level == "fail" for f in findings)
    if args.json:
        json.dump({"ok": not failed, "findings": [asdict(f) for f in findings]}, out, indent=2)
        out.write("\n")
        return 1 if failed else 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vmsilo doctor ({loaded.path})")
    for col in ("check", "", "finding", "hint"):
        table.add_column(col)
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for f in findings:
        table.add_row(f.check, marks[f.level], f.detail, f.hint)
    Console(file=out, highlight=False, width=140).print(table)
    return 1 if failed else 0
