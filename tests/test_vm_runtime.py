"""The everyday runtime on a real guest: vm-run options, console and shells, logs, auto-shutdown."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmenv import VM_DEMO, Install, qemu_install
from vmsilo.supervisor.state import wait_unlocked

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def inst(image: Any, state_dir: Path) -> Iterator[Install]:
    with qemu_install(state_dir, "rt", VM_DEMO) as install:
        p = install.cmd("vmsilo", "start", "demo")
        assert p.returncode == 0, p.stderr
        yield install


def test_env_cwd_user_options(inst: Install) -> None:
    p = inst.cmd(
        "vm-run",
        "--env",
        "GREETING=hi there",
        "--cwd",
        "/usr",
        "demo",
        "sh",
        "-c",
        'echo "$GREETING"; pwd; id -un',
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    assert lines[:2] == ["hi there", "/usr"]
    p = inst.cmd("vm-run", "--user", "nobody", "demo", "id", "-un")
    assert p.stdout == b"nobody\n", p.stderr
    p = inst.cmd("vm-run", "--root", "demo", "id", "-u")
    assert p.stdout == b"0\n"
    p = inst.cmd("vm-run", "--cwd", "/nonexistent", "demo", "true")
    assert p.returncode == 126


def test_timeout_ends_the_guest_program(inst: Install) -> None:
    start = time.monotonic()
    p = inst.cmd("vm-run", "--timeout", "1", "demo", "sleep", "30")
    # the program's outcome, as timeout(1) reports it (SPEC §6: not a failure of vm-run)
    assert p.returncode == 124 and p.stderr == b"vm-run: timed out after 1 s\n"
    assert time.monotonic() - start < 10
    # the guest program was hung up: no sleep 30 left behind
    p = inst.cmd("vm-run", "demo", "sh", "-c", "sleep 0.5; pgrep -x sleep || true")
    assert p.stdout == b""


def test_detach(inst: Install) -> None:
    start = time.monotonic()
    p = inst.cmd("vm-run", "--detach", "demo", "sh", "-c", "sleep 3; echo done > /tmp/detached")
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - start < 2.5
    p = inst.cmd("vm-run", "--detach", "demo", "no-such-program")
    assert p.returncode == 127


def _pty_run(argv: list[str], script: list[tuple[bytes, bytes]], timeout: float = 60) -> bytes:
    """Run argv on a pty of size 33x101; send each input once the previous output appeared."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        for wait_for, send in script:
            while wait_for not in seen:
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {wait_for!r}; got {seen[-500:]!r}"
                r, _, _ = select.select([fd], [], [], left)
                if r:
                    try:
                        chunk = os.read(fd, 4096)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        raise AssertionError(f"EOF waiting for {wait_for!r}: {seen[-500:]!r}")
                    seen += chunk
            if send:
                os.write(fd, send)
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], deadline - time.monotonic())
            try:
                chunk = os.read(fd, 4096) if r else b""
            except OSError:
                chunk = b""
            if not chunk:
                break
            seen += chunk
    except BaseException:
        os.kill(pid, 9)  # never leave the tool running (or this test blocked in waitpid)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen[-500:]
    return seen


def _status_lines(out: bytes) -> list[str]:
    """The distinct status lines drawn in ``out`` (escape sequences and times left out)."""
    import re

    plain = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", out).decode(errors="replace")
    found = re.findall(r"starting demo: ([^\r\n…]*)…", plain)
    return list(dict.fromkeys(found))


def test_a_cold_start_on_a_terminal_says_what_it_is_doing(inst: Install) -> None:
    """vm-run, vm-start and vmsilo start on a terminal: a status line while the VM starts,
    gone before the program's output (vm-run) or when ready; nothing without a terminal, and
    nothing (not even rich loaded) on vm-run's warm path."""
    env = ["env", f"VMSILO_CONFIG={inst.config}"]
    for tool, args, last in (
        ("vm-run", ["demo", "echo", "HELLO-$((6*7))"], b"HELLO-$((6*7))\r\n"),
        ("vm-start", ["demo"], b"demo: running\r\n"),
        ("vmsilo", ["start", "demo"], b"demo: running\r\n"),
    ):
        assert inst.cmd("vmsilo", "stop", "demo").returncode == 0
        out = _pty_run([*env, *inst.argv(tool, *args)], [])
        assert "booting the guest" in _status_lines(out), (tool, out[-500:])
        # erased: after the last status line only the erasing and what the command printed
        tail = out.rsplit(b"booting the guest", 1)[1]
        assert tail.rstrip(b"\r\n").endswith(b"\x1b[2K" + last.rstrip(b"\r\n")), (tool, tail)
    # warm: no status line and no rich
    out = _pty_run([*env, *inst.argv("vm-run", "demo", "echo", "WARM")], [])
    assert out == b"WARM\r\n", out
    p = subprocess.run(
        [*env, sys.executable, "-X", "importtime", "-m", "vmsilo.cli.vm_run", "demo", "true"],
        capture_output=True,
    )
    assert p.returncode == 0 and b"vmsilo.channel.blocking_client" in p.stderr
    assert b" rich" not in p.stderr and b"start_status" not in p.stderr
    # nor pydantic, nor asyncio (tests/test_vm_run_warm.py has the whole list)
    assert b" pydantic" not in p.stderr and b" asyncio" not in p.stderr
    # no terminal: a cold start prints nothing but the program's output
    assert inst.cmd("vmsilo", "stop", "demo").returncode == 0
    p = inst.cmd("vm-run", "demo", "echo", "COLD")
    assert (p.returncode, p.stdout, p.stderr) == (0, b"COLD\n", b"")


