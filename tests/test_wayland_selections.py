"""The VM's two selections in the filter, without a compositor (SPEC §9.1 item 3): the clipboard
and the primary selection (middle-click paste) are each kept per VM, the host's never reach a
VM, and the compositor's own offers the filter hides are destroyed upstream so that the
compositor does not keep one object per host selection change."""

from __future__ import annotations

import contextlib
import os
import random
from collections import deque
from typing import Any

import pytest

from test_wayland_unit import P, ev, msg, req  # the message helpers, written once
from vmsilo.wayland.clipboard import CLIPBOARD, PRIMARY, Selection
from vmsilo.wayland.host_offers import MAX_HOST_OFFERS
from vmsilo.wayland.output import Chunk
from vmsilo.wayland.policy import Labels
from vmsilo.wayland.session import Session, Violation
from vmsilo.wayland.wire import SERVER_ID_BASE, NewId, WireError, decode, header

SEAT, DDM, PSM = 1, 2, 3  # registry names of the globals below
GLOBALS = {SEAT: "wl_seat", DDM: "wl_data_device_manager", PSM: PRIMARY.manager}
PDEV, DDEV, KBD = 5, 6, 7  # the client's primary device, data device and keyboard


def parse(
    session: Session, data: bytes, requests: bool, fds: deque[int] | None = None
) -> list[tuple[int, str, list[Any]]]:
    out, pos, fds = [], 0, fds if fds is not None else deque[int]()
    while pos < len(data):
        oid, opcode, size = header(data, pos)
        obj = session.objects.get(oid)
        iface = obj.iface if obj is not None else P[_local_iface(session, oid)]
        m = (iface.requests if requests else iface.events)[opcode]
        out.append((oid, m.name, decode(m, data[pos + 8 : pos + size], fds)))
        pos += size
    return out


def _local_iface(session: Session, oid: int) -> str:
    return session.local[oid].offer


class Client:
    """A client connection of a VM with a seat, a keyboard and a device of each kind."""

    def __init__(self, clipboard: Selection, primary: Selection) -> None:
        self.s = Session(P, Labels("work", "green"), clipboard, primary)
        self.injected: list[Chunk] = []
        self.s.inject = self.injected.extend
        self.s.from_client(msg(1, req("wl_display", "get_registry"), NewId(2)), [])
        self.s.from_upstream(
            b"".join(
                msg(2, ev("wl_registry", "global"), n, i.encode(), 1) for n, i in GLOBALS.items()
            ),
            [],
        )
        bind = req("wl_registry", "bind")
        self.s.from_client(msg(2, bind, SEAT, NewId(3, "wl_seat", 1)), [])
        self.s.from_client(msg(2, bind, PSM, NewId(4, PRIMARY.manager, 1)), [])
        self.s.from_client(msg(4, req(PRIMARY.manager, "get_device"), NewId(PDEV), 3), [])
        self.s.from_client(msg(2, bind, DDM, NewId(8, "wl_data_device_manager", 1)), [])
        self.s.from_client(
            msg(8, req("wl_data_device_manager", "get_data_device"), NewId(DDEV), 3), []
        )
        self.s.from_client(msg(3, req("wl_seat", "get_keyboard"), NewId(KBD)), [])

    def focus(self) -> list[tuple[int, str, list[Any]]]:
        """The compositor gives it keyboard focus: what the client is shown."""
        [(data, _)] = self.s.from_upstream(msg(KBD, ev("wl_keyboard", "enter"), 1, 0, b""), [])
        return parse(self.s, data, requests=False)

    def take_injected(self) -> list[tuple[int, str, list[Any]]]:
        data = b"".join(d for d, _ in self.injected)
        fds = deque(fd for _, f in self.injected for fd in f)
        self.injected.clear()
        events = parse(self.s, data, requests=False, fds=fds)
        assert not fds, "fds without their message"
        return events


def vm() -> tuple[Selection, Selection]:
    return Selection(CLIPBOARD), Selection(PRIMARY)


def test_primary_selection_is_shared_inside_a_vm_only() -> None:
    work = vm()
    a1, a2, b = Client(*work), Client(*work), Client(*vm())
    # a1 selects text: a primary source of its own becomes work's primary selection
    a1.s.from_client(msg(4, req(PRIMARY.manager, "create_source"), NewId(20)), [])
    a1.s.from_client(msg(20, req(PRIMARY.source, "offer"), b"text/plain;charset=utf-8"), [])
    assert a1.s.from_client(msg(PDEV, req(PRIMARY.device, "set_selection"), 20, 9), []) == []
    # a2 of the same VM gets focus: it is offered work's primary selection (and no clipboard)
    shown = a2.focus()
    names = [(oid, name) for oid, name, _ in shown]
    offer = shown[0][2][0].id
    assert names == [
        (PDEV, "data_offer"),
        (offer, "offer"),
        (PDEV, "selection"),
        (KBD, "enter"),
    ]
    assert offer >= SERVER_ID_BASE and shown[1][2] == [b"text/plain;charset=utf-8"]
    assert shown[2][2] == [offer]
    # the middle-click paste: a2's receive becomes a `send` to a1's source, with a2's fd
    r, w = os.pipe()
    try:
        assert (
            a2.s.from_client(
                msg(offer, req(PRIMARY.offer, "receive"), b"text/plain;charset=utf-8", w), [w]
            )
            == []
        )
        [(oid, name, args)] = a1.take_injected()
        assert (oid, name, args[0]) == (20, "send", b"text/plain;charset=utf-8")
        os.write(args[1], b"middle")  # a1 writes into what a2 reads
        os.close(args[1])
        assert os.read(r, 100) == b"middle"
    finally:
        os.close(r)
    # another VM's client gets focus: nothing of work's selection
    assert [name for _, name, _ in b.focus()] == ["enter"]
    # the filter's offer is destroyed by the client like any other
    assert a2.s.from_client(msg(offer, req(PRIMARY.offer, "destroy")), []) == []
    assert offer not in a2.s.local
    # a1 drops its source: work's primary selection is gone, focused clients are told
    a1.s.from_client(msg(20, req(PRIMARY.source, "destroy")), [])
    assert [(o, n, a) for o, n, a in a2.take_injected()] == [(PDEV, "selection", [0])]


