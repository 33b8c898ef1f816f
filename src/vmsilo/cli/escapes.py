"""Filtering guest output that goes to a terminal (vm-run without ``-t``).

A compromised guest must not be able to drive the user's terminal (retitle it, rewrite the
screen, inject input through answer-back sequences). Like qvm-run, every control character
except newline, tab and carriage return is replaced with ``_``; that takes out ESC (so every
CSI/OSC sequence), the C1 controls written as UTF-8 (U+0080–U+009F) and DEL.
"""

from __future__ import annotations

_KEEP = {0x09, 0x0A, 0x0D}
_TABLE = bytes((b if (b >= 0x20 or b in _KEEP) and b != 0x7F else ord("_")) for b in range(256))


class EscapeFilter:
    """Stateful across chunks, so a UTF-8 C1 control split between two reads is still caught."""

    def __init__(self) -> None:
        self._pending = b""

    def __call__(self, data: bytes) -> bytes:
        data = self._pending + data
        self._pending = b""
        if data.endswith(b"\xc2"):
            data, self._pending = data[:-1], b"\xc2"
        out = data.translate(_TABLE)
        # C1 controls: U+0080..U+009F are encoded as C2 80..C2 9F
        if b"\xc2" in out:
            parts = bytearray()
            i = 0
            while i < len(out):
                if out[i] == 0xC2 and i + 1 < len(out) and 0x80 <= out[i + 1] <= 0x9F:
                    parts += b"_"
                    i += 2
                else:
                    parts.append(out[i])
                    i += 1
            out = bytes(parts)
        return out


class LogFilter(EscapeFilter):
    """For a console log: escapes and controls filtered as above, and carriage returns dropped
    (a console writes CRLF; a lone CR would let a guest overwrite the host timestamp at the
    start of its line on the screen)."""

    def __call__(self, data: bytes) -> bytes:
        return super().__call__(data.replace(b"\r", b""))
