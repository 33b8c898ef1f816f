"""The vmsilo command-channel wire protocol: frames, requests, readiness, versions.

One module of ~800 lines on purpose: the ready port's lines (hello, farewell, and fastStart's
restore/mount/settle lines) and the frames share one version, one magic, and the same bounded
JSON reading (:func:`_loads`, :func:`_small_int`: deep nesting and huge numbers are malformed
input, never a crash). Moving the lines out would make two modules import each other's
privates; the module is stdlib-only and copied into the guest whole either way.

Everything that crosses between ``vm-run``, the per-VM supervisor and the guest agent is a
*frame*. One codec serves every hop (client ↔ command socket, supervisor ↔ virtio-serial mux,
supervisor ↔ per-session vsock connection), so the supervisor relays sessions by rewriting a
session id instead of re-encoding anything.

Frame layout (big endian, 8-byte header, frozen for every protocol version so that a peer of
another version can still be *recognised* and answered with a version error)::

    +---------+--------+----------------+--------------------+---------------+
    | version | type   | payload length | session id         | payload       |
    | u8      | u8     | u16            | u32                | length bytes  |
    +---------+--------+----------------+--------------------+---------------+

A whole frame is at most :data:`MAX_FRAME` (64 KiB) bytes. Because the header is fixed-size and
always parseable, a bad frame never desynchronises the stream: the reader skips its payload and
ends only the session the frame named ("a malformed frame ends that session only").

Flow control: every DATA frame (stdin, stdout, stderr) costs ``len(payload) +``
:data:`FRAME_COST` credits. Each direction of each session starts with :data:`WINDOW` credits;
the receiver returns credits (CREDIT frame, u32) once it has *delivered* the data (written it to
the process or to the user's terminal). So at most one window per direction and session is ever
in flight, which is what lets the supervisor's relay bound its buffers per session and keeps a
slow reader from stalling other sessions on the same mux.

This module is copied into the guest image: standard library only.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import signal
import struct

from vmsilo.channel.escapes import printable
from vmsilo.contracts.ports import CHANNEL_PORT, READY_PORT
from vmsilo.contracts.ports import VSOCK_PORT as VSOCK_PORT  # the agent's port (SPEC §6)

#: ``typing.TYPE_CHECKING`` without importing typing, which vm-run does not otherwise need.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

#: Version of the frame protocol; bump on any incompatible change. Client and agent must agree.
PROTOCOL_VERSION = 1

#: Largest frame on the wire, header included (SPEC §6: frames ≤ 64 KiB).
MAX_FRAME = 64 * 1024
HEADER = struct.Struct("!BBHI")
HEADER_SIZE = HEADER.size
#: Largest payload a frame may carry.
MAX_PAYLOAD = MAX_FRAME - HEADER_SIZE
#: Largest DATA payload senders produce: small enough that sessions interleave fairly on a mux.
CHUNK = 32 * 1024
#: Per-session, per-direction flow-control window in credits.
WINDOW = 256 * 1024
#: Credits a DATA frame costs on top of its payload, so that a peer sending tiny frames cannot
#: make a receiver queue unboundedly many frame objects within one window.
FRAME_COST = 64
#: A receiver may hold this many queued cost units per session before it declares the peer in
#: violation: one window of DATA plus as many small control frames (credits, signals) as the
#: window can generate, plus slack.
QUEUE_LIMIT = 2 * WINDOW + 64 * FRAME_COST

#: The only vsock peer the agent accepts: the host.
VSOCK_HOST_CID = 2
#: Source ports below this need root on the host: the supervisor connects from one (§11.1).
VSOCK_PRIVILEGED_PORTS = 1024

#: virtio port names (SPEC §4/§6), spelled once in :mod:`vmsilo.contracts.ports`.
READY_PORT_NAME = READY_PORT
CHANNEL_PORT_NAME = CHANNEL_PORT

#: Signals a client may forward to the guest process group (SIGWINCH travels as WINSIZE).
FORWARDED_SIGNALS: frozenset[int] = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
)

#: The hint every version mismatch carries.
VERSION_HINT = "rebuild the image (vmsilo image build) so the guest agent matches this vmsilo"


class FrameType(enum.IntEnum):
    """Frame types. Direction: C = client (host) → agent, A = agent → client, L = link/relay."""

    OPEN = 1  # C: JSON ExecRequest; first frame of every session
    STDIN = 2  # C: data for the process's stdin (costs credit)
    STDIN_EOF = 3  # C: stdin reached EOF; the agent half-closes the process's stdin
    SIGNAL = 4  # C: u8 signal number, forwarded to the process group
    WINSIZE = 5  # C: u16 rows, u16 cols (pty sessions)
    CREDIT = 6  # C/A: u32 credits returned to the peer
    STDOUT = 7  # A: process stdout (or pty output); costs credit
    STDERR = 8  # A: process stderr; costs credit
    EXIT = 9  # A: JSON {"status": int, "message": str?}; ends the session
    ERROR = 10  # C/A/L: JSON {"code": str, "message": str, "version": int}; ends the session
    RESET = 11  # L: the client went away; the agent hangs up the process group


#: Frame types whose payload costs flow-control credit.
DATA_TYPES: frozenset[int] = frozenset({FrameType.STDIN, FrameType.STDOUT, FrameType.STDERR})
#: Frame types after which the sender forgets the session.
TERMINAL_TYPES: frozenset[int] = frozenset({FrameType.EXIT, FrameType.ERROR, FrameType.RESET})


class ChannelError(Exception):
    """A failure of the channel itself (not of the guest program); vm-run exits 255 on it.

    Carries a ``hint`` like :class:`vmsilo.errors.VmsiloError` without importing it, because
    this package also runs in the guest where only the channel and agent are installed.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ProtocolError(ChannelError):
    """A malformed or out-of-order frame; ends the one session it belongs to."""


