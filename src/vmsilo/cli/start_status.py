"""The status line of a long start on a terminal: "starting work: booting the guest… 3.1 s".

``vm-run``, ``vm-start`` and ``vmsilo start`` pass one to the lifecycle app when they may
start a VM (never on vm-run's warm path); the app reports the supervisor's steps to it as they
happen (:mod:`vmsilo.lifecycle.progress`). It draws nothing at all unless standard error is a
terminal, and rich is imported only once there is a step to show, so a start without a
terminal, or a VM that is already running, pays nothing for it. The line is transient: it is
erased when the start is over, or, in vm-run, just before the program's own output.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, TextIO


class StartStatus:
    """A spinner, what the start is doing and the time it has taken so far, on ``stream``."""

    def __init__(self, vm: str, stream: TextIO) -> None:
        self.vm = vm
        self.stream = stream
        self.started = time.monotonic()
        self.text = "starting"
        self._lock = threading.Lock()
        self._live: Any = None
        self._over = False

    def step(self, text: str) -> None:
        with self._lock:
            if self._over:
                return
            self.text = text
            if self._live is None:
                self._live = self._start_live()

    def done(self) -> None:
        """Erase the line; returns once it is erased, whichever thread called first."""
        with self._lock:
            self._over = True
            if self._live is not None:
                self._live.stop()
                self._live = None

    def line(self) -> str:
        return f"starting {self.vm}: {self.text}… {time.monotonic() - self.started:.1f} s"

    def _start_live(self) -> Any:
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner
        from rich.text import Text

        status = self

        class _Line:
            def __init__(self) -> None:
                self.spinner = Spinner("dots", style="cyan")

            def __rich__(self) -> Spinner:
                self.spinner.update(text=Text(status.line()))
                return self.spinner

        console = Console(file=self.stream, stderr=True, highlight=False)
        live = Live(
            _Line(),
            console=console,
            refresh_per_second=10,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        live.start()
        return live


def start_status(vm: str, stream: TextIO) -> StartStatus | None:
    """A status line for starting ``vm`` if ``stream`` is a terminal, else None."""
    try:
        if not os.isatty(stream.fileno()):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return StartStatus(vm, stream)
