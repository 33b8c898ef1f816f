"""The Wayland filter without a compositor: the wire codec, the session's policy on hand-made
messages, the security context against a fake compositor, and the colour rules."""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from types import SimpleNamespace
from typing import Any, cast

import pytest

from vmsilo.plan.model import Plan
from vmsilo.wayland import policy, protocol
from vmsilo.wayland.policy import Labels
from vmsilo.wayland.security_context import SecurityContext
from vmsilo.wayland.session import Session, Violation
from vmsilo.wayland.wire import NewId, WireError, decode, encode, header

P = protocol.load()
LABELS = Labels("work", "green")


def req(iface: str, name: str) -> protocol.Message:
    return next(m for m in P[iface].requests if m.name == name)


def ev(iface: str, name: str) -> protocol.Message:
    return next(m for m in P[iface].events if m.name == name)


def msg(oid: int, m: protocol.Message, *args: Any) -> bytes:
    return encode(oid, m, list(args))[0]


def parse(session: Session, data: bytes, requests: bool) -> list[tuple[int, str, list[Any]]]:
    """Decode forwarded bytes with the session's object table."""
    out, pos, fds = [], 0, deque[int]()
    while pos < len(data):
        oid, opcode, size = header(data, pos)
        iface = session.objects[oid].iface
        m = (iface.requests if requests else iface.events)[opcode]
        out.append((oid, m.name, decode(m, data[pos + 8 : pos + size], fds)))
        pos += size
    return out


# ------------------------------------------------------------------ codec


def test_codec_round_trip() -> None:
    m = req("wl_registry", "bind")
    data, fds = encode(2, m, [7, NewId(9, "xdg_wm_base", 2)])
    assert header(data, 0) == (2, m.opcode, len(data)) and not fds
    assert decode(m, data[8:], deque()) == [7, NewId(9, "xdg_wm_base", 2)]
    m = req("wl_shm", "create_pool")
    data, fds = encode(3, m, [NewId(4), 42, 4096])
    assert fds == [42]
    assert decode(m, data[8:], deque(fds)) == [NewId(4), 42, 4096]


@pytest.mark.parametrize(
    "body",
    [b"\x05\0\0\0abcde\0\0\0", b"\x40\0\0\0abc\0", b"\x04\0\0\0abc\0extra..."],
    ids=["no NUL", "longer than the message", "bytes left over"],
)
def test_codec_refuses_bad_strings(body: bytes) -> None:
    with pytest.raises(WireError):
        decode(req("xdg_toplevel", "set_title"), body, deque())


def test_protocol_files_and_policy() -> None:
    assert not policy.ALLOWED_GLOBALS & policy.FORBIDDEN_GLOBALS
    assert {"xdg_wm_base", "wl_compositor", "wp_security_context_manager_v1"} <= set(P)


# ---------------------------------------------------------------- session


def connected() -> Session:
    s = Session(P, LABELS)
    s.from_client(msg(1, req("wl_display", "get_registry"), NewId(2)), [])
    events = b"".join(
        msg(2, ev("wl_registry", "global"), n, name.encode(), 9)
        for n, name in enumerate(
            [
                "wl_compositor",
                "xdg_wm_base",
                "zwlr_screencopy_manager_v1",
                "wl_data_device_manager",
                "wl_seat",
                "zwp_primary_selection_device_manager_v1",
                "wp_security_context_manager_v1",
            ],
            start=1,
        )
    )
    [(data, _)] = s.from_upstream(events, [])
    offered = {a[1].decode(): a[2] for _, _, a in parse(s, data, requests=False)}
    assert offered == {
        "wl_compositor": P["wl_compositor"].version,
        "xdg_wm_base": P["xdg_wm_base"].version,
        "wl_data_device_manager": 3,
        "wl_seat": P["wl_seat"].version,
        "zwp_primary_selection_device_manager_v1": 1,  # the VM's own (gtk_ one stays hidden)
    }
    return s


def test_binds_only_to_what_was_offered() -> None:
    s = connected()
    bind = req("wl_registry", "bind")
    assert s.from_client(msg(2, bind, 1, NewId(3, "wl_compositor", 4)), [])
    for bad in (
        NewId(4, "zwlr_screencopy_manager_v1", 1),
        NewId(4, "wl_seat", 1),
        NewId(4, "wl_compositor", 7),
    ):
        name = (
            3
            if bad.interface == "zwlr_screencopy_manager_v1"
            else 2
            if bad.interface == "wl_seat"
            else 1
        )
        with pytest.raises(Violation):
            connected().from_client(msg(2, bind, name, bad), [])
    with pytest.raises(Violation):  # a new id in the compositor's range
        s.from_client(msg(2, bind, 1, NewId(0xFF000001, "wl_compositor", 1)), [])


