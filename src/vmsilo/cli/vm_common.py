"""What the small ``vm-*`` commands share: their parser, messages and exit statuses (SPEC §6).

They keep the original scripts' wording ("Usage: vm-start <vm-name>", "Unknown VM: x",
"Available VMs: a, b") and exit 1 on a usage error or an unknown VM. Their arguments are
parsed with argparse like every other command's; :class:`ToolParser` only swaps argparse's own
usage message and exit status 2 for the original ones.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

from vmsilo.cli.common import Loaded, load, os_error
from vmsilo.config.users import UserLookup
from vmsilo.errors import UnknownVMError, VmsiloError
from vmsilo.plan.model import VmPlan

EXIT_USAGE = 1


class BadUsage(Exception):
    """argparse found the command line wrong (its own message is not shown)."""


class ToolParser(argparse.ArgumentParser):
    """An argparse parser that reports a usage error as the original tool did.

    ``usage`` is printed as is on any usage error (no argparse message, no ``-h``), and
    :meth:`parse` returns None so that the command exits :data:`EXIT_USAGE`. Every tool takes
    ``-c FILE`` / ``--config FILE``.
    """

    def __init__(self, prog: str, usage: str) -> None:
        super().__init__(prog=prog, usage=usage, add_help=False, allow_abbrev=False)
        self.usage_text = usage
        self.add_argument("-c", "--config", metavar="FILE")

    def add_vm(self) -> None:
        """The VM name positional (a word that starts with ``-`` is a usage error, as it was)."""
        self.add_argument("vm", type=_not_an_option)

    def error(self, message: str) -> NoReturn:
        raise BadUsage(message)

    def parse(self, argv: Sequence[str] | None, err: TextIO) -> argparse.Namespace | None:
        """The parsed arguments, or None after printing the usage to ``err``."""
        try:
            return self.parse_args(sys.argv[1:] if argv is None else list(argv))
        except BadUsage:
            print(self.usage_text, file=err)
            return None


def _not_an_option(word: str) -> str:
    if word.startswith("-"):
        raise argparse.ArgumentTypeError(f"{word}: not a VM name")
    return word


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
    """Run a tool's ``body``: its failures print one ``prog: …`` line and exit 1 (SPEC §6);
    an OSError (e.g. PermissionError for a user who is not root) too, never a traceback."""
    stream = err or sys.stderr
    try:
        return body()
    except UnknownVMError as e:
        print(f"{prog}: {e}", file=stream)
        return EXIT_USAGE
    except VmsiloError as e:
        print(f"{prog}: {e}", file=stream)
        return EXIT_USAGE
    except OSError as e:
        print(f"{prog}: {os_error(e)}", file=stream)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def load_for_tool(config: str | None, users: UserLookup | None, *, cache: bool = False) -> Loaded:
    return load(config, users, cache=cache)
