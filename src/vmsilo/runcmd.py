"""The one wrapper through which vmsilo runs short-lived host commands.

Commands are argv lists, never shell strings. A missing binary or a failing command becomes a
:class:`~vmsilo.errors.VmsiloError` that names the command, its exit status or signal, and the
tail of its stderr, so callers never have to format subprocess failures themselves.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence

from vmsilo.errors import VmsiloError


def describe_status(returncode: int) -> str:
    """'exit status 3' or 'killed by SIGTERM'."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: bytes | None = None,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    hint: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion; raise a VmsiloError on failure when ``check``."""
    args = list(argv)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise VmsiloError(f"{args[0]}: command not found", hint or "install it") from e
    except subprocess.TimeoutExpired as e:
        raise VmsiloError(f"{shlex.join(args)}: timed out after {timeout} s", hint) from e
    if check and proc.returncode != 0:
        tail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-5:]
        detail = ("\n  " + "\n  ".join(tail)) if tail else ""
        raise VmsiloError(
            f"{shlex.join(args)} failed: {describe_status(proc.returncode)}{detail}", hint
        )
    return proc