def test_toplevels_are_labelled() -> None:
    s = connected()
    s.from_client(msg(2, req("wl_registry", "bind"), 2, NewId(3, "xdg_wm_base", 1)), [])
    s.from_client(msg(2, req("wl_registry", "bind"), 1, NewId(4, "wl_compositor", 4)), [])
    s.from_client(msg(4, req("wl_compositor", "create_surface"), NewId(5)), [])
    s.from_client(msg(3, req("xdg_wm_base", "get_xdg_surface"), NewId(6), 5), [])
    [(data, _)] = s.from_client(msg(6, req("xdg_surface", "get_toplevel"), NewId(7)), [])
    assert [(o, n, a) for o, n, a in parse(s, data, True)] == [
        (6, "get_toplevel", [NewId(7)]),
        (7, "set_title", [b"[work]"]),
        (7, "set_app_id", [b"vmsilo:work:green"]),
    ]
    [(data, _)] = s.from_client(
        msg(7, req("xdg_toplevel", "set_title"), "café".encode())
        + msg(7, req("xdg_toplevel", "set_app_id"), b"org.evil.Shell"),
        [],
    )
    assert [a for _, _, a in parse(s, data, True)] == [
        [b"[work] caf\xc3\xa9"],
        [b"vmsilo:work:green"],
    ]
    [(data, _)] = s.from_client(msg(7, req("xdg_toplevel", "set_title"), b"x" * 3000), [])
    assert len(parse(s, data, True)[0][2][0]) == policy.MAX_TITLE


def test_selections_never_reach_the_vm_nor_leave_it() -> None:
    s = connected()
    s.from_client(msg(2, req("wl_registry", "bind"), 5, NewId(3, "wl_seat", 1)), [])
    s.from_client(msg(2, req("wl_registry", "bind"), 4, NewId(4, "wl_data_device_manager", 3)), [])
    s.from_client(msg(4, req("wl_data_device_manager", "get_data_device"), NewId(5), 3), [])
    s.from_client(msg(4, req("wl_data_device_manager", "create_data_source"), NewId(6)), [])
    # the host's selection: an offer, its types, the selection event — none reaches the VM
    host = (
        msg(5, ev("wl_data_device", "data_offer"), NewId(0xFF000001))
        + msg(0xFF000001, ev("wl_data_offer", "offer"), b"text/plain")
        + msg(5, ev("wl_data_device", "selection"), 0xFF000001)
    )
    assert s.from_upstream(host, []) == []
    # the VM's selection never reaches the host
    assert s.from_client(msg(5, req("wl_data_device", "set_selection"), 6, 1), []) == []
    r, w = os.pipe()
    try:
        with pytest.raises(Violation):  # reading an offer it was never shown
            s.from_client(msg(0xFF000001, req("wl_data_offer", "receive"), b"text/plain", w), [w])
    finally:
        os.close(r)


def test_violations() -> None:
    s = connected()
    for data in (
        msg(99, req("wl_display", "sync"), NewId(3)),  # unknown object
        b"\x01\0\0\0\x08\0\x09\0",  # no such opcode
        b"\x01\0\0\0\x00\0\xff\xff",
    ):  # oversized
        with pytest.raises(Violation):
            Session(P, LABELS).from_client(data, [])
    fds = [os.dup(0) for _ in range(40)]
    with pytest.raises(Violation):
        s.from_client(msg(1, req("wl_display", "sync"), NewId(3)), fds)
    s.close()


# --------------------------------------------------------- security context


