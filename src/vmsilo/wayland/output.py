"""What the filter sends on one socket: messages with their fds, cut so that no send carries
more fds than libwayland takes in one ``recvmsg`` (a longer list would be cut off there, and a
message's fds would arrive without it)."""

from __future__ import annotations

import contextlib
import os
from collections import deque

#: libwayland receives at most 28 fds per ``recvmsg`` (``MAX_FDS_OUT``): never send more.
MAX_FDS_PER_SEND = 28

Chunk = tuple[bytes, list[int]]


class Output:
    """Messages to send, grouped so that no send carries more than 28 fds."""

    __slots__ = ("_data", "_fds", "chunks")

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self._data = bytearray()
        self._fds: list[int] = []

    def add(self, data: bytes | bytearray, fds: list[int] | tuple[()] = ()) -> None:
        if fds and len(self._fds) + len(fds) > MAX_FDS_PER_SEND:
            self._cut()
        self._data += data
        self._fds.extend(fds)

    def _cut(self) -> None:
        if self._data:
            self.chunks.append((bytes(self._data), self._fds))
        self._data = bytearray()
        self._fds = []

    def take(self) -> list[Chunk]:
        self._cut()
        chunks, self.chunks = self.chunks, []
        return chunks


def close_chunks(chunks: list[Chunk]) -> None:
    for _, fds in chunks:
        close_fds(fds)


def close_fds(fds: list[int] | deque[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
