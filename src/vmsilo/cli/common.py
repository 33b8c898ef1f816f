"""What every entry point shares: config location, loading, and turning errors into exits.

Entry points are ``main(argv=None, …)`` functions with their collaborators injectable (the user
lookup, output streams), the qubesadmin pattern, so tests call them in-process. A
:class:`~vmsilo.errors.VmsiloError` becomes one ``error:`` line (or the list of config
problems) and an exit status; a traceback is never shown to the user, not even for an
:class:`OSError` nobody expected (a user who is not root meets PermissionError): that is one
line too, with the command's usual error status.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vmsilo.config.load import load_config, parse_config
from vmsilo.config.location import config_path
from vmsilo.config.model import Config
from vmsilo.config.problems import ConfigErrors
from vmsilo.config.users import UserLookup, system_users
from vmsilo.errors import UnknownVMError, VmsiloError
from vmsilo.plan.build import build_plan
from vmsilo.plan.cache import save_plan
from vmsilo.plan.model import Plan, VmPlan


@dataclass
class Loaded:
    path: Path
    config: Config
    plan: Plan


def load(explicit: str | None, users: UserLookup | None = None) -> Loaded:
    """Read, validate and plan the config; as root, also refresh the plan cache."""
    path = config_path(explicit)
    lookup = users or system_users
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        load_config(path, lookup)  # raises the standard report for this failure
        raise
    config = parse_config(text, lookup, source=str(path))
    plan = build_plan(config, lookup)
    if users is None:
        save_plan(plan, text, config.user)
    return Loaded(path, config, plan)


def select_vm(plan: Plan, name: str) -> VmPlan:
    try:
        return plan.vms[name]
    except KeyError:
        available = ", ".join(plan.vms) or "(none)"
        raise UnknownVMError(f"unknown VM: {name}", f"Available VMs: {available}") from None


def report(error: VmsiloError, stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    if isinstance(error, ConfigErrors):
        for problem in error.problems:
            print(problem, file=out)
    else:
        print(f"error: {error}", file=out)


def os_error(error: OSError) -> VmsiloError:
    """The one-line report of an OSError that reached a command's top level."""
    what = error.strerror or str(error)
    where = f": {error.filename}" if error.filename is not None else ""
    if isinstance(error, PermissionError):
        return VmsiloError(f"{what}{where}", "this needs root here: run it with sudo")
    return VmsiloError(f"{what}{where}")


def guarded(body: Callable[[], int], error_status: int, stream: TextIO | None = None) -> int:
    """Run ``body``; user-facing errors print cleanly and exit ``error_status``."""
    try:
        return body()
    except VmsiloError as e:
        report(e, stream)
        return error_status
    except OSError as e:
        report(os_error(e), stream)
        return error_status
    except KeyboardInterrupt:
        return 130
