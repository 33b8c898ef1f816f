"""One help style for every command: ``--help`` and ``--version``.

``--help`` reads like ``systemd-run --help``: the usage line, what the command does, every
option with its description (read off the argparse parser, so the list cannot drift from
what is parsed), the exit statuses and examples. ``--version`` prints ``<prog> <version>``
from the installed package's metadata.

The ``vm-*`` tools build their help with :func:`format_tool_help` (``vm-start``, ``vm-stop``,
``vm-start-debug`` through :class:`vmsilo.cli.vm_common.ToolParser`); a tool with its own
parser (``vm-run``) can call it with its parser and its own texts, and add
:class:`VersionAction` as ``--version``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

WIDTH = 79
#: Where the descriptions start (the option column is this wide).
OPTION_COLUMN = 24


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("vmsilo")
    except metadata.PackageNotFoundError:
        import vmsilo

        return vmsilo.__version__


def version_line(prog: str) -> str:
    return f"{prog} {version()}"


class VersionAction(argparse.Action):
    """``--version``: print ``<prog> <version>`` on standard output and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any):
        kw.setdefault("help", "show the version and exit")
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(version_line(parser.prog), file=sys.stdout)
        sys.stdout.flush()
        raise SystemExit(0)


@dataclass
class ToolHelp:
    """What ``--help`` says beyond the options: the usage line, a summary, the exit statuses
    (status, meaning) and examples (command line, what it does)."""

    usage: str
    summary: str
    exit_statuses: list[tuple[str, str]] = field(default_factory=list)
    examples: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _option_label(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest).upper()
    names = sorted(action.option_strings, key=lambda s: (s.startswith("--"), s))
    label = ", ".join(names)
    if names[0].startswith("--"):
        label = "    " + label  # long-only options line up after the short ones' names
    if action.nargs != 0:
        metavar = action.metavar or action.dest.upper()
        label += f" {metavar}"
    return label


def _two_columns(label: str, text: str, indent: int = 2) -> list[str]:
    lead = " " * indent + label
    body_width = WIDTH - OPTION_COLUMN
    wrapped = textwrap.wrap(text, body_width) or [""]
    if len(lead) + 2 > OPTION_COLUMN:
        lines = [lead]
        lines += [" " * OPTION_COLUMN + w for w in wrapped]
        return lines
    lines = [lead.ljust(OPTION_COLUMN) + wrapped[0]]
    lines += [" " * OPTION_COLUMN + w for w in wrapped[1:]]
    return lines


def format_tool_help(parser: argparse.ArgumentParser, info: ToolHelp) -> str:
    """The whole ``--help`` text of a tool: usage, summary, options, exit status, examples.

    Options are read off ``parser`` (those with ``help=argparse.SUPPRESS`` stay hidden);
    positionals are described under "Arguments"."""
    lines = [info.usage, ""]
    lines += textwrap.wrap(info.summary, WIDTH)
    positionals = [a for a in parser._actions if not a.option_strings and a.help]
    options = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]
    if positionals:
        lines += ["", "Arguments:"]
        for action in positionals:
            lines += _two_columns(_option_label(action), str(action.help))
    if options:
        lines += ["", "Options:"]
        for action in options:
            lines += _two_columns(_option_label(action), str(action.help or ""))
    if info.exit_statuses:
        lines += ["", "Exit status:"]
        for status, meaning in info.exit_statuses:
            lines += _two_columns(status, meaning)
    if info.examples:
        lines += ["", "Examples:"]
        for command, what in info.examples:
            lines += ["  " + command]
            lines += ["      " + w for w in textwrap.wrap(what, WIDTH - 6)]
    for note in info.notes:
        lines += ["", *textwrap.wrap(note, WIDTH)]
    return "\n".join(lines) + "\n"


def print_help(text: str, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    stream.write(text)
    stream.flush()
