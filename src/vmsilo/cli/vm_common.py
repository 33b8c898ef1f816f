"""What the small ``vm-*`` commands share: their messages and exit statuses (SPEC §6).

They keep the original scripts' wording ("Usage: vm-start <vm-name>", "Unknown VM: x",
"Available VMs: a, b") and exit 1 on a usage error or an unknown VM.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from vmsilo.cli.common import Loaded, load
from vmsilo.config.users import UserLookup
from vmsilo.errors import UnknownVMError, VmsiloError
from vmsilo.plan.model import VmPlan

EXIT_USAGE = 1


def pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``-c FILE`` / ``--config FILE`` from the front of argv."""
    if len(argv) >= 2 and argv[0] in ("-c", "--config"):
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--config="):
        return argv[0].split("=", 1)[1], argv[1:]
    return None, argv


def resolve(loaded: Loaded, name: str, err: TextIO) -> VmPlan | None:
    vm = loaded.plan.vms.get(name)
    if vm is None:
        print(f"Unknown VM: {name}", file=err)
        print(f"Available VMs: {', '.join(loaded.plan.vms)}", file=err)
    return vm


def run_tool(
    prog: str,
    body: Callable[[], int],
    err: TextIO | None = None,
) -> int:
    stream = err or sys.stderr
    try:
        return body()
    except UnknownVMError as e:
        print(f"{prog}: {e}", file=stream)
        return EXIT_USAGE
    except VmsiloError as e:
        print(f"{prog}: {e}", file=stream)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def load_for_tool(config: str | None, users: UserLookup | None, *, cache: bool = False) -> Loaded:
    return load(config, users, cache=cache)
