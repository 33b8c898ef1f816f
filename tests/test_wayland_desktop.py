"""The Wayland filter against a real compositor (SPEC §9.1): a headless sway run as a throw-away
account, real clients on the host connected through the filter (``WAYLAND_DISPLAY`` = the
filter socket), looked at through sway's IPC tree and grim screenshots.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import cast

import pytest

from desktop import RUN_COMMAND, SUBSCRIBE, Desktop, Proxy
from vmsilo.wayland.policy import FORBIDDEN_GLOBALS

DN = subprocess.DEVNULL
#: wtype's first key reaches the window before its new keymap does and is lost (wtype 0.4):
#: lead with a key that types nothing.
TYPE = ("wtype", "-k", "Shift_L")
#: rows of the window that hold the first line of foot's text at size 16
FIRST_LINE_PX = 18


@pytest.fixture
def work(desk: Desktop) -> Iterator[Proxy]:
    p = desk.start_proxy("work", "green")
    yield p
    p.stop()


class Terminal:
    """``foot`` printing ``text``, then writing the line it reads to a FIFO the test reads."""

    def __init__(self, desk: Desktop, display: str | None, title: str, text: str) -> None:
        self.fifo = desk.runtime / f"typed-{title}"
        if self.fifo.exists():
            self.fifo.unlink()
        os.mkfifo(self.fifo, 0o600)
        os.chown(self.fifo, desk.user.pw_uid, desk.user.pw_gid)
        script = (
            f'printf "%s\\n" "{text}"; read line; printf "%s\\n" "$line" > {self.fifo};'
            " exec sleep 600"
        )
        self.proc = desk.popen(
            "foot",
            "-T",
            title,
            "-o",
            "font=monospace:size=16",
            "sh",
            "-c",
            script,
            display=display,
            stdout=DN,
            stderr=DN,
        )

    def read_typed(self) -> str:
        with open(self.fifo) as f:  # blocks until the shell writes
            return f.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def open_window(
    desk: Desktop, display: str | None, title: str, text: str, app_id: str
) -> tuple[Terminal, dict]:
    with desk.ipc() as ipc:
        assert ipc.request(SUBSCRIBE, '["window"]')["success"]
        term = Terminal(desk, display, title, text)
        win = ipc.wait_window(
            lambda c: c.get("app_id") == app_id and title in (c.get("name") or "") and c["focused"],
            change="focus",
        )
    return term, win


def shot_of(desk: Desktop, term: Terminal, win: dict, typed: str) -> bytes:
    """Type ``typed`` + Return into the focused window, wait for the program to read it, then
    the window's pixels."""
    p = desk.run(*TYPE, typed, "-k", "Return")
    assert p.returncode == 0, p.stderr
    assert term.read_typed() == typed
    r = win["rect"]
    # the first text line only: the echo of what was typed may still be on its way to the screen
    return desk.screenshot().crop(r["x"], r["y"], r["width"], FIRST_LINE_PX).pixels


def close_window(desk: Desktop, term: Terminal) -> None:
    with desk.ipc() as ipc:
        assert ipc.request(SUBSCRIBE, '["window"]')["success"]
        term.close()
        ipc.wait_window(lambda c: True)  # the close event


def test_window_labelled_typed_into_and_drawn_as_without_the_filter(
    desk: Desktop, work: Proxy
) -> None:
    text = "HELLO-FROM-WORK"
    # reference: the same program straight on the compositor
    direct, win = open_window(desk, None, "ref", text, "foot")
    reference = shot_of(desk, direct, win, "typed-by-host")
    close_window(desk, direct)

    term, win = open_window(desk, work.listen, "ref", text, "vmsilo:work:green")
    assert win["app_id"] == "vmsilo:work:green"
    assert win["name"] == "[work] ref"
    filtered = shot_of(desk, term, win, "typed-by-host")  # wtype on the host reached it
    close_window(desk, term)
    colours: dict[bytes, int] = {}
    for i in range(0, len(filtered), 3):
        colours[filtered[i : i + 3]] = colours.get(filtered[i : i + 3], 0) + 1
    background = max(colours, key=lambda c: colours[c])
    ink = len(filtered) // 3 - colours[background]
    assert ink > 100, "the text is not drawn"
    assert filtered == reference, "the window differs from the same program without the filter"