class ProtocolVersionError(ProtocolError):
    """Client and guest agent speak different protocol versions (a kind of malformed frame)."""

    def __init__(self, local: int, remote: int | None) -> None:
        peer = "unknown" if remote is None else str(remote)
        super().__init__(
            f"guest agent speaks channel protocol version {peer}, vmsilo speaks {local}",
            VERSION_HINT,
        )
        self.local = local
        self.remote = remote


class _Record:
    """An immutable value with equality, hash and repr over its ``__slots__``.

    What ``@dataclass(frozen=True)`` gave these types, without importing :mod:`dataclasses`
    (which imports :mod:`inspect`): ``vm-run`` loads this module on every call, and its
    start-up time is the point (see :mod:`vmsilo.channel.blocking_client`)."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def _init(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Frame(_Record):
    """One decoded frame. ``version`` is kept so receivers can report mismatches."""

    __slots__ = ("payload", "session", "type", "version")
    type: int
    session: int
    payload: bytes
    version: int

    def __init__(
        self, type: int, session: int, payload: bytes = b"", version: int = PROTOCOL_VERSION
    ) -> None:
        self._init(type=type, session=session, payload=payload, version=version)

    @property
    def cost(self) -> int:
        """Queue/credit cost: what a receiver accounts for while this frame sits in memory."""
        return len(self.payload) + FRAME_COST


def encode_frame(ftype: int, session: int, payload: bytes = b"") -> bytes:
    """Serialise one frame; raises ValueError if it would exceed :data:`MAX_FRAME`."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(PROTOCOL_VERSION, ftype, len(payload), session) + payload


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """(version, type, length, session) of an 8-byte header."""
    version, ftype, length, session = HEADER.unpack(header)
    return version, ftype, length, session