def test_vm_shell_ssh_gives_a_pty(inst: Install) -> None:
    env_argv = ["env", f"VMSILO_CONFIG={inst.config}", *inst.argv("vm-shell", "--ssh", "demo")]
    out = _pty_run(
        env_argv,
        [
            (b"", b"tty; stty size; echo MARK-$((6*7))\n"),
            # the marker comes from the foreground job itself, so ^C cannot reach bash first
            (b"MARK-42", b"sh -c 'echo SLEEPING-$((2+2)); exec sleep 30'; echo NOT-INTERRUPTED\n"),
            (b"SLEEPING-4", b"\x03"),
            (b"^C", b"echo AFTER-$((1+1)); exit\n"),
            (b"AFTER-2", b""),
        ],
    )
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text, text
    assert "33 101" in text
    assert "NOT-INTERRUPTED" not in text.replace("; echo NOT-INTERRUPTED", "")


def test_vm_shell_ssh_without_a_terminal_speaks_for_itself(inst: Install) -> None:
    p = inst.cmd("vm-shell", "--ssh", "demo", input=b"id\n")
    assert p.returncode == 1
    assert p.stderr.decode() == (
        "vm-shell: --ssh needs a terminal on standard input (hint: for a non-interactive"
        " shell, echo 'id' | vm-run demo sh)\n"
    )
    p = inst.cmd("vm-run", "demo", "sh", input=b"echo SH-$((3*3))\n")
    assert (p.returncode, p.stdout) == (0, b"SH-9\n"), p.stderr


def test_no_stray_nul_from_script(inst: Install) -> None:
    """``script`` gives vm-run a pty and, its own input ending at once, sends Ctrl-D while
    vm-run is still starting (cooked mode): the guest must see that EOF, never a NUL."""
    if shutil.which("script") is None:
        pytest.skip("script (util-linux) not installed")
    cmd = shlex.join(inst.argv("vm-run", "-t", "demo", "od", "-c"))
    p = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=inst.env(),
        timeout=60,
    )
    assert p.returncode == 0, (p.stdout, p.stderr)
    # od saw no input at all (the EOF ended it), and the guest's pty echoed no ^@
    assert p.stdout == b"0000000\r\n", p.stdout
    p = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"],
        input=b"abc\n",
        capture_output=True,
        env=inst.env(),
        timeout=60,
    )
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert b"a   b   c  \\n" in p.stdout and b"\\0" not in p.stdout and b"^@" not in p.stdout


def test_vm_shell_console_and_ctrl_bracket(inst: Install) -> None:
    env_argv = ["env", f"VMSILO_CONFIG={inst.config}", *inst.argv("vm-shell", "demo")]
    try:
        out = _console_script(env_argv)
    except AssertionError:
        print(inst.cmd("vmsilo", "logs", "demo").stdout.decode(errors="replace")[-3000:])
        raise
    assert b"CONSOLE-42" in out


def _console_script(env_argv: list[str]) -> bytes:
    return _pty_run(
        env_argv,
        [
            (b"Escape character is CTRL+]", b"\n"),
            (b"#", b"echo CONSOLE-$((40+2))\n"),
            (b"CONSOLE-42", b"\x1d"),
        ],
    )


