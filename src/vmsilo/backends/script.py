"""Render an argv as a standalone launcher script, for users who want to read or run it.

Every word goes through :func:`shlex.quote`, so the script runs exactly the argv vmsilo would
exec, whatever characters the paths contain.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


def launcher_script(argv: Sequence[str], vm: str, note: str = "") -> str:
    lines = [
        "#!/bin/sh",
        f"# vmsilo launcher for VM {shlex.quote(vm)}: exactly the argv `vmsilo argv` prints.",
    ]
    if note:
        lines += [f"# {line}" for line in note.splitlines()]
    lines += ["set -e", "exec " + " \\\n  ".join(shlex.quote(w) for w in argv), ""]
    return "\n".join(lines)
