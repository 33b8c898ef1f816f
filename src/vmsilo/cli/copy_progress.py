"""vm-copy's progress bar (rich) on a terminal: bytes sent of the total SRC announced.

Updated from the relay's splice thread and SRC's message thread, so every call takes a lock;
the bar appears with the first byte or the total, and SRC's messages are printed above it.
"""

from __future__ import annotations

import threading
from typing import TextIO


class Progress:
    """rich's progress bar on a terminal: bytes sent of the total SRC announced."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._lock = threading.Lock()
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream, stderr=True, highlight=False),
            transient=False,
        )
        self._task = self._bar.add_task("vm-copy", total=None)
        self._started = False
        self._stopped = False

    def _start(self) -> None:
        if not self._started and not self._stopped:
            self._started = True
            self._bar.start()

    def total(self, n: int) -> None:
        with self._lock:
            self._bar.update(self._task, total=n)
            self._start()

    def advance(self, n: int) -> None:
        with self._lock:
            self._bar.advance(self._task, n)
            self._start()

    def message(self, text: str) -> None:
        with self._lock:
            self._bar.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        with self._lock:
            if self._started and not self._stopped:
                self._bar.stop()
            self._stopped = True
