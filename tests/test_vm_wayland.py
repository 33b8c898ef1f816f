"""Windows of real QEMU guests on a real compositor (SPEC §9.1): waypipe over the vmsilo
channel, the desktop user's bridge (filter + waypipe client), a headless sway as that user.

Every check looks at what the desktop shows (sway's tree, grim's pixels) or at what the guest
program saw (what it read, what ``wayland-info`` lists), never at vmsilo's own idea of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from desktop import RUN_COMMAND, SUBSCRIBE, Desktop
from userenv import Setup, desktop_config
from vmsilo.wayland.policy import FORBIDDEN_GLOBALS

pytestmark = pytest.mark.vm

#: wtype's keys come with a keymap of its own; a guest program reading the keymap through
#: waypipe under emulation takes a while, and keys sent before it has are lost: wtype waits
#: 2 s after a key that types nothing (see test_wayland_desktop for the first lost key).
TYPE = ("wtype", "-k", "Shift_L", "-s", "2000")
FIRST_LINE_PX = 18
COLORS = {"work": "green", "play": "purple"}
DN = subprocess.DEVNULL


@pytest.fixture(scope="module")
def vms(image: object, state_dir: Path, desk: Desktop) -> Iterator[Setup]:
    """Two running QEMU VMs, ``work`` and ``play``, whose windows go to ``desk``."""
    run_dir = Path(f"/tmp/vmsilo-wl-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o755)
    more = ""
    for vm, color in COLORS.items():
        more += (
            f'[vms.{vm}]\nhypervisor = "qemu"\nmemory = 512\ncpus = 1\nsharedHome = false\n'
            f'color = "{color}"\ngpu = {{ wayland = true, waylandSocket = "{desk.socket_path}" }}\n'
            'desktopEntries = ["foot"]\n'
        )
    # a VM whose compositor is missing (started by the test that uses it)
    more += (
        '[vms.nodesk]\nhypervisor = "qemu"\nmemory = 512\ncpus = 1\nsharedHome = false\n'
        f'gpu = {{ wayland = true, waylandSocket = "{desk.runtime}/wayland-none" }}\n'
    )
    text = desktop_config(desk.user.pw_name, state_dir, run_dir, vm="work", more="")
    text = text[: text.index("[vms.work]")] + more
    config = run_dir / "vmsilo.toml"
    config.write_text(text)
    config.chmod(0o644)
    s = Setup(config, run_dir, desk.user)
    try:
        for vm in COLORS:
            p = s.as_root("vmsilo", "start", vm)
            assert p.returncode == 0, p.stderr
        yield s
    finally:
        for vm in (*COLORS, "nodesk"):
            s.as_root("vmsilo", "stop", vm)
        shutil.rmtree(run_dir, ignore_errors=True)


def vm_run(s: Setup, vm: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMSILO_CONFIG=str(s.config))
    return subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vm_run", vm, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def vm_popen(s: Setup, vm: str, *argv: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, VMSILO_CONFIG=str(s.config))
    return subprocess.Popen(
        [sys.executable, "-m", "vmsilo.cli.vm_run", vm, *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def foot_argv(title: str, script: str) -> list[str]:
    return ["foot", "-T", title, "-o", "font=monospace:size=16", "sh", "-c", script]


def open_window(desk: Desktop, start: object, app_id: str, title: str) -> dict:
    """Start a window (``start()``) and return sway's container once it has focus."""
    with desk.ipc() as ipc:
        assert ipc.request(SUBSCRIBE, '["window"]')["success"]
        assert callable(start)
        start()
        return ipc.wait_window(
            lambda c: c.get("app_id") == app_id and title in (c.get("name") or "") and c["focused"],
            timeout=90,
            change="focus",
        )


def first_line(desk: Desktop, win: dict) -> bytes:
    r = win["rect"]
    return desk.screenshot().crop(r["x"], r["y"], r["width"], FIRST_LINE_PX).pixels


def ink(pixels: bytes) -> int:
    """How many pixels are not the most common colour (the text drawn on the background)."""
    colours: dict[bytes, int] = {}
    for i in range(0, len(pixels), 3):
        colours[pixels[i : i + 3]] = colours.get(pixels[i : i + 3], 0) + 1
    return len(pixels) // 3 - max(colours.values())


def drawn_first_line(desk: Desktop, win: dict, timeout: float = 30.0) -> bytes:
    """The window's first text line once its program has drawn text there: a window has
    focus before its program's output is painted (a screenshot right then showed a bare
    frame of the host's own foot); at the deadline, whatever is shown."""
    deadline = time.monotonic() + timeout
    while True:
        line = first_line(desk, win)
        if ink(line) > 100 or time.monotonic() > deadline:
            return line
        time.sleep(0.2)


