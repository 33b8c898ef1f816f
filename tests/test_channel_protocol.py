"""Unit tests of the wire protocol: codec, requests, readiness, the vsock peer check."""

from __future__ import annotations

import json
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsilo.channel.protocol import (
    HEADER_SIZE,
    MAX_FRAME,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    ChannelError,
    ExecRequest,
    Frame,
    FrameType,
    ProtocolError,
    ProtocolVersionError,
    accept_vsock_peer,
    decode_error,
    decode_exit,
    decode_header,
    decode_signal,
    decode_winsize,
    encode_error,
    encode_exit,
    encode_frame,
    encode_ready,
    encode_signal,
    encode_winsize,
    parse_ready,
    status_from_returncode,
    validate_frame,
)


def test_accept_vsock_peer_only_host() -> None:
    assert accept_vsock_peer(2, 1023) is True
    for cid in (0, 1, 3, 4, 1000, 0xFFFFFFFF, -1):
        assert accept_vsock_peer(cid, 1023) is False


def test_frame_roundtrip_and_limits() -> None:
    data = encode_frame(FrameType.STDOUT, 7, b"abc")
    assert len(data) == HEADER_SIZE + 3
    assert decode_header(data[:HEADER_SIZE]) == (PROTOCOL_VERSION, FrameType.STDOUT, 3, 7)
    assert len(encode_frame(FrameType.STDOUT, 1, b"x" * MAX_PAYLOAD)) == MAX_FRAME
    with pytest.raises(ValueError):
        encode_frame(FrameType.STDOUT, 1, b"x" * (MAX_PAYLOAD + 1))


def test_validate_frame() -> None:
    validate_frame(Frame(FrameType.STDIN, 1, b"x"))
    with pytest.raises(ProtocolVersionError):
        validate_frame(Frame(FrameType.STDIN, 1, b"x", version=PROTOCOL_VERSION + 1))
    with pytest.raises(ProtocolError):
        validate_frame(Frame(0xEE, 1, b""))
    with pytest.raises(ProtocolError):
        validate_frame(Frame(FrameType.STDOUT, 1, b""))  # empty data is meaningless
    with pytest.raises(ProtocolError):
        validate_frame(Frame(FrameType.STDOUT, 1, b"x" * (MAX_PAYLOAD + 1)))


args_strategy = st.lists(
    st.one_of(st.binary(max_size=40).filter(lambda b: b"\0" not in b), st.text(max_size=20)),
    max_size=8,
).map(lambda rest: ["prog", *rest])


@given(args_strategy)
def test_exec_request_roundtrip_exact_bytes(argv: list[str | bytes]) -> None:
    argv = [a for a in argv if not (isinstance(a, str) and "\0" in a)]
    req = ExecRequest(argv=argv, env=["A=b c", b"B=\xff"], cwd="/tmp", user="root", tty=True)
    back = ExecRequest.decode(req.encode())
    assert back.argv_bytes() == req.argv_bytes()
    assert back.env_bytes() == [b"A=b c", b"B=\xff"]
    assert back.cwd == b"/tmp"
    assert back.user == "root" and back.tty and not back.detach


def test_exec_request_surrogateescape_args() -> None:
    # What Python makes of a non-UTF-8 command-line argument goes back to the same bytes.
    arg = b"\xff\xfe".decode("utf-8", "surrogateescape")
    assert ExecRequest(argv=["x", arg]).argv_bytes()[1] == b"\xff\xfe"


@pytest.mark.parametrize(
    "req",
    [
        ExecRequest(argv=[]),
        ExecRequest(argv=[""]),
        ExecRequest(argv=["a\0b"]),
        ExecRequest(argv=["x"], env=["NOEQUALS"]),
        ExecRequest(argv=["x"], env=["=v"]),
        ExecRequest(argv=["x"], cwd=""),
    ],
)
def test_exec_request_invalid(req: ExecRequest) -> None:
    with pytest.raises(ValueError):
        req.encode()


def test_exec_request_decode_errors() -> None:
    with pytest.raises(ProtocolError):
        ExecRequest.decode(b"{not json")
    with pytest.raises(ProtocolError):
        ExecRequest.decode(b"[]")
    good = json.loads(ExecRequest(argv=["x"]).encode())
    with pytest.raises(ProtocolVersionError) as ei:
        ExecRequest.decode(json.dumps({**good, "version": 99}).encode())
    assert "rebuild the image" in str(ei.value)
    with pytest.raises(ProtocolError):
        ExecRequest.decode(json.dumps({**good, "argv": ["***"]}).encode())
    with pytest.raises(ProtocolError):
        ExecRequest.decode(json.dumps({**good, "argv": "x"}).encode())


def test_ready_roundtrip_and_version_check() -> None:
    line = encode_ready("channel", 42)
    assert line.endswith(b"\n")
    hello = parse_ready(line)
    assert (hello.version, hello.transport, hello.agent_pid) == (PROTOCOL_VERSION, "channel", 42)
    hello.check()
    old = parse_ready(b'{"hello":"vmsilo-agent","version":0,"transport":"vsock"}')
    assert not old.compatible()
    with pytest.raises(ProtocolVersionError, match="rebuild the image"):
        old.check()
    for noise in (b"", b"login: ", b'{"hello":"other","version":1}', b'{"hello":"vmsilo-agent"}'):
        with pytest.raises(ValueError):
            parse_ready(noise)


def test_small_payloads() -> None:
    assert decode_signal(encode_signal(signal.SIGTERM)) == signal.SIGTERM
    with pytest.raises(ProtocolError):
        decode_signal(encode_signal(signal.SIGKILL))  # not a forwardable signal
    assert decode_winsize(encode_winsize(50, 200)) == (50, 200)
    assert decode_exit(encode_exit(3, "x")) == (3, "x")
    with pytest.raises(ProtocolError):
        decode_exit(b'{"status": 300}')
    err = decode_error(encode_error("version", "old"))
    assert isinstance(err, ProtocolVersionError)
    err = decode_error(encode_error("protocol", "bad frame"))
    assert isinstance(err, ChannelError) and "bad frame" in str(err)


def test_status_from_returncode() -> None:
    assert status_from_returncode(0) == 0
    assert status_from_returncode(3) == 3
    assert status_from_returncode(-signal.SIGTERM) == 143
    assert status_from_returncode(-signal.SIGKILL) == 137


def test_farewell_line_round_trips_and_is_not_a_hello() -> None:
    """The agent's last line before an idle power-off (issue 15.5: status tells it apart)."""
    from vmsilo.channel.protocol import encode_farewell, encode_ready, parse_farewell, parse_ready

    line = encode_farewell("auto-shutdown", 600)
    assert line == b'{"bye":"vmsilo-agent","reason":"auto-shutdown","idle_s":600}\n'
    assert parse_farewell(line) == ("auto-shutdown", 600.0)
    with pytest.raises(ValueError):
        parse_ready(line)
    for noise in (encode_ready("channel"), b"login: ", b'{"bye":"other","reason":"x"}'):
        with pytest.raises(ValueError):
            parse_farewell(noise)
