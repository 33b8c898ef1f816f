"""Filtering guest output that goes to a terminal (vm-run without ``-t``, ``vmsilo logs``).

The filter itself lives in :mod:`vmsilo.channel.escapes` (the supervisor and the channel client
use it too); this module adds the console-log variant.
"""

from __future__ import annotations

from vmsilo.channel.escapes import EscapeFilter as EscapeFilter
from vmsilo.channel.escapes import printable as printable


class LogFilter(EscapeFilter):
    """For a console log: escapes and controls filtered as above, and carriage returns dropped
    (a console writes CRLF; a lone CR would let a guest overwrite the host timestamp at the
    start of its line on the screen)."""

    def __call__(self, data: bytes) -> bytes:
        return super().__call__(data.replace(b"\r", b""))
