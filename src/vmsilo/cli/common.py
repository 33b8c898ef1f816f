"""What every entry point shares: config location, loading, and turning errors into exits.

Entry points are ``main(argv=None, …)`` functions with their collaborators injectable (the user
lookup, output streams), the qubesadmin pattern, so tests call them in-process. A
:class:`~vmsilo.errors.VmsiloError` becomes one ``error:`` line (or the list of config
problems) and an exit status; a traceback is never shown to the user, not even for an
:class:`OSError` nobody expected (a user who is not root meets PermissionError): that is one
line too, with the command's usual error status.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Callable, Iterator
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


def load(explicit: str | None, users: UserLookup | None = None, *, cache: bool = False) -> Loaded:
    """Read, validate and plan the config.

    ``cache``: as root, also refresh the plan cache a cold ``vm-run`` reuses
    (:mod:`vmsilo.plan.cache`). Only the verbs that start VMs (or install them) ask for it, so a
    read-only verb (``check``, ``plan``, ``status``, …) writes nothing — and a ``plan --json``
    of a large fleet does not pay for serialising the plan twice.
    """
    path = config_path(explicit)
    lookup = users or system_users
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        load_config(path, lookup)  # raises the standard report for this failure
        raise
    with _gc_paused():
        config = parse_config(text, lookup, source=str(path))
        plan = build_plan(config, lookup)
    if cache and users is None:
        save_plan(plan, text, config.user)
    return Loaded(path, config, plan)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Validation and planning allocate only objects that live on (the config, the plan), so
    the cyclic collector's full passes find nothing, yet each one walks everything built so
    far: with thousands of VMs that made planning grow faster than the fleet (measured: a
    quarter of `plan --json` of 2000 VMs). Pause it meanwhile; what is garbage is still freed
    by reference counting, and cycles are collected once it runs again."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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


# ------------------------------------------------ stopping (vmsilo stop, vm-stop)

WITH_CLIENTS_HELP = (
    "for a netvm whose client VMs run: stop those clients first, then the netvm (refused"
    " without it)"
)
KILL_HELP = "kill the VM now: no power button, no stopTimeout wait (its supervisor still cleans up)"


def add_stop_options(parser: argparse.ArgumentParser) -> None:
    """``--with-clients`` and ``--kill``; ``--force`` is the old, hidden name of the first."""
    parser.add_argument("--with-clients", action="store_true", help=WITH_CLIENTS_HELP)
    parser.add_argument("--kill", action="store_true", help=KILL_HELP)
    parser.add_argument("--force", dest="old_force", action="store_true", help=argparse.SUPPRESS)


def stop_with_clients(args: argparse.Namespace, prog: str, err: TextIO) -> bool:
    """Whether to stop a netvm's clients first; a note on ``err`` for the deprecated --force."""
    if args.old_force:
        print(
            f"{prog}: note: --force is deprecated, it means --with-clients (stop a netvm's"
            " clients first); --kill stops at once",
            file=err,
        )
    return bool(args.with_clients or args.old_force)