def test_the_kinds_stay_apart() -> None:
    """A clipboard copy is not a primary selection, and a new primary selection cancels the old
    owner's primary source only."""
    work = vm()
    a1, a2 = Client(*work), Client(*work)
    a1.s.from_client(msg(8, req("wl_data_device_manager", "create_data_source"), NewId(21)), [])
    a1.s.from_client(msg(21, req("wl_data_source", "offer"), b"text/plain"), [])
    a1.s.from_client(msg(DDEV, req("wl_data_device", "set_selection"), 21, 1), [])
    shown = a2.focus()
    assert [o for o, n, _ in shown if n == "selection"] == [DDEV]  # the clipboard only
    a2.s.from_client(msg(4, req(PRIMARY.manager, "create_source"), NewId(30)), [])
    a2.s.from_client(msg(30, req(PRIMARY.source, "offer"), b"text/plain"), [])
    a2.s.from_client(msg(PDEV, req(PRIMARY.device, "set_selection"), 30, 1), [])
    assert a1.take_injected() == []  # a1's clipboard source is not cancelled
    a1.s.from_client(msg(4, req(PRIMARY.manager, "create_source"), NewId(31)), [])
    a1.s.from_client(msg(PDEV, req(PRIMARY.device, "set_selection"), 31, 1), [])
    assert (30, "cancelled", []) in a2.take_injected()
    # a device made while focused is shown the current selection at once, as a compositor does
    a2.s.from_client(msg(4, req(PRIMARY.manager, "get_device"), NewId(40), 3), [])
    assert [(o, n) for o, n, _ in a2.take_injected()][-1] == (40, "selection")


def test_host_primary_selection_never_reaches_the_vm() -> None:
    a = Client(*vm())
    a.focus()
    host = (
        msg(PDEV, ev(PRIMARY.device, "data_offer"), NewId(0xFF000000))
        + msg(0xFF000000, ev(PRIMARY.offer, "offer"), b"text/plain")
        + msg(PDEV, ev(PRIMARY.device, "selection"), 0xFF000000)
    )
    assert a.s.from_upstream(host, []) == []
    # ... and the filter gives the compositor its offer back
    [(data, _)] = a.s.take_upstream()
    assert parse(a.s, data, requests=True) == [(0xFF000000, "destroy", [])]
    # the VM's primary selection never reaches the compositor either
    a.s.from_client(msg(4, req(PRIMARY.manager, "create_source"), NewId(20)), [])
    assert a.s.from_client(msg(PDEV, req(PRIMARY.device, "set_selection"), 20, 1), []) == []
    # a client that guesses the host's offer (no offer of the filter's shown yet) is closed
    b = Client(*vm())
    assert b.s.from_upstream(host, []) == []
    r, w = os.pipe()
    try:
        with pytest.raises(Violation):
            b.s.from_client(msg(0xFF000000, req(PRIMARY.offer, "receive"), b"text/plain", w), [w])
    finally:
        os.close(r)


class FakeCompositor:
    """libwayland-server's id allocation: a destroyed server id is reused first."""

    def __init__(self) -> None:
        self.free: list[int] = []
        self.next = SERVER_ID_BASE
        self.live: set[int] = set()

    def new(self) -> int:
        oid = self.free.pop() if self.free else self.next
        self.next += oid == self.next
        self.live.add(oid)
        return oid

    def requests(self, s: Session) -> None:
        for data, _ in s.take_upstream():
            for oid, name, _ in parse(s, data, requests=True):
                assert name == "destroy" and oid in self.live
                self.live.remove(oid)
                self.free.append(oid)