def test_vm_shell_with_tmux(inst: Install) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed")
    session = f"vmsilo-{os.getpid()}"
    shell = shlex.join(["env", f"VMSILO_CONFIG={inst.config}", *inst.argv("vm-shell", "demo")])
    cmd = f"{shell}; echo LEFT; sleep 60"  # the pane stays to show LEFT
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", cmd], check=True
    )
    try:

        def screen_has(text: str, timeout: float = 30) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                shot = subprocess.run(
                    ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
                ).stdout
                if text in shot:
                    return True
                time.sleep(0.1)
            return False

        assert screen_has("Escape character is CTRL+]")
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        subprocess.run(
            ["tmux", "send-keys", "-t", session, "echo TMUX-$((2*21))", "Enter"], check=True
        )
        assert screen_has("TMUX-42")
        subprocess.run(["tmux", "send-keys", "-t", session, "-H", "1d"], check=True)  # Ctrl-]
        assert screen_has("LEFT")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def test_console_shell_has_the_terminal_size(inst: Install) -> None:
    """The console is a byte stream: vm-shell gives it the terminal's size, and follows it."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed")
    session = f"vmsilo-size-{os.getpid()}"
    shell = shlex.join(["env", f"VMSILO_CONFIG={inst.config}", *inst.argv("vm-shell", "demo")])
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", f"{shell}; sleep 60"],
        check=True,
    )

    def tmux(*args: str) -> str:
        return subprocess.run(
            ["tmux", *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    def screen_has(text: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in tmux("capture-pane", "-p", "-t", session):
                return True
            time.sleep(0.1)
        return False

    def guest_reports(size: str) -> bool:
        """The console's size is set beside the byte stream, a moment after the terminal's
        changed: ask the guest until it reports ``size`` (a few times at most)."""
        for n in range(10):
            tmux("send-keys", "-t", session, f"clear; echo SIZE{n}=$(stty size)=", "Enter")
            if screen_has(f"SIZE{n}={size}=", timeout=3):
                return True
        return False

    try:
        assert screen_has("Escape character is CTRL+]")
        tmux("send-keys", "-t", session, "Enter")
        size = tmux("display", "-p", "-t", session, "#{pane_height} #{pane_width}")
        assert size.endswith(" 120")
        assert guest_reports(size), tmux("capture-pane", "-p", "-t", session)
        tmux("resize-window", "-t", session, "-x", "97", "-y", "23")
        size = tmux("display", "-p", "-t", session, "#{pane_height} #{pane_width}")
        assert size.endswith(" 97")
        assert guest_reports(size), tmux("capture-pane", "-p", "-t", session)
        tmux("send-keys", "-t", session, "-H", "1d")  # Ctrl-]
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def test_logs_show_the_console(inst: Install) -> None:
    p = inst.cmd("vmsilo", "logs", "demo")
    assert p.returncode == 0
    assert b"vmsilo-init" in p.stdout


def test_auto_shutdown_after_idle(image: Any, state_dir: Path) -> None:
    vms = (
        VM_DEMO.replace("[vms.demo]", "[vms.idle]")
        + "autoShutdown = { enable = true, after = 5 }\n"
    )
    with qemu_install(state_dir, "idle", vms) as inst:
        assert inst.cmd("vmsilo", "start", "idle").returncode == 0
        # a session longer than the idle time keeps it up
        p = inst.cmd("vm-run", "idle", "sleep", "7")
        assert p.returncode == 0, p.stderr
        # a detached program counts as a session until it exits
        p = inst.cmd("vm-run", "--detach", "idle", "sleep", "6")
        assert p.returncode == 0
        detached_at = time.monotonic()
        assert inst.status("idle")["state"] == "running"
        wait_unlocked(inst.run_dir / "idle.lock")
        down_after = time.monotonic() - detached_at
        st = inst.status("idle")
        assert st["state"] == "stopped" and st["last_exit"]["cause"] == "auto-shutdown"
        assert re.fullmatch(r"auto-shutdown: idle for \d+ s", st["last_exit"]["reason"])
        # about 6 s of detached program + 5 s idle (+ the guest's shutdown)
        assert 10 <= down_after <= 20, down_after
        # the next vm-run starts it again
        p = inst.cmd("vm-run", "idle", "echo", "back")
        assert (p.returncode, p.stdout) == (0, b"back\n")


def test_netvm_stays_up_while_a_client_runs(image: Any, state_dir: Path) -> None:
    vms = (
        VM_DEMO.replace("[vms.demo]", "[vms.gate]")
        + "autoShutdown = { enable = true, after = 4 }\nnetwork = { isNetvm = true }\n"
        + VM_DEMO.replace("[vms.demo]", "[vms.client]")
        + "network = { netvm = 'gate' }\n"
    )
    with qemu_install(state_dir, "hold", vms, netns=True) as inst:
        p = inst.cmd("vmsilo", "start", "client")
        assert p.returncode == 0, p.stderr
        assert inst.status("gate")["state"] == "running"
        # well past the netvm's idle time: its client's supervisor holds a session there
        p = inst.cmd("vm-run", "client", "sleep", "8")
        assert p.returncode == 0
        assert inst.status("gate")["state"] == "running"
        p = inst.cmd("vmsilo", "stop", "client")
        assert p.returncode == 0, p.stderr
        stopped_at = time.monotonic()
        wait_unlocked(inst.run_dir / "gate.lock")
        idle = time.monotonic() - stopped_at
        assert inst.status("gate")["last_exit"]["cause"] == "auto-shutdown"
        assert 3 <= idle <= 15, idle


def test_vm_start_debug_runs_in_the_foreground(image: Any, state_dir: Path) -> None:
    vms = VM_DEMO.replace("[vms.demo]", "[vms.dbg]")
    with qemu_install(state_dir, "dbg", vms) as inst:
        argv = ["env", f"VMSILO_CONFIG={inst.config}", *inst.argv("vm-start-debug", "dbg")]
        out = _pty_run(
            argv,
            [
                (b"vmsilo-init", b""),  # the guest's console, on our terminal
                (b"press Enter for a shell", b"\n"),  # the console shell starts on demand
                (b"# ", b"echo DEBUG-$((3*3))\n"),  # the autologin shell takes our input
                (b"DEBUG-9", b"\x03"),  # Ctrl-C: the supervisor stops the VM gracefully
            ],
            timeout=120,
        )
        assert b"DEBUG-9" in out
        st = inst.status("dbg")
        assert st["state"] == "stopped"
        assert st["last_exit"]["reason"] == "stopped on request (power button)"