def validate_frame(frame: Frame) -> None:
    """Raise ProtocolError / ProtocolVersionError if ``frame`` is not acceptable at all.

    Checks only what is independent of session state: version byte, known type, payload size,
    non-empty data.
    """
    if frame.version != PROTOCOL_VERSION:
        raise ProtocolVersionError(PROTOCOL_VERSION, frame.version)
    if frame.type not in _KNOWN_TYPES:
        raise ProtocolError(f"unknown frame type {frame.type}")
    if len(frame.payload) > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {len(frame.payload)} bytes is too large")
    if frame.type in DATA_TYPES and not frame.payload:
        raise ProtocolError("empty data frame")


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


# --------------------------------------------------------------------------- small payloads


def encode_u32(value: int) -> bytes:
    return struct.pack("!I", value)


def decode_u32(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError("bad u32 payload")
    (value,) = struct.unpack("!I", payload)
    return int(value)


def encode_signal(signum: int) -> bytes:
    return struct.pack("!B", signum)


def decode_signal(payload: bytes) -> int:
    if len(payload) != 1:
        raise ProtocolError("bad signal payload")
    signum = payload[0]
    if signum not in FORWARDED_SIGNALS:
        raise ProtocolError(f"signal {signum} may not be forwarded")
    return signum


def encode_winsize(rows: int, cols: int) -> bytes:
    return struct.pack("!HH", max(0, min(rows, 0xFFFF)), max(0, min(cols, 0xFFFF)))


def decode_winsize(payload: bytes) -> tuple[int, int]:
    if len(payload) != 4:
        raise ProtocolError("bad window size payload")
    rows, cols = struct.unpack("!HH", payload)
    return int(rows), int(cols)


def encode_json(obj: Mapping[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_PAYLOAD:
        raise ValueError("JSON payload too large for one frame")
    return data


def _loads(data: bytes) -> Any:
    """json.loads of bytes from a peer; ValueError for anything that is not plain JSON.

    Deep nesting (``[[[[…``) makes the parser raise RecursionError and an integer of more
    than 4300 digits ValueError: both are just malformed input here, never a crash of the
    reader (SPEC §11.2)."""
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _small_int(value: object, top: int = 0xFFFF) -> int | None:
    """``value`` if it is an int in 0..top (a version, a pid), else None: a guest's huge
    number never reaches a message or a comparison."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top:
        return value
    return None


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = _loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"bad JSON payload: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON payload is not an object")
    return obj


def encode_exit(status: int, message: str | None = None) -> bytes:
    obj: dict[str, Any] = {"status": status}
    if message:
        obj["message"] = message
    return encode_json(obj)


def decode_exit(payload: bytes) -> tuple[int, str | None]:
    """(status, message); the message is guest text made safe to print on a terminal."""
    obj = decode_json(payload)
    status = obj.get("status")
    message = obj.get("message")
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 255:
        raise ProtocolError("bad exit status")
    return status, printable(message) if isinstance(message, str) and message else None


#: ERROR messages are cut to this many characters, so that an ERROR frame always fits.
MAX_ERROR_MESSAGE = 4000


def encode_error(code: str, message: str, version: int = PROTOCOL_VERSION) -> bytes:
    """The payload of an ERROR frame (the one place that builds one), message truncated.

    ``version`` is the protocol version the frame reports: ours, except when the supervisor
    relays a guest agent's incompatible one.
    """
    return encode_json({"code": code, "message": message[:MAX_ERROR_MESSAGE], "version": version})


def decode_error(payload: bytes) -> ChannelError:
    """The exception an ERROR frame stands for (version errors become ProtocolVersionError).

    The message may come from the guest: it is made safe to print on a terminal."""
    try:
        obj = decode_json(payload)
    except ProtocolError:
        return ChannelError("guest agent reported an unreadable error")
    remote = obj.get("version")
    if obj.get("code") == "version":
        return ProtocolVersionError(PROTOCOL_VERSION, _small_int(remote))
    message = obj.get("message")
    text = printable(message, MAX_ERROR_MESSAGE) if isinstance(message, str) else "unknown error"
    return ChannelError(f"channel: {text}")


# --------------------------------------------------------------------------- exec request


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("expected a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ProtocolError("bad base64 string") from None


def _to_bytes(value: str | bytes) -> bytes:
    """Arguments travel as the exact bytes the host OS gave us (surrogateescape for str)."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


class ExecRequest(_Record):
    """What to run in the guest, as sent in the OPEN frame.

    ``argv`` is executed as is (no shell); every element travels as base64 of its exact bytes,
    so spaces, quotes, ``$``, newlines, empty strings and non-UTF-8 bytes survive. ``env`` holds
    ``K=V`` additions on top of the agent's clean base environment. ``user`` is ``None`` for the
    guest's default user, or a user name (``"root"``).
    """

    __slots__ = ("argv", "cols", "cwd", "detach", "env", "rows", "term", "tty", "user", "version")
    argv: Sequence[str | bytes]
    env: Sequence[str | bytes]
    cwd: str | bytes | None
    user: str | None
    tty: bool
    detach: bool
    term: str | None
    rows: int
    cols: int
    version: int

    def __init__(
        self,
        argv: Sequence[str | bytes],
        env: Sequence[str | bytes] = (),
        cwd: str | bytes | None = None,
        user: str | None = None,
        tty: bool = False,
        detach: bool = False,
        term: str | None = None,
        rows: int = 0,
        cols: int = 0,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self._init(
            argv=argv,
            env=env,
            cwd=cwd,
            user=user,
            tty=tty,
            detach=detach,
            term=term,
            rows=rows,
            cols=cols,
            version=version,
        )

    def replace(self, **changes: Any) -> ExecRequest:
        """A copy with ``changes`` (what ``dataclasses.replace`` did)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return ExecRequest(**values)

    def argv_bytes(self) -> list[bytes]:
        return [_to_bytes(a) for a in self.argv]

    def env_bytes(self) -> list[bytes]:
        return [_to_bytes(e) for e in self.env]

    def cwd_bytes(self) -> bytes | None:
        return None if self.cwd is None else _to_bytes(self.cwd)

    def validate(self) -> None:
        """Raise ValueError for requests no guest could execute (caught before sending)."""
        argv = self.argv_bytes()
        if not argv or not argv[0]:
            raise ValueError("empty command")
        for a in argv:
            if b"\0" in a:
                raise ValueError("arguments may not contain NUL bytes")
        for e in self.env_bytes():
            if b"\0" in e or b"=" not in e or e.startswith(b"="):
                raise ValueError(f"bad environment entry {e!r}: expected K=V")
        cwd = self.cwd_bytes()
        if cwd is not None and (not cwd or b"\0" in cwd):
            raise ValueError("bad working directory")
        if self.user is not None and (not self.user or "\0" in self.user):
            raise ValueError("bad user name")

    def encode(self) -> bytes:
        """The OPEN payload; raises ValueError if invalid or larger than one frame."""
        self.validate()
        cwd = self.cwd_bytes()
        return encode_json(
            {
                "version": self.version,
                "argv": [_b64(a) for a in self.argv_bytes()],
                "env": [_b64(e) for e in self.env_bytes()],
                "cwd": None if cwd is None else _b64(cwd),
                "user": self.user,
                "tty": self.tty,
                "detach": self.detach,
                "term": self.term,
                "rows": self.rows,
                "cols": self.cols,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> ExecRequest:
        """Parse an OPEN payload; ProtocolVersionError first, then ProtocolError on bad input."""
        obj = decode_json(payload)
        version = obj.get("version")
        if version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                PROTOCOL_VERSION, version if isinstance(version, int) else None
            )
        argv = obj.get("argv")
        env = obj.get("env", [])
        if not isinstance(argv, list) or not isinstance(env, list):
            raise ProtocolError("argv and env must be lists")
        cwd_raw = obj.get("cwd")
        user = obj.get("user")
        term = obj.get("term")
        rows, cols = obj.get("rows", 0), obj.get("cols", 0)
        if user is not None and not isinstance(user, str):
            raise ProtocolError("user must be a string")
        if term is not None and not isinstance(term, str):
            raise ProtocolError("term must be a string")
        if not isinstance(rows, int) or not isinstance(cols, int):
            raise ProtocolError("rows/cols must be integers")
        req = cls(
            argv=[_unb64(a) for a in argv],
            env=[_unb64(e) for e in env],
            cwd=None if cwd_raw is None else _unb64(cwd_raw),
            user=user,
            tty=bool(obj.get("tty", False)),
            detach=bool(obj.get("detach", False)),
            term=term,
            rows=rows,
            cols=cols,
        )
        try:
            req.validate()
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        return req


#: Stream services the host may open instead of a program (SPEC §9.1): the control stream on
#: which the guest asks for Wayland streams, and one such stream (by the guest's ticket).
SERVICE_WAYLAND_CONTROL = "wayland-control"
SERVICE_WAYLAND = "wayland"
SERVICES = (SERVICE_WAYLAND_CONTROL, SERVICE_WAYLAND)
#: Tickets are small numbers the guest hands out; anything bigger is malformed.
MAX_TICKET = 0xFFFFFFFF


class ServiceRequest(_Record):
    """An OPEN that names a stream service instead of a program.

    Only the supervisor sends these: it refuses them from command-socket clients, so no local
    account can take a guest's Wayland connection (SPEC §11.1: every stream is host-opened)."""

    __slots__ = ("service", "ticket")
    service: str
    ticket: int

    def __init__(self, service: str, ticket: int = 0) -> None:
        self._init(service=service, ticket=ticket)

    def encode(self) -> bytes:
        return encode_json(
            {"version": PROTOCOL_VERSION, "service": self.service, "ticket": self.ticket}
        )


def is_service_open(payload: bytes) -> bool:
    """Whether an OPEN payload asks for a service (malformed JSON: no — it fails later)."""
    try:
        return "service" in decode_json(payload)
    except ProtocolError:
        return False


def decode_open(payload: bytes) -> ExecRequest | ServiceRequest:
    """Parse any OPEN payload: a program to run or a service to serve."""
    obj = decode_json(payload)
    if "service" not in obj:
        return ExecRequest.decode(payload)
    version = obj.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(PROTOCOL_VERSION, version if isinstance(version, int) else None)
    service = obj.get("service")
    if service not in SERVICES:
        raise ProtocolError(f"unknown service {str(service)[:40]!r}")
    ticket = _small_int(obj.get("ticket", 0), MAX_TICKET)
    if ticket is None:
        raise ProtocolError("bad ticket")
    return ServiceRequest(str(service), ticket)


# --------------------------------------------------------------------------- readiness

#: Marker every readiness line starts with, so stray console noise is not mistaken for it.
READY_MAGIC = "vmsilo-agent"


#: The transports an agent may announce (anything else is shown as "unknown").
KNOWN_TRANSPORTS = ("channel", "vsock")


class ReadyHello(_Record):
    """The agent's readiness announcement on ``org.vmsilo.ready``."""

    __slots__ = ("agent_pid", "transport", "version")
    version: int
    transport: str  # "channel" (virtio-serial mux) or "vsock"
    agent_pid: int

    def __init__(self, version: int, transport: str, agent_pid: int = 0) -> None:
        self._init(version=version, transport=transport, agent_pid=agent_pid)

    def compatible(self) -> bool:
        return self.version == PROTOCOL_VERSION

    def check(self) -> None:
        """Raise ProtocolVersionError unless this agent speaks our protocol version."""
        if not self.compatible():
            raise ProtocolVersionError(PROTOCOL_VERSION, self.version)


def encode_ready(transport: str, agent_pid: int = 0, *, restored: bool = False) -> bytes:
    """The readiness line: one JSON object terminated by ``\\n``.

    ``{"hello":"vmsilo-agent","version":1,"transport":"channel","pid":123}\\n``; an agent
    that has just taken in a restore line (SPEC §10) adds ``"restored":true``.
    """
    obj: dict[str, object] = {
        "hello": READY_MAGIC,
        "version": PROTOCOL_VERSION,
        "transport": transport,
        "pid": agent_pid,
    }
    if restored:
        obj["restored"] = True
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def parse_ready(data: bytes) -> ReadyHello:
    """Parse one readiness line (with or without the newline); ValueError if it is not one.

    The supervisor reads lines from the ready port and calls this on each; it may ignore lines
    that raise ValueError (console noise) and must call :meth:`ReadyHello.check` (or compare
    ``version``) to turn a mismatch into the "rebuild the image" error.
    """
    try:
        obj = _loads(data.strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not a vmsilo readiness line: {data[:80]!r}") from None
    if not isinstance(obj, dict) or obj.get("hello") != READY_MAGIC:
        raise ValueError(f"not a vmsilo readiness line: {data[:80]!r}")
    version, transport = _small_int(obj.get("version")), obj.get("transport")
    if version is None:
        raise ValueError("readiness line without a version (an integer 0..65535)")
    return ReadyHello(
        version=version,
        transport=transport if transport in KNOWN_TRANSPORTS else "unknown",
        agent_pid=_small_int(obj.get("pid", 0), 0x7FFFFFFF) or 0,
    )


def encode_farewell(reason: str, idle_s: float | None = None) -> bytes:
    """The agent's last line on ``org.vmsilo.ready`` before it has the guest power off, so
    that the host can tell why (``vmsilo status``):
    ``{"bye":"vmsilo-agent","reason":"auto-shutdown","idle_s":600}\n``."""
    obj: dict[str, object] = {"bye": READY_MAGIC, "reason": reason}
    if idle_s is not None:
        obj["idle_s"] = idle_s
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def parse_farewell(data: bytes) -> tuple[str, float | None]:
    """(reason, idle seconds) of a farewell line; ValueError if it is not one. The reason is
    guest text, made safe to print and short (it ends up in ``vmsilo status``)."""
    try:
        obj = _loads(data.strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not a vmsilo farewell line: {data[:80]!r}") from None
    if not isinstance(obj, dict) or obj.get("bye") != READY_MAGIC:
        raise ValueError(f"not a vmsilo farewell line: {data[:80]!r}")
    reason, idle = obj.get("reason"), obj.get("idle_s")
    if not isinstance(reason, str):
        raise ValueError("farewell line without a reason")
    seconds = None
    if isinstance(idle, int | float) and not isinstance(idle, bool) and 0 <= idle < 1e9:
        seconds = float(idle)  # (in range: a huge int would not even convert)
    return printable(reason, 200), seconds


#: Bytes of host entropy in a restore message (SPEC §10).
RESTORE_ENTROPY = 32


class RestoreNotice:
    """What the host tells a guest that was just restored from a saved state (SPEC §10): the
    host's clock and fresh entropy; the agent answers with a new hello once both are in.
    (A plain class: this module is on vm-run's warm path, which does not load dataclasses.)"""

    __slots__ = ("entropy", "time_ns")

    def __init__(self, time_ns: int, entropy: bytes) -> None:
        self.time_ns = time_ns
        self.entropy = entropy


def is_restored_hello(data: bytes) -> bool:
    """Whether a readiness line says the agent took in a restore line (see
    :func:`encode_ready`)."""
    try:
        obj = _loads(data.strip())
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and obj.get("restored") is True


def encode_restored(time_ns: int, entropy: bytes) -> bytes:
    """The host's line on the ready port after a restore:
    ``{"restored":"vmsilo-agent","time_ns":N,"entropy":"<hex>"}\n``."""
    obj = {"restored": READY_MAGIC, "time_ns": time_ns, "entropy": entropy.hex()}
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def parse_restored(data: bytes) -> RestoreNotice:
    """Parse a restore line (the agent's side); ValueError if it is not one."""
    try:
        obj = _loads(data.strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not a vmsilo restore line: {data[:80]!r}") from None
    if not isinstance(obj, dict) or obj.get("restored") != READY_MAGIC:
        raise ValueError(f"not a vmsilo restore line: {data[:80]!r}")
    time_ns, entropy = obj.get("time_ns"), obj.get("entropy")
    if not isinstance(time_ns, int) or isinstance(time_ns, bool) or not 0 < time_ns < 1 << 63:
        raise ValueError("restore line without a valid time_ns")
    if not isinstance(entropy, str) or len(entropy) > 2 * 1024:
        raise ValueError("restore line without entropy")
    try:
        raw = bytes.fromhex(entropy)
    except ValueError:
        raise ValueError("restore line with bad entropy") from None
    return RestoreNotice(time_ns, raw)


def encode_settle() -> bytes:
    """The host's line before it saves a fastStart state: answer once the guest is settled
    (its user's desktop up), so the saved machine is not mid-start (SPEC §10)."""
    return json.dumps({"settle": READY_MAGIC}, separators=(",", ":")).encode() + b"\n"


def is_settle_request(data: bytes) -> bool:
    return _magic_line(data, "settle")


def encode_settled() -> bytes:
    return json.dumps({"settled": READY_MAGIC}, separators=(",", ":")).encode() + b"\n"


def is_settled(data: bytes) -> bool:
    return _magic_line(data, "settled")


def _magic_line(data: bytes, key: str) -> bool:
    try:
        obj = _loads(data.strip())
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and obj.get(key) == READY_MAGIC


def encode_mount() -> bytes:
    """The host's line asking the agent to mount the shares it just hot-plugged (SPEC §10)."""
    return json.dumps({"mount": READY_MAGIC}, separators=(",", ":")).encode() + b"\n"


def is_mount_request(data: bytes) -> bool:
    try:
        obj = _loads(data.strip())
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and obj.get("mount") == READY_MAGIC


def encode_mounted(errors: list[str]) -> bytes:
    """The agent's answer once every share is mounted or given up on."""
    obj = {"mounted": READY_MAGIC, "errors": errors}
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def parse_mounted(data: bytes) -> list[str]:
    """The errors of a mounted line (made safe to print); ValueError if it is not one."""
    try:
        obj = _loads(data.strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not a vmsilo mounted line: {data[:80]!r}") from None
    if not isinstance(obj, dict) or obj.get("mounted") != READY_MAGIC:
        raise ValueError(f"not a vmsilo mounted line: {data[:80]!r}")
    errors = obj.get("errors")
    if not isinstance(errors, list):
        raise ValueError("mounted line without errors")
    return [printable(str(e), 200) for e in errors[:16]]


def accept_vsock_peer(cid: int, port: int) -> bool:
    """Whether the agent serves a vsock connection from ``cid``:``port`` — only the host
    (CID 2), and there only a privileged source port (SPEC §11.1).

    Every process on the host has CID 2 and any account may open AF_VSOCK, so the CID alone
    would let any local user run commands as guest root; binding a port below 1024 takes root
    (CAP_NET_BIND_SERVICE), which the supervisor has and other accounts do not. Other guests
    (or a local loopback peer) never get in.
    """
    return cid == VSOCK_HOST_CID and 0 <= port < VSOCK_PRIVILEGED_PORTS


def status_from_returncode(returncode: int) -> int:
    """Exit status vm-run reports: the program's, or 128+N when it was killed by signal N."""
    if returncode < 0:
        return 128 + (-returncode)
    return returncode & 0xFF