def test_host_offers_are_destroyed_upstream_and_stay_bounded() -> None:
    """Every host selection change gives the focused client a new offer of the compositor's;
    the filter hides it, and destroys it upstream, so the live offers (and the filter's own
    table) stay bounded however often the host copies."""
    a = Client(*vm())
    a.focus()
    comp = FakeCompositor()
    objects = len(a.s.objects)
    for i in range(200):
        kind, dev = (CLIPBOARD, DDEV) if i % 2 else (PRIMARY, PDEV)
        offer = comp.new()
        events = (
            msg(dev, ev(kind.device, "data_offer"), NewId(offer))
            + msg(offer, ev(kind.offer, "offer"), b"text/plain")
            + msg(offer, ev(kind.offer, "offer"), f"x-{i}".encode())
            + msg(dev, ev(kind.device, "selection"), offer)
        )
        assert a.s.from_upstream(events, []) == []
        comp.requests(a.s)
        assert not comp.live, f"change {i}: {len(comp.live)} offers still alive upstream"
    assert comp.next - SERVER_ID_BASE <= 2
    assert len(a.s.objects) <= objects + 2
    assert a.s.host_offers.destroyed == 200


def test_a_host_drag_keeps_its_offer_until_the_next_one() -> None:
    """wlroots ends the host's drag when an offer still linked to it is destroyed: the filter
    keeps a drag's offer (a drag passing over a VM window must not be cancelled) and destroys
    it when the next drag enters, or on a drop."""
    a = Client(*vm())
    comp = FakeCompositor()

    def drag_enters() -> int:
        offer = comp.new()
        a.s.from_upstream(
            msg(DDEV, ev("wl_data_device", "data_offer"), NewId(offer))
            + msg(offer, ev("wl_data_offer", "offer"), b"text/uri-list")
            + msg(DDEV, ev("wl_data_device", "enter"), 5, 0xFF00FFFF, 0, 0, offer)
            + msg(offer, ev("wl_data_offer", "source_actions"), 1)
            + msg(DDEV, ev("wl_data_device", "motion"), 1, 0, 0)
            + msg(DDEV, ev("wl_data_device", "leave")),
            [],
        )
        comp.requests(a.s)
        return offer

    first = drag_enters()
    assert comp.live == {first}
    # a host selection change meanwhile destroys its own offer, not the drag's
    sel = comp.new()
    a.s.from_upstream(
        msg(DDEV, ev("wl_data_device", "data_offer"), NewId(sel))
        + msg(DDEV, ev("wl_data_device", "selection"), sel),
        [],
    )
    comp.requests(a.s)
    assert comp.live == {first}
    second = drag_enters()
    assert comp.live == {second}
    a.s.from_upstream(msg(DDEV, ev("wl_data_device", "drop")), [])
    comp.requests(a.s)
    assert not comp.live


def test_offers_never_named_are_still_bounded() -> None:
    a = Client(*vm())
    comp = FakeCompositor()
    for _ in range(50):
        a.s.from_upstream(msg(PDEV, ev(PRIMARY.device, "data_offer"), NewId(comp.new())), [])
        comp.requests(a.s)
    assert len(comp.live) == MAX_HOST_OFFERS


def test_hostile_requests_on_the_selection_objects_only_end_the_connection() -> None:
    """Random opcodes and bodies on every selection object (the client's devices and sources,
    the filter's offers, the host's hidden offers): a Violation (the client loses its
    connection) or a message relayed — never another exception, never the filter's state
    broken for the VM's other clients."""
    rng = random.Random(13)
    work = vm()
    other = Client(*work)
    other.s.from_client(msg(4, req(PRIMARY.manager, "create_source"), NewId(20)), [])
    other.s.from_client(msg(20, req(PRIMARY.source, "offer"), b"text/plain"), [])
    other.s.from_client(msg(PDEV, req(PRIMARY.device, "set_selection"), 20, 1), [])
    outcomes: dict[str, int] = {}
    for _ in range(400):
        c = Client(*work)
        c.s.from_client(msg(4, req(PRIMARY.manager, "create_source"), NewId(21)), [])
        c.focus()  # shows the filter's offers (compositor range)
        c.s.from_upstream(msg(PDEV, ev(PRIMARY.device, "data_offer"), NewId(0xFF00F000)), [])
        targets = [4, PDEV, 21, 8, DDEV, 0xFF000000, 0xFF000001, 0xFF00F000]
        n = rng.randrange(0, 10) * 4
        body = rng.randbytes(n)
        if rng.random() < 0.5 and n >= 4:  # a plausible length-prefixed string or object id
            body = rng.choice([4, 20, 21, 0xFF000000, 7, 1 << 30]).to_bytes(4, "little") + body[4:]
        r, w = os.pipe()
        os.close(r)
        data = (
            (rng.choice(targets)).to_bytes(4, "little")
            + ((8 + n) << 16 | rng.randrange(5)).to_bytes(4, "little")
            + body
        )
        try:
            c.s.from_client(data, [w])
            outcome = "relayed"
        except Violation:
            outcome = "violation"
        finally:
            c.s.close()
            with contextlib.suppress(OSError):  # or taken and closed by the filter
                os.close(w)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("violation", 0) > 50 and outcomes.get("relayed", 0) > 10, outcomes
    # the VM's primary selection is still other's, and still offered
    assert work[1].owner is other.s and work[1].current() == [b"text/plain"]
    with pytest.raises(WireError):  # (the codec's own refusal, for completeness)
        decode(req(PRIMARY.offer, "receive"), b"\xff\0\0\0", deque())
