"""The Wayland wire format: a message is ``object id (u32)``, ``size << 16 | opcode (u32)``,
then its arguments, each a multiple of 4 bytes in host byte order; fds travel beside the bytes
(SCM_RIGHTS), in message order.

Decoding checks every length against the message (a string must fit and end in NUL, an array
must fit), so a hostile client cannot make the filter read past a message.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from vmsilo.wayland.protocol import Message

HEADER = struct.Struct("=II")
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")
#: libwayland's limit for one message (its connection buffer); larger ones are a violation.
MAX_MESSAGE = 4096
#: The first id of the compositor's own range (objects it creates, e.g. data offers).
SERVER_ID_BASE = 0xFF000000


class WireError(Exception):
    """A message that does not fit its signature."""


@dataclass(frozen=True, slots=True)
class NewId:
    """A new object: its id and, on an untyped new_id (``wl_registry.bind``), its interface and
    version as the message names them."""

    id: int
    interface: str | None = None
    version: int = 0


Value = int | bytes | None | NewId


def header(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int, int]:
    """``(object id, opcode, size)`` of the message at ``pos``."""
    oid, word = HEADER.unpack_from(data, pos)
    return oid, word & 0xFFFF, word >> 16


def decode(msg: Message, body: bytes | memoryview, fds: deque[int]) -> list[Value]:
    """The arguments of ``msg`` from its ``body`` (the bytes after the header); fds are taken
    from the front of ``fds``. Strings and arrays come back as bytes (a string without its NUL;
    a null string or object as ``None``/0)."""
    out: list[Value] = []
    pos = 0
    end = len(body)
    for arg in msg.args:
        code = arg.code
        if code == "h":
            if not fds:
                raise WireError(f"{msg.name}: fd missing")
            out.append(fds.popleft())
            continue
        if code == "n" and arg.interface is None:
            name = _string(body, pos, end, msg)
            pos = name[1]
            if pos + 8 > end:
                raise WireError(f"{msg.name}: truncated")
            version, oid = struct.unpack_from("=II", body, pos)
            pos += 8
            if name[0] is None:
                raise WireError(f"{msg.name}: null interface name")
            out.append(NewId(oid, name[0].decode("ascii", "replace"), version))
            continue
        if code in "sa":
            if code == "s":
                value, pos = _string(body, pos, end, msg)
            else:
                value, pos = _array(body, pos, end, msg)
            out.append(value)
            continue
        if pos + 4 > end:
            raise WireError(f"{msg.name}: truncated")
        if code == "i" or code == "f":
            out.append(I32.unpack_from(body, pos)[0])
        elif code == "n":
            out.append(NewId(U32.unpack_from(body, pos)[0]))
        else:
            out.append(U32.unpack_from(body, pos)[0])
        pos += 4
    if pos != end:
        raise WireError(f"{msg.name}: {end - pos} bytes too many")
    return out


def _string(body: bytes | memoryview, pos: int, end: int, msg: Message) -> tuple[bytes | None, int]:
    if pos + 4 > end:
        raise WireError(f"{msg.name}: truncated")
    n = U32.unpack_from(body, pos)[0]
    pos += 4
    if n == 0:
        return None, pos
    padded = (n + 3) & ~3
    if pos + padded > end:
        raise WireError(f"{msg.name}: string longer than the message")
    raw = bytes(body[pos : pos + n])
    if raw[-1] != 0:
        raise WireError(f"{msg.name}: string without NUL")
    return raw[:-1], pos + padded


def _array(body: bytes | memoryview, pos: int, end: int, msg: Message) -> tuple[bytes, int]:
    if pos + 4 > end:
        raise WireError(f"{msg.name}: truncated")
    n = U32.unpack_from(body, pos)[0]
    pos += 4
    padded = (n + 3) & ~3
    if pos + padded > end:
        raise WireError(f"{msg.name}: array longer than the message")
    return bytes(body[pos : pos + n]), pos + padded


def encode(oid: int, msg: Message, args: list[Value]) -> tuple[bytes, list[int]]:
    """One message: its bytes and the fds to send beside them."""
    parts: list[bytes] = []
    fds: list[int] = []
    for arg, value in zip(msg.args, args, strict=True):
        code = arg.code
        if code == "h":
            assert isinstance(value, int)
            fds.append(value)
        elif code == "n":
            assert isinstance(value, NewId)
            if arg.interface is None:
                assert value.interface is not None
                parts.append(_pad_string(value.interface.encode()))
                parts.append(struct.pack("=II", value.version, value.id))
            else:
                parts.append(U32.pack(value.id))
        elif code == "s":
            assert value is None or isinstance(value, bytes)
            parts.append(U32.pack(0) if value is None else _pad_string(value))
        elif code == "a":
            assert isinstance(value, bytes)
            pad = b"\0" * (-len(value) % 4)
            parts.append(U32.pack(len(value)) + value + pad)
        elif code == "i" or code == "f":
            assert isinstance(value, int)
            parts.append(I32.pack(value))
        else:
            assert isinstance(value, int) or value is None
            parts.append(U32.pack(value or 0))
    body = b"".join(parts)
    size = HEADER.size + len(body)
    if size > 0xFFFF:
        raise WireError(f"{msg.name}: {size} bytes do not fit a message")
    return HEADER.pack(oid, size << 16 | msg.opcode) + body, fds


def _pad_string(value: bytes) -> bytes:
    n = len(value) + 1
    return U32.pack(n) + value + b"\0" * (1 + (-n % 4))
