"""What the small ``vm-*`` commands share: their parser, messages and exit statuses (SPEC §6).

They keep the original scripts' wording ("Usage: vm-start <vm-name>", "Unknown VM: x",
"Available VMs: a, b") and exit 1 on a usage error or an unknown VM. Their arguments are
parsed with argparse like every other command's; :class:`ToolParser` only swaps argparse's own
usage message and exit status 2 for the original ones.

Every tool also takes ``--help`` (the whole help on standard output, exit 0: options, exit
statuses, examples, in the style of :mod:`vmsilo.cli.helptext`) and ``--version``. ``-h``
stays what it was in the original scripts: a usage error (the usage line, exit 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from vmsilo.cli.common import Loaded, load, os_error
from vmsilo.cli.helptext import ToolHelp, VersionAction, format_tool_help, print_help
from vmsilo.config.users import UserLookup
from vmsilo.errors import UnknownVMError, VmsiloError
from vmsilo.plan.model import VmPlan

EXIT_USAGE = 1


class BadUsage(Exception):
    """argparse found the command line wrong (its own message is not shown)."""


class _ShowHelp(Exception):
    """``--help`` was given."""


class _HelpAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any):
        kw.setdefault("help", "show this help and exit")
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        raise _ShowHelp


CONFIG_HELP = "config file (default: $VMSILO_CONFIG, else /etc/vmsilo/vmsilo.toml)"


class ToolParser(argparse.ArgumentParser):
    """An argparse parser that reports a usage error as the original tool did.

    ``usage`` is printed as is on any usage error (no argparse message), and :meth:`parse`
    returns None so that the command exits :data:`EXIT_USAGE`. Every tool takes ``-c FILE`` /
    ``--config FILE``, ``--help`` (``info``'s help, else the usage text, on standard output;
    exit 0) and ``--version``.
    """

    def __init__(self, prog: str, usage: str, info: ToolHelp | None = None) -> None:
        super().__init__(prog=prog, usage=usage, add_help=False, allow_abbrev=False)
        self.usage_text = usage
        self.info = info
        self.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
        self.add_argument("--help", action=_HelpAction)
        self.add_argument("--version", action=VersionAction)

    def add_vm(self, help: str = "the VM, by its name in the config") -> None:
        """The VM name positional (a word that starts with ``-`` is a usage error, as it was)."""
        self.add_argument("vm", type=_not_an_option, metavar="VM", help=help)

    def error(self, message: str) -> NoReturn:
        raise BadUsage(message)

    def help_text(self) -> str:
        if self.info is None:
            return self.usage_text + "\n"
        return format_tool_help(self, self.info)

    def parse(
        self, argv: Sequence[str] | None, err: TextIO, out: TextIO | None = None
    ) -> argparse.Namespace | None:
        """The parsed arguments, or None after printing the usage to ``err``.

        ``--help`` prints the help on ``out`` (standard output) and exits 0, as argparse's
        own ``--help`` does (``--version`` likewise)."""
        try:
            return self.parse_args(sys.argv[1:] if argv is None else list(argv))
        except BadUsage:
            print(self.usage_text, file=err)
            return None
        except _ShowHelp:
            print_help(self.help_text(), out)
            raise SystemExit(0) from None


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