def test_globals_through_the_filter(desk: Desktop, work: Proxy) -> None:
    def interfaces(display: str | None) -> set[str]:
        p = desk.run("wayland-info", display=display)
        assert p.returncode == 0, p.stderr
        return {
            line.split("'")[1]
            for line in p.stdout.decode().splitlines()
            if line.startswith("interface: '")
        }

    direct = interfaces(None)
    assert direct & FORBIDDEN_GLOBALS, "sway offers none of them: the test proves nothing"
    seen = interfaces(work.listen)
    assert "xdg_wm_base" in seen and "wl_compositor" in seen
    assert not seen & FORBIDDEN_GLOBALS, seen & FORBIDDEN_GLOBALS


def test_selections_do_not_cross(desk: Desktop, work: Proxy) -> None:
    # a keyboard on the seat (wl-copy/wl-paste through a data device need one)
    kb = desk.keyboard()
    try:
        assert desk.popen("wl-copy", "HOST-SECRET", stdout=DN, stderr=DN).wait(timeout=30) == 0
        assert desk.run("wl-paste").stdout == b"HOST-SECRET\n"  # the host reads its own
        # the VM sets a selection: it reaches the point of asking, and the host never sees it
        env = desk.env(work.listen, WAYLAND_DEBUG="1")
        copy = subprocess.Popen(
            desk.argv("wl-copy", "--foreground", "VM-SECRET"),
            env=env,
            stdout=DN,
            stderr=subprocess.PIPE,
        )
        assert copy.stderr is not None
        assert any(b"set_selection" in line for line in copy.stderr), "wl-copy never asked"
        copy.kill()
        copy.wait()
        assert desk.run("wl-paste").stdout == b"HOST-SECRET\n"
        # the VM asks for the host's selection: it gets focus (keyboard enter) and no offer
        paste = subprocess.Popen(
            desk.argv("wl-paste"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert paste.stderr is not None
        debug = []
        for line in paste.stderr:
            debug.append(line)
            if b"wl_keyboard@" in line and b".modifiers(" in line:
                break
        paste.kill()
        out, _ = paste.communicate(timeout=10)
        assert b"HOST-SECRET" not in out
        assert not [d for d in debug if b"wl_data_offer" in d or b".selection(" in d], debug
        assert any(b".enter(" in d for d in debug), "the test never got focus: it proves nothing"
    finally:
        kb.kill()
        kb.wait()


def test_two_vms_each_label_their_own_window(desk: Desktop) -> None:
    work = desk.start_proxy("work", "green")
    bank = desk.start_proxy("banking", "red")
    try:
        t1, _w1 = open_window(desk, work.listen, "one", "1", "vmsilo:work:green")
        t2, _w2 = open_window(desk, bank.listen, "two", "2", "vmsilo:banking:red")
        names = {w["app_id"]: w["name"] for w in desk.tree_windows()}
        assert names == {"vmsilo:work:green": "[work] one", "vmsilo:banking:red": "[banking] two"}
        t1.close()
        t2.close()
    finally:
        work.stop()
        bank.stop()


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _closed_by_proxy(s: socket.socket) -> bool:
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_fuzzed_clients_lose_only_their_own_connection(desk: Desktop, work: Proxy) -> None:
    term, _win = open_window(desk, work.listen, "keeper", "still here", "vmsilo:work:green")
    rng = random.Random(11)
    bad = [
        rng.randbytes(4096),  # noise
        struct.pack("=II", 1, 12 << 16 | 1) + b"\0\0",  # truncated, then hang up
        struct.pack("=II", 1, 0xFFFF << 16 | 0) + bytes(64),  # oversized
        struct.pack("=II", 77, 8 << 16 | 0),  # unknown object
        struct.pack("=II", 1, 8 << 16 | 9),  # opcode out of range
        struct.pack("=III", 1, 12 << 16 | 1, 0xFF000005),  # get_registry with a server id
        struct.pack("=IIII", 1, 16 << 16 | 1, 2, 9),  # bytes past the message's args
    ]
    for _i in range(20):  # valid headers on random objects and opcodes, random bodies
        n = rng.randrange(0, 12) * 4
        bad.append(
            struct.pack("=II", rng.choice([1, 2, 3]), (8 + n) << 16 | rng.randrange(4))
            + rng.randbytes(n)
        )
    for payload in bad:
        s = _raw(work.listen)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert _closed_by_proxy(s)
        s.close()
    # fds it should not send: a pile of them with a harmless sync
    s = _raw(work.listen)
    r, w = os.pipe()
    sync = struct.pack("=III", 1, 12 << 16 | 0, 2)
    s.sendmsg(
        [sync], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=" + "i" * 40, *[r] * 40))]
    )
    assert _closed_by_proxy(s)
    os.close(r)
    os.close(w)
    s.close()
    assert work.proc.poll() is None, "the proxy died"
    p = desk.run("wayland-info", display=work.listen)
    assert p.returncode == 0 and b"xdg_wm_base" in p.stdout
    assert any(w["name"] == "[work] keeper" for w in desk.tree_windows())
    assert desk.run(*TYPE, "after-fuzz", "-k", "Return").returncode == 0
    assert term.read_typed() == "after-fuzz"
    term.close()
    assert "client closed" in work.stop()


def test_missing_compositor_is_a_clear_error(desk: Desktop) -> None:
    p = desk.start_proxy("work", "green", upstream=f"{desk.runtime}/no-such-wayland")
    try:
        r = desk.run("wayland-info", display=p.listen)  # exits 0 even then
        assert b"no Wayland compositor" in r.stderr, r.stderr
    finally:
        p.stop()


def test_sway_rules_accepted_and_applied_to_filtered_windows(desk: Desktop, work: Proxy) -> None:
    from vmsilo.host.desktop_rules import BORDER_PX, render_sway
    from vmsilo.plan.model import Plan

    plan = SimpleNamespace(vms={"work": SimpleNamespace(name="work", color="green")})
    rules = render_sway(cast(Plan, plan))
    commands = [line for line in rules.splitlines() if line and not line.startswith("#")]
    assert commands and "#008000" in commands[0]
    with desk.ipc() as ipc:
        for command in commands:  # sway's own parser: every rule is accepted
            assert ipc.request(RUN_COMMAND, command) == [{"success": True}], command
    term, opened = open_window(desk, work.listen, "ruled", "x", "vmsilo:work:green")
    shot_of(desk, term, opened, "mapped")  # a round trip through sway after the map
    win = next(w for w in desk.tree_windows() if w["id"] == opened["id"])
    assert win["border"] == "pixel" and win["current_border_width"] == BORDER_PX
    close_window(desk, term)


def test_a_vm_copies_and_pastes_inside_and_across_only_when_asked(desk: Desktop) -> None:
    """SPEC §9.1 item 3 and §9.4: the VM's own programs share its clipboard (the filter keeps
    it); another VM and the host never see it; the control socket (vm-clipboard's way) moves it
    to another VM when asked, and only then."""
    from vmsilo.cli.vm_clipboard import ask

    work = desk.start_proxy("work", "green")
    bank = desk.start_proxy("banking", "red")
    kb = desk.keyboard()
    env = desk.env(work.listen, WAYLAND_DEBUG="1")
    copy = subprocess.Popen(
        desk.argv("wl-copy", "--foreground", "INSIDE-WORK"),
        env=env,
        stdout=DN,
        stderr=subprocess.PIPE,
    )
    try:
        assert copy.stderr is not None
        assert any(b"set_selection" in line for line in copy.stderr), "wl-copy never asked"
        # another program of the same VM pastes it
        assert desk.run("wl-paste", "-n", display=work.listen).stdout == b"INSIDE-WORK"
        # neither the other VM nor the host sees it
        assert b"INSIDE-WORK" not in desk.run("timeout", "5", "wl-paste", "-n").stdout
        other = desk.run("timeout", "5", "wl-paste", "-n", display=bank.listen)
        assert b"INSIDE-WORK" not in other.stdout
        # the user moves it: work's selection out, into banking's
        answer, data = ask(work.control, {"op": "copy"})
        assert answer["ok"] and data == b"INSIDE-WORK", answer
        assert answer["mime"] == "text/plain;charset=utf-8"
        paste = {"op": "paste", "mime": answer["mime"], "size": len(data)}
        answer, _ = ask(bank.control, paste, data)
        assert answer["ok"], answer
        assert desk.run("wl-paste", "-n", display=bank.listen).stdout == b"INSIDE-WORK"
        assert b"INSIDE-WORK" not in desk.run("timeout", "5", "wl-paste", "-n").stdout
        # the control socket is the user's alone
        assert oct(os.stat(work.control).st_mode & 0o777) == "0o600"
    finally:
        copy.kill()
        copy.wait()
        kb.kill()
        kb.wait()
        log = work.stop() + bank.stop()
    assert "Traceback" not in log, log


def _host_copy(desk: Desktop, *args: str) -> int:
    """wl-copy on the host (its child keeps serving the selection: no pipes to wait on)."""
    return desk.popen("wl-copy", *args, stdout=DN, stderr=DN).wait(timeout=30)


def _debug_run(
    desk: Desktop, display: str, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    env = desk.env(display, WAYLAND_DEBUG="1")
    return subprocess.run(desk.argv(*args), env=env, capture_output=True, timeout=timeout)


def test_a_vm_keeps_its_own_primary_selection(desk: Desktop) -> None:
    """Middle-click paste inside a VM (SPEC §9.1 item 3): text selected in one of work's
    programs is pasted by another of work's, never by banking's nor by the host's; the host's
    primary selection never reaches work; vm-clipboard does not move it (clipboard only)."""
    from vmsilo.cli.vm_clipboard import ask

    work = desk.start_proxy("work", "green")
    bank = desk.start_proxy("banking", "red")
    kb = desk.keyboard()
    copy: subprocess.Popen[bytes] | None = None
    try:
        assert _host_copy(desk, "--primary", "HOST-PRIMARY") == 0
        assert desk.run("wl-paste", "--primary", "-n").stdout == b"HOST-PRIMARY"
        # the host's primary selection is not work's, though work's program has focus
        p = _debug_run(desk, work.listen, "timeout", "10", "wl-paste", "--primary", "-n")
        assert b"HOST-PRIMARY" not in p.stdout
        assert b"zwp_primary_selection_device_manager_v1" in p.stderr, "no primary: proves nothing"
        assert b"wl_keyboard@" in p.stderr and b".enter(" in p.stderr, "never had focus"
        # work selects text (a program holds its primary selection)
        copy = subprocess.Popen(
            desk.argv("wl-copy", "--primary", "--foreground", "WORK-PRIMARY"),
            env=desk.env(work.listen, WAYLAND_DEBUG="1"),
            stdout=DN,
            stderr=subprocess.PIPE,
        )
        assert copy.stderr is not None
        asked = any(
            b"zwp_primary_selection_device_v1@" in line and b"set_selection" in line
            for line in copy.stderr
        )
        assert asked, "wl-copy --primary never set work's primary selection"
        # another program of work pastes it; its clipboard is another selection
        assert desk.run("wl-paste", "--primary", "-n", display=work.listen).stdout == (
            b"WORK-PRIMARY"
        )
        clip = desk.run("timeout", "5", "wl-paste", "-n", display=work.listen)
        assert b"WORK-PRIMARY" not in clip.stdout
        # neither the host nor banking sees it
        assert desk.run("wl-paste", "--primary", "-n").stdout == b"HOST-PRIMARY"
        other = desk.run("timeout", "5", "wl-paste", "--primary", "-n", display=bank.listen)
        assert b"WORK-PRIMARY" not in other.stdout and b"HOST-PRIMARY" not in other.stdout
        # vm-clipboard moves the clipboard only
        answer, data = ask(work.control, {"op": "copy"})
        assert not answer["ok"] and b"WORK-PRIMARY" not in data, answer
    finally:
        if copy is not None:
            copy.kill()
            copy.wait()
        kb.kill()
        kb.wait()
        log = work.stop() + bank.stop()
    assert "Traceback" not in log, log


def test_host_selection_changes_leave_no_objects_in_the_compositor(desk: Desktop) -> None:
    """Every host selection change gives a focused VM window a new offer of the compositor's
    (clipboard and primary), which the filter hides. It destroys each upstream: sway (libwayland)
    reuses a destroyed object's id for its next one, so the compositor ids the filter sees stay
    within a few of each other however often the host copies; without the destroy each change
    leaves one more object alive in sway, with a new id."""
    import threading

    from vmsilo.wayland.policy import Labels
    from vmsilo.wayland.proxy import Proxy as Filter
    from vmsilo.wayland.wire import SERVER_ID_BASE

    d = desk.runtime / "leakcheck"
    d.mkdir(mode=0o700)
    os.chown(d, desk.user.pw_uid, desk.user.pw_gid)
    listen = str(d / "wayland.socket")
    f = Filter(Labels("leak", "green"), listen, desk.socket_path, log=lambda m: None)
    f.bind()
    os.chown(listen, desk.user.pw_uid, desk.user.pw_gid)
    loop = threading.Thread(target=f.run, daemon=True)
    loop.start()
    term, _win = open_window(desk, listen, "leak", "x", "vmsilo:leak:green")
    try:

        def state() -> tuple[int, int, int]:
            sessions = [link.session for link in f.links]
            ids = [o for s in sessions for o in s.objects if o >= SERVER_ID_BASE]
            live = sum(len(s.host_offers.live) for s in sessions)
            return sum(s.host_offers.destroyed for s in sessions), live, max(ids, default=0)

        done0, _, top0 = f.call(state)
        changes = 15
        for i in range(changes):
            assert _host_copy(desk, f"host-{i}") == 0
            assert _host_copy(desk, "--primary", f"host-primary-{i}") == 0
        deadline = time.monotonic() + 30
        while (done := f.call(state))[0] - done0 < 2 * changes and time.monotonic() < deadline:
            time.sleep(0.2)
        destroyed, live, top = done
        assert destroyed - done0 >= 2 * changes, f"only {destroyed - done0} offers seen"
        assert live <= 1
        assert top - max(top0, SERVER_ID_BASE) < 4, f"compositor ids grew to {top:#x}"
    finally:
        term.close()
        f.stop()
        loop.join(10)


def _raw_with_primary(path: str) -> tuple[socket.socket, bytes]:
    """A raw client through the filter that bound a seat and the primary selection manager and
    made a device (id 6) and a source (id 7): the bytes that did it are returned for reuse."""
    from collections import deque

    from vmsilo.wayland import protocol
    from vmsilo.wayland.wire import NewId, decode, encode, header

    p = protocol.load()

    def request(oid: int, iface: str, name: str, *args: object) -> bytes:
        m = next(m for m in p[iface].requests if m.name == name)
        return encode(oid, m, list(args))[0]  # type: ignore[arg-type]

    s = _raw(path)
    s.sendall(
        request(1, "wl_display", "get_registry", NewId(2))
        + request(1, "wl_display", "sync", NewId(3))
    )
    names: dict[str, int] = {}
    buf = b""
    while 3 not in names.values():
        buf += s.recv(65536)
        while len(buf) >= 8 and len(buf) >= header(buf, 0)[2]:
            oid, opcode, size = header(buf, 0)
            if oid == 2 and opcode == 0:  # wl_registry.global
                m = p["wl_registry"].events[0]
                name, iface, _v = decode(m, buf[8:size], deque())
                assert isinstance(iface, bytes) and isinstance(name, int)
                names[iface.decode()] = name
            if oid == 3:
                names["done"] = 3
            buf = buf[size:]
    manager = "zwp_primary_selection_device_manager_v1"
    assert manager in names and "wl_seat" in names, names
    setup = (
        request(2, "wl_registry", "bind", names["wl_seat"], NewId(4, "wl_seat", 1))
        + request(2, "wl_registry", "bind", names[manager], NewId(5, manager, 1))
        + request(5, manager, "get_device", NewId(6), 4)
        + request(5, manager, "create_source", NewId(7))
        + request(7, "zwp_primary_selection_source_v1", "offer", b"text/plain")
    )
    s.sendall(setup)
    return s, setup


def test_hostile_primary_selection_requests_lose_only_their_connection(
    desk: Desktop, work: Proxy
) -> None:
    """Random and malformed requests on the primary selection objects (its manager, device,
    source, an offer never shown): the client loses its connection; the filter and the VM's
    primary selection go on."""
    rng = random.Random(17)
    kb = desk.keyboard()
    copy: subprocess.Popen[bytes] | None = None
    try:
        for i in range(40):
            s, _ = _raw_with_primary(work.listen)
            target = rng.choice([5, 6, 7, 0xFF000000, 0xFF000003])
            n = rng.randrange(0, 10) * 4
            body = rng.randbytes(n)
            if i % 3 == 0 and n >= 4:  # a plausible object id or string length first
                first = rng.choice([0, 4, 7, 0xFF000000, 1 << 30])
                body = first.to_bytes(4, "little") + body[4:]
            payload = struct.pack("=II", target, (8 + n) << 16 | rng.randrange(4)) + body
            if i % 2:  # and garbage after: every connection must end, even when one was valid
                payload += struct.pack("=II", 99, 8 << 16)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed already
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            assert _closed_by_proxy(s)
            s.close()
        assert work.proc.poll() is None, "the filter died"
        # the VM's middle-click paste still works
        copy = subprocess.Popen(
            desk.argv("wl-copy", "--primary", "--foreground", "STILL-HERE"),
            env=desk.env(work.listen, WAYLAND_DEBUG="1"),
            stdout=DN,
            stderr=subprocess.PIPE,
        )
        assert copy.stderr is not None
        assert any(b"set_selection" in line for line in copy.stderr)
        got = desk.run("wl-paste", "--primary", "-n", display=work.listen).stdout
        assert got == b"STILL-HERE"
    finally:
        if copy is not None:
            copy.kill()
            copy.wait()
        kb.kill()
        kb.wait()
