"""What a start tells its caller on the way: the steps a long start is taking.

The lifecycle app reports to a :class:`StartProgress` the caller passes (a status line on a
terminal, see :mod:`vmsilo.cli.start_status`); the embedded supervisor's steps arrive as
``step …`` lines on its milestone pipe, systemd's start is one step. Calls may come from a
thread of their own (the one reading the pipe); ``done`` may come more than once.
"""

from __future__ import annotations

from typing import Protocol


class StartProgress(Protocol):
    def step(self, text: str) -> None:
        """The start is now doing ``text`` (e.g. "booting the guest")."""

    def done(self) -> None:
        """The start is over (ready, failed, or the program's output begins): be gone."""