def kill_window(desk: Desktop, con_id: int) -> None:
    with desk.ipc() as ipc:
        assert ipc.request(RUN_COMMAND, f"[con_id={con_id}] kill")[0]["success"]


def wait_closed(desk: Desktop, con_id: int, action: object) -> None:
    with desk.ipc() as ipc:
        assert ipc.request(SUBSCRIBE, '["window"]')["success"]
        assert callable(action)
        action()
        ipc.wait_window(lambda c: c.get("id") == con_id, timeout=60, change="close")


def test_guest_window_is_labelled_typed_into_and_drawn(desk: Desktop, vms: Setup) -> None:
    text = "HELLO-FROM-WORK"
    # the host's own foot, same font: what the guest's window must look like
    ref: list[subprocess.Popen[bytes]] = []
    script = f'printf "%s\\n" "{text}"; read line; exec sleep 600'
    win = open_window(
        desk,
        lambda: ref.append(desk.popen(*foot_argv("ref", script), stdout=subprocess.DEVNULL)),
        "foot",
        "ref",
    )
    reference = drawn_first_line(desk, win)
    assert ink(reference) > 100, "the host's own foot drew no text"
    wait_closed(desk, win["id"], lambda: (ref[0].kill(), ref[0].wait()))

    assert vm_run(vms, "work", "mkfifo", "/tmp/typed").returncode == 0
    guest = f'printf "%s\\n" "{text}"; read line; printf "%s\\n" "$line" > /tmp/typed; sleep 600'
    procs: list[subprocess.Popen[bytes]] = []
    win = open_window(
        desk,
        lambda: procs.append(vm_popen(vms, "work", *foot_argv("hello", guest))),
        "vmsilo:work:green",
        "hello",
    )
    try:
        assert win["app_id"] == "vmsilo:work:green"
        assert win["name"] == "[work] hello"
        p = desk.run(*TYPE, "typed-on-the-host", "-k", "Return")
        assert p.returncode == 0, p.stderr
        typed = vm_run(vms, "work", "cat", "/tmp/typed")  # blocks until the guest wrote it
        assert typed.stdout.strip() == "typed-on-the-host"
        shown = drawn_first_line(desk, win)
        assert ink(shown) > 100, "the guest's text is not drawn"
        assert shown == reference, "the guest's window differs from the same program on the host"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_guest_sees_only_allowed_globals(vms: Setup) -> None:
    p = vm_run(vms, "work", "wayland-info")
    assert p.returncode == 0, p.stderr
    names = {
        line.split("'")[1] for line in p.stdout.splitlines() if line.startswith("interface: '")
    }
    assert "xdg_wm_base" in names and "wl_compositor" in names
    assert not names & set(FORBIDDEN_GLOBALS), names & set(FORBIDDEN_GLOBALS)


def test_selections_stay_in_their_vm(desk: Desktop, vms: Setup) -> None:
    # a keyboard on the seat: data devices (wl-copy, wl-paste) need one
    kb = desk.keyboard()
    copy = vm_popen(vms, "work", "env", "WAYLAND_DEBUG=1", "wl-copy", "--foreground", "WORK-SEC")
    try:
        assert copy.stderr is not None
        asked = any(b"set_selection" in line for line in copy.stderr)
        assert asked, "wl-copy in the VM never set its selection: the test proves nothing"
        # neither another VM nor the host can read it
        for vm in ("play",):
            p = vm_run(vms, vm, "timeout", "20", "wl-paste", "-n")
            assert "WORK-SEC" not in p.stdout
        host = desk.run("timeout", "10", "wl-paste", "-n")
        assert b"WORK-SEC" not in host.stdout
        # the host's selection does not reach a VM, though the VM's program has focus
        holder = desk.popen("wl-copy", "HOST-SECRET", stdout=DN, stderr=DN)
        assert holder.wait(timeout=30) == 0
        assert desk.run("wl-paste", "-n").stdout == b"HOST-SECRET"
        for vm in COLORS:
            p = vm_run(vms, vm, "env", "WAYLAND_DEBUG=1", "timeout", "20", "wl-paste", "-n")
            assert "HOST-SECRET" not in p.stdout
            assert ".enter(" in p.stderr, f"wl-paste in {vm} never had focus: proves nothing"
        # inside a VM its own programs share its clipboard: work pastes what work copied
        assert vm_run(vms, "work", "wl-paste", "-n").stdout == "WORK-SEC"
    finally:
        copy.kill()
        copy.wait()
        kb.kill()
        kb.wait()


