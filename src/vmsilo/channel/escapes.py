"""Making guest bytes and guest text safe for a host terminal (SPEC §11.2).

A compromised guest must not drive the user's terminal (retitle it, rewrite the screen, inject
input through answer-back sequences). Like qvm-run, every control character except newline,
tab and carriage return becomes ``_``: that takes out ESC (so every CSI/OSC sequence), DEL, the
C1 controls written as UTF-8 (U+0080–U+009F) and a *lone* byte 0x80–0x9F, which is not valid
UTF-8 but which a terminal in 8-bit mode takes for a C1 control (0x9B is CSI). Bytes 0x80–0x9F
that continue a valid UTF-8 character are kept, so text in any script passes unchanged: the
host terminal is assumed to decode UTF-8 (vmsilo's guests write UTF-8).

Every replacement is ``_`` (0x5F), which can neither start nor continue a UTF-8 sequence, and
an incomplete sequence at the end of a chunk is held back until its next byte arrives: so what
one filter emits never ends inside a character. That is why each output stream needs its own
filter — two streams sharing one would let a held-back ``\\xc2`` of one complete a C1 CSI with
the first byte of the other.

Here (not in ``cli/``) because the supervisor filters the guest's netvm set-up output too and
the channel client filters the guest's EXIT and ERROR messages. Standard library only.
"""

from __future__ import annotations

import codecs
import re

_KEEP = {0x09, 0x0A, 0x0D}
#: ASCII fast path: C0 controls but tab/LF/CR, and DEL, become "_".
_TABLE = bytes((b if (b >= 0x20 or b in _KEEP) and b != 0x7F else ord("_")) for b in range(256))
#: In decoded text: C0 controls but tab/LF/CR, DEL, C1 controls, and the lone bytes 0x80–0x9F
#: that surrogateescape decoding gives as U+DC80–U+DC9F.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\udc80-\udc9f]")
#: For a one-line message: every control (newline too, so a guest cannot start a line that
#: looks like the host's own), and any surrogate (unencodable), and the bidi overrides that
#: could reorder what the user reads.
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


class EscapeFilter:
    """One output stream's filter: stateful across chunks (a UTF-8 character split between two
    reads is decided once it is complete). Use one instance per stream."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def __call__(self, data: bytes) -> bytes:
        if data.isascii() and not self._decoder.getstate()[0]:
            return data.translate(_TABLE)
        text = self._decoder.decode(data)
        return _UNSAFE.sub("_", text).encode("utf-8", "surrogateescape")

    def flush(self) -> bytes:
        """What is still held back at the end of the stream: an incomplete character, shown
        as ``_`` per byte (never as raw bytes a later writer could complete)."""
        pending = self._decoder.getstate()[0]
        self._decoder.reset()
        return b"_" * len(pending)


def printable(text: str, limit: int = 1000) -> str:
    """``text`` (a message from the guest) made safe to print as (part of) one line: every
    control character ``_``, at most ``limit`` characters (``…`` marks a cut)."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return _UNSAFE_LINE.sub("_", text)