def test_security_context_registered_with_a_fake_compositor(tmp_path: Any) -> None:
    path = str(tmp_path / "compositor")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    seen: list[tuple[str, list[Any]]] = []
    listener: list[socket.socket] = []

    def compositor() -> None:
        conn, _ = srv.accept()
        objects = {1: P["wl_display"]}
        buf, fdq = b"", deque[int]()
        while True:
            data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            if not data:
                break
            for _, _, raw in anc:
                fdq.extend(int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4))
            buf += data
            while len(buf) >= 8 and len(buf) >= header(buf, 0)[2]:
                oid, opcode, size = header(buf, 0)
                m = objects[oid].requests[opcode]
                args = decode(m, buf[8:size], fdq)
                buf = buf[size:]
                seen.append((m.name, args))
                for a, v in zip(m.args, args, strict=True):
                    if a.code == "n":
                        objects[v.id] = P[a.interface or v.interface]
                if m.name == "get_registry":
                    conn.sendall(
                        msg(v.id, ev("wl_registry", "global"), 1, b"wl_compositor", 6)
                        + msg(
                            v.id,
                            ev("wl_registry", "global"),
                            2,
                            b"wp_security_context_manager_v1",
                            1,
                        )
                    )
                if m.name == "sync":
                    conn.sendall(msg(v.id, ev("wl_callback", "done"), 0))
                if m.name == "create_listener":
                    listener.append(socket.socket(fileno=args[1]))
                    os.close(args[2])
        conn.close()

    t = threading.Thread(target=compositor, daemon=True)
    t.start()
    logs: list[str] = []
    ctx = SecurityContext(P, LABELS, str(tmp_path / "work-wayland.socket.context"), logs.append)
    target = ctx.ensure(path)
    t.join(10)
    assert target == ctx.path and ctx.active
    names = [n for n, _ in seen]
    assert names[:2] == ["get_registry", "sync"]
    assert ("bind", [2, NewId(4, "wp_security_context_manager_v1", 1)]) in seen
    assert ("set_sandbox_engine", [b"org.vmsilo"]) in seen
    assert ("set_app_id", [b"vmsilo:work:green"]) in seen
    assert ("set_instance_id", [b"work"]) in seen
    assert names.index("commit") > names.index("set_instance_id")
    # the proxy's upstream connections now arrive on the listener the compositor was given
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(target)
        accepted, _ = listener[0].accept()
        accepted.close()
    ctx.close()
    listener[0].close()
    srv.close()


def test_no_security_context_where_not_offered(tmp_path: Any) -> None:
    path = str(tmp_path / "compositor")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def compositor() -> None:
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(
            msg(2, ev("wl_registry", "global"), 1, b"wl_compositor", 6)
            + msg(3, ev("wl_callback", "done"), 0)
        )
        conn.recv(4096)
        conn.close()

    t = threading.Thread(target=compositor, daemon=True)
    t.start()
    ctx = SecurityContext(P, LABELS, str(tmp_path / "ctx"), lambda m: None)
    assert ctx.ensure(path) == path and not ctx.active
    t.join(10)
    srv.close()


# ------------------------------------------------------------------ rules


def test_rules_rendering() -> None:
    from vmsilo.host.desktop_rules import render_desktop_files, render_kwin, render_sway

    plan = cast(
        Plan,
        SimpleNamespace(
            vms={
                "work": SimpleNamespace(name="work", color="green"),
                "bank": SimpleNamespace(name="bank", color="rebeccapurple"),
            }
        ),
    )
    sway = render_sway(plan)
    assert 'for_window [app_id="^vmsilo:work:"] title_format' in sway and "#008000" in sway
    assert 'for_window [app_id="^vmsilo:bank:"] border pixel 3' in sway and "#663399" in sway
    kwin = render_kwin(plan)
    assert "count=2" in kwin and "rules=vmsilo-bank,vmsilo-work" in kwin
    assert "wmclass=^vmsilo:work:" in kwin
    files = render_desktop_files(plan, "cfg")
    assert set(files) == {
        "etc/sway/config.d/vmsilo.conf",
        "etc/xdg/kwinrulesrc",
        "usr/share/color-schemes/vmsilo-work.colors",
        "usr/share/color-schemes/vmsilo-bank.colors",
    }
    assert "activeBackground=102,51,153" in files["usr/share/color-schemes/vmsilo-bank.colors"]