def test_middle_click_paste_stays_in_its_vm(desk: Desktop, vms: Setup) -> None:
    """The primary selection (SPEC §9.1 item 3): what a program of work selects, another
    program of work pastes (through waypipe and the filter); play and the host do not, and the
    host's primary selection does not reach work."""
    kb = desk.keyboard()
    holder = desk.popen("wl-copy", "--primary", "HOST-PRIMARY", stdout=DN, stderr=DN)
    assert holder.wait(timeout=30) == 0
    argv = ("env", "WAYLAND_DEBUG=1", "wl-copy", "--primary", "--foreground", "WORK-PRIMARY")
    copy = vm_popen(vms, "work", *argv)
    try:
        assert copy.stderr is not None
        asked = any(
            b"zwp_primary_selection_device_v1@" in line and b"set_selection" in line
            for line in copy.stderr
        )
        assert asked, "wl-copy --primary in work never set its primary selection"
        assert vm_run(vms, "work", "wl-paste", "--primary", "-n").stdout == "WORK-PRIMARY"
        p = vm_run(vms, "play", "env", "WAYLAND_DEBUG=1", "timeout", "20", "wl-paste", "-p", "-n")
        assert "WORK-PRIMARY" not in p.stdout and "HOST-PRIMARY" not in p.stdout
        assert ".enter(" in p.stderr, "wl-paste in play never had focus: proves nothing"
        assert "zwp_primary_selection_device_manager_v1" in p.stderr
        assert desk.run("wl-paste", "--primary", "-n").stdout == b"HOST-PRIMARY"
    finally:
        copy.kill()
        copy.wait()
        kb.kill()
        kb.wait()


def test_two_vms_closing_and_stopping(desk: Desktop, vms: Setup) -> None:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    wins = {}
    for vm, color in COLORS.items():
        wins[vm] = open_window(
            desk,
            lambda vm=vm: procs.setdefault(vm, vm_popen(vms, vm, *foot_argv("two", "sleep 600"))),
            f"vmsilo:{vm}:{color}",
            "two",
        )
    try:
        names = {w["name"] for w in desk.tree_windows()}
        assert {"[work] two", "[play] two"} <= names
        # the host's own foot closed the same way gives the status vm-run must give
        ref: list[subprocess.Popen[bytes]] = []
        rwin = open_window(
            desk,
            lambda: ref.append(desk.popen(*foot_argv("refclose", "sleep 600"))),
            "foot",
            "refclose",
        )
        wait_closed(desk, rwin["id"], lambda: kill_window(desk, rwin["id"]))
        expected = ref[0].wait(timeout=30)
        # closing the window ends the program and its vm-run with its status
        wid = wins["work"]["id"]
        wait_closed(desk, wid, lambda: kill_window(desk, wid))
        assert procs["work"].wait(timeout=60) == expected
        # stopping a VM closes its windows and leaves none of its desktop processes
        pid = wins["play"]["id"]
        wait_closed(desk, pid, lambda: vms.as_root("vmsilo", "stop", "play"))
        left = subprocess.run(
            ["pgrep", "-a", "-f", "play-waypipe.socket|vmsilo.wayland.bridge --vm play"],
            capture_output=True,
            text=True,
        )
        assert left.stdout == "", left.stdout
        # the other VM's windows go on
        assert procs["play"].wait(timeout=60) != 0  # its program ended with the VM
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def desktop_processes(vm: str) -> str:
    """The bridge and waypipe client of ``vm`` still running (``pgrep -a`` lines)."""
    p = subprocess.run(
        ["pgrep", "-a", "-f", f"{vm}-waypipe.socket|vmsilo.wayland.bridge --vm {vm} "],
        capture_output=True,
        text=True,
    )
    return p.stdout


