"""vm-run -t's terminal set-up on a real (local) pty: what was typed before raw mode."""

from __future__ import annotations

import os
import termios

from vmsilo.channel.client import enter_raw_mode


def _read_all(fd: int) -> bytes:
    import select

    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        data += os.read(fd, 4096)
    return data


def _line_discipline_took(master: int, slave: int) -> None:
    """Wait until the line discipline processed what was written (a kernel work item does it
    after the write returns): the pty echoes it back on the master then."""
    import select

    echoed = b""
    while b"cd" not in echoed:
        assert select.select([master], [], [], 5)[0], echoed
        echoed += os.read(master, 4096)
    assert select.select([slave], [], [], 5)[0]


def test_an_eof_typed_before_raw_mode_is_no_nul() -> None:
    """``script`` writes Ctrl-D when its input ends; in cooked mode the line discipline keeps it
    as a NUL end-of-line mark, which a plain switch to raw mode hands over as data."""
    master, slave = os.openpty()
    try:
        saved = termios.tcgetattr(slave)
        os.write(master, b"ab\n\x04cd")
        _line_discipline_took(master, slave)
        typed = enter_raw_mode(slave, saved)
        assert typed == b"ab\n\x04"  # the lines, the EOF as the terminal's EOF character
        os.write(master, b"\x04e")  # after the switch: plain bytes
        rest = _read_all(slave)
        assert rest == b"cd\x04e"
        assert b"\0" not in typed + rest
        assert not termios.tcgetattr(slave)[3] & termios.ICANON
    finally:
        os.close(master)
        os.close(slave)


def test_nothing_typed_ahead() -> None:
    master, slave = os.openpty()
    try:
        assert enter_raw_mode(slave, termios.tcgetattr(slave)) == b""
        os.write(master, b"x")
        assert _read_all(slave) == b"x"
    finally:
        os.close(master)
        os.close(slave)