def test_compositor_range_ids_are_dense_for_the_client() -> None:
    """libwayland refuses a new compositor-range id beyond the next free one: the objects the
    filter hides (the host's offers) must leave no gap, and the filter's own clipboard offers
    must not collide with the compositor's objects. So those ids are translated."""
    s = connected()
    s.from_client(msg(2, req("wl_registry", "bind"), 5, NewId(3, "wl_seat", 1)), [])
    s.from_client(msg(2, req("wl_registry", "bind"), 4, NewId(4, "wl_data_device_manager", 3)), [])
    s.from_client(msg(4, req("wl_data_device_manager", "get_data_device"), NewId(5), 3), [])
    s.from_client(msg(3, req("wl_seat", "get_keyboard"), NewId(6)), [])
    # the host's offer (hidden), then a compositor object the client does see: the tablet
    # seat's tablet would be one; any typed new_id in a visible event is, e.g. a test double
    [(data, _)] = s.from_upstream(
        msg(5, ev("wl_data_device", "data_offer"), NewId(0xFF000000))
        + msg(6, ev("wl_keyboard", "enter"), 1, 0, b""),
        [],
    )
    # the keyboard enter passes (no selection in the VM yet: no offer of the filter's)
    assert header(data, 0)[0] == 6
    # the VM copies: a source of the client's becomes the VM's selection, shown to the focused
    # client through the filter's own offer — the first compositor-range id the client sees
    s.from_client(msg(4, req("wl_data_device_manager", "create_data_source"), NewId(7)), [])
    s.from_client(msg(7, req("wl_data_source", "offer"), b"text/plain"), [])
    injected: list[bytes] = []
    s.inject = lambda chunks: injected.extend(d for d, _ in chunks)
    assert s.from_client(msg(5, req("wl_data_device", "set_selection"), 7, 1), []) == []
    data = b"".join(injected)
    oid, opcode, size = header(data, 0)
    assert (oid, opcode) == (5, 0)  # wl_data_device.data_offer
    assert decode(ev("wl_data_device", "data_offer"), data[8:size], deque()) == [NewId(0xFF000000)]
    # a paste from the filter's offer becomes a `send` to the source's client, with the fd
    r, w = os.pipe()
    try:
        injected.clear()
        s.from_client(msg(0xFF000000, req("wl_data_offer", "receive"), b"text/plain", w), [w])
        oid, opcode, size = header(b"".join(injected), 0)
        assert (oid, opcode) == (7, 1)  # wl_data_source.send
    finally:
        os.close(r)
    # the compositor's hidden offer is still not the client's to use
    with pytest.raises(Violation):
        s.from_client(msg(0xFF000001, req("wl_data_offer", "destroy")), [])


def test_visible_compositor_objects_are_renumbered_both_ways() -> None:
    s = Session(P, LABELS)
    s.from_client(msg(1, req("wl_display", "get_registry"), NewId(2)), [])
    s.from_upstream(
        msg(2, ev("wl_registry", "global"), 1, b"wl_seat", 7)
        + msg(2, ev("wl_registry", "global"), 2, b"zwp_tablet_manager_v2", 1)
        + msg(2, ev("wl_registry", "global"), 3, b"wl_data_device_manager", 3),
        [],
    )
    s.from_client(msg(2, req("wl_registry", "bind"), 1, NewId(3, "wl_seat", 7)), [])
    s.from_client(msg(2, req("wl_registry", "bind"), 2, NewId(4, "zwp_tablet_manager_v2", 1)), [])
    s.from_client(msg(2, req("wl_registry", "bind"), 3, NewId(5, "wl_data_device_manager", 3)), [])
    s.from_client(msg(5, req("wl_data_device_manager", "get_data_device"), NewId(6), 3), [])
    s.from_client(msg(4, req("zwp_tablet_manager_v2", "get_tablet_seat"), NewId(7), 3), [])
    # two hidden offers, then the compositor's tablet: the client sees it as the first id
    [(data, _)] = s.from_upstream(
        msg(6, ev("wl_data_device", "data_offer"), NewId(0xFF000000))
        + msg(6, ev("wl_data_device", "data_offer"), NewId(0xFF000001))
        + msg(7, ev("zwp_tablet_seat_v2", "tablet_added"), NewId(0xFF000002))
        + msg(0xFF000002, ev("zwp_tablet_v2", "name"), b"pen"),
        [],
    )
    first, second = header(data, 0), header(data, header(data, 0)[2])
    assert first[0] == 7
    added = decode(ev("zwp_tablet_seat_v2", "tablet_added"), data[8 : first[2]], deque())
    assert added == [NewId(0xFF000000)]
    assert second[0] == 0xFF000000  # the tablet's event, in the client's numbers
    # the client's request on it goes to the compositor's number
    [(data, _)] = s.from_client(msg(0xFF000000, req("zwp_tablet_v2", "destroy")), [])
    assert header(data, 0)[0] == 0xFF000002