def test_without_a_compositor_a_window_program_fails_at_once(vms: Setup) -> None:
    start = subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vm_start", "nodesk"],
        env=dict(os.environ, VMSILO_CONFIG=str(vms.config)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr  # the VM itself starts
    t = time.monotonic()
    p = vm_run(vms, "nodesk", "foot", "true", timeout=60)
    took = time.monotonic() - t
    assert p.returncode != 0
    assert took < 15, f"{took:.1f} s: the program waited instead of failing"
    # the guest program itself says why (the filter's wl_display.error, through waypipe)
    assert "no Wayland compositor at" in p.stderr and "wayland-none" in p.stderr, p.stderr
    log = (vms.run_dir / "nodesk.supervisor.log").read_text()
    assert "no Wayland compositor at" in log and "wayland-none" in log


def test_a_vm_that_dies_leaves_no_desktop_process(desk: Desktop, vms: Setup) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    win = open_window(
        desk,
        lambda: procs.append(vm_popen(vms, "work", *foot_argv("dies", "sleep 600"))),
        "vmsilo:work:green",
        "dies",
    )
    assert desktop_processes("work") != ""
    status = vms.as_root("vmsilo", "status", "work", "--json")
    pid = json.loads(status.stdout)["vms"][0]["pid"]  # the VMM's
    assert isinstance(pid, int) and pid > 1
    wait_closed(desk, win["id"], lambda: os.kill(pid, signal.SIGKILL))
    assert procs[0].wait(timeout=60) == 255  # vm-run: the channel is gone
    deadline = time.monotonic() + 30
    while desktop_processes("work") and time.monotonic() < deadline:
        time.sleep(0.2)  # the supervisor's cleanup runs after the VMM's death
    assert desktop_processes("work") == ""


def test_a_menu_entry_opens_its_window(desk: Desktop, vms: Setup, tmp_path: Path) -> None:
    """SPEC §9.3 end to end: ``vmsilo install`` writes ``work``'s entry for the image's foot,
    and its ``Exec`` run as a launcher would (parsed, field codes gone) opens foot's window
    from the VM, labelled as the VM's."""
    import shlex

    from vmsilo.config.load import load_config
    from vmsilo.host.install import install
    from vmsilo.plan.build import build_plan

    plan = build_plan(load_config(vms.config))
    install(plan, str(vms.config), tmp_path, ["/usr/bin/vmsilo"], live=False)
    entry = tmp_path / "usr/local/share/applications/vmsilo-work-foot.desktop"
    lines = dict(ln.split("=", 1) for ln in entry.read_text().splitlines() if "=" in ln)
    argv = shlex.split(lines["Exec"])
    assert argv[:3] == ["vm-run", "--detach", "work"], argv
    launcher = [sys.executable, "-m", "vmsilo.cli.vm_run", *argv[1:]]
    env = dict(os.environ, VMSILO_CONFIG=str(vms.config))
    done: list[subprocess.CompletedProcess[bytes]] = []
    win = open_window(
        desk,
        lambda: done.append(subprocess.run(launcher, env=env, capture_output=True, timeout=120)),
        "vmsilo:work:green",
        "",
    )
    assert done[0].returncode == 0, done[0].stderr  # --detach: started, then returned
    assert win["name"].startswith("[work] ")
    wait_closed(desk, win["id"], lambda: kill_window(desk, win["id"]))


def vm_clipboard(vms: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vm_clipboard", *args],
        env=dict(os.environ, VMSILO_CONFIG=str(vms.config)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_vm_clipboard_moves_a_selection_only_when_asked(desk: Desktop, vms: Setup) -> None:
    """SPEC §9.4: wl-copy in work; play sees nothing of it; `vm-clipboard copy work` puts it in
    the host's vmsilo clipboard (0600, the user's); `vm-clipboard paste` to the VM whose window
    has focus (play) makes it play's selection and empties the buffer."""
    kb = desk.keyboard()
    copy = vm_popen(vms, "work", "env", "WAYLAND_DEBUG=1", "wl-copy", "--foreground", "MOVE-ME")
    procs: list[subprocess.Popen[bytes]] = []
    buffer = Path(f"/run/user/{desk.user.pw_uid}/vmsilo/clipboard")
    try:
        assert copy.stderr is not None
        assert any(b"set_selection" in line for line in copy.stderr), "wl-copy never asked"
        assert "MOVE-ME" not in vm_run(vms, "play", "timeout", "20", "wl-paste", "-n").stdout
        p = vm_clipboard(vms, "copy", "work")
        assert p.returncode == 0, p.stderr
        st = buffer.stat()
        assert oct(st.st_mode & 0o777) == "0o600" and st.st_uid == desk.user.pw_uid
        assert buffer.read_bytes().endswith(b"\nMOVE-ME")
        # still nothing in play: copying is not pasting
        assert "MOVE-ME" not in vm_run(vms, "play", "timeout", "20", "wl-paste", "-n").stdout
        # a window of play has focus: `paste` without a name goes there
        open_window(
            desk,
            lambda: procs.append(vm_popen(vms, "play", *foot_argv("focus", "sleep 600"))),
            "vmsilo:play:purple",
            "focus",
        )
        p = vm_clipboard(vms, "paste")
        assert p.returncode == 0, p.stderr
        assert "play" in p.stdout and not buffer.exists()
        assert vm_run(vms, "play", "wl-paste", "-n").stdout == "MOVE-ME"
        again = vm_clipboard(vms, "paste", "play")
        assert again.returncode == 1 and "empty" in again.stderr
    finally:
        for proc in (copy, kb, *procs):
            proc.kill()
            proc.wait()
