"""The status line of a long start: the supervisor's steps through the milestone pipe to a
status that draws only on a terminal."""

from __future__ import annotations

import io
import os
import select
from typing import Any

from vmsilo.cli.start_status import StartStatus, start_status
from vmsilo.lifecycle.spawn import StartWatch


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def step(self, text: str) -> None:
        self.events.append(text)

    def done(self) -> None:
        self.events.append("<done>")


def _watch(lines: bytes) -> StartWatch:
    r, w = os.pipe()
    os.write(w, lines)
    os.close(w)
    vm: Any = None
    return StartWatch(os.fdopen(r, "rb"), vm)


def test_steps_reach_the_progress_until_ready() -> None:
    watch = _watch(b"step probing KVM\nstep booting the guest\nready\nstep never\n")
    rec = Recorder()
    watch.follow(rec)
    assert watch.failure() is None
    assert rec.events == ["probing KVM", "booting the guest", "<done>"]
    watch.close()


def test_a_failure_after_steps_is_still_the_supervisors_last_words() -> None:
    watch = _watch(b"step starting qemu\nfailed qemu: no such file\n")
    rec = Recorder()
    watch.follow(rec)
    assert watch.failure() == "qemu: no such file"
    assert rec.events == ["starting qemu", "<done>"]
    # without a progress (no terminal) the steps are skipped as before
    assert _watch(b"step x\nfailed boom\n").failure() == "boom"


def test_no_terminal_no_status() -> None:
    assert start_status("work", io.StringIO()) is None
    with open(os.devnull, "w") as null:
        assert start_status("work", null) is None


def test_on_a_terminal_the_line_is_drawn_then_erased() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        status = start_status("work", tty)
        assert isinstance(status, StartStatus)
        status.step("booting the guest")
        status.step("configuring the netvm")
        status.done()
        status.done()  # the end may be reported twice (ready, and the first output)
        status.step("late")  # and steps after it draw nothing
        seen = b""
        while select.select([master], [], [], 0.5)[0]:
            seen += os.read(master, 65536)
    os.close(master)
    assert "starting work: configuring the netvm…".encode() in seen
    assert b" s" in seen and b"late" not in seen
    assert seen.rstrip().endswith(b"\x1b[2K")  # erased: transient
