"""Every command against a strict fake lifecycle app, in-process: what each asks the app to do,
its argparse parsing with the original messages and exit statuses (SPEC §6), and one line —
never a traceback — when a user who is not root meets a PermissionError.
"""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import USERS
from strict import StrictApp
from vmsilo import __version__
from vmsilo.cli import vm_run, vm_shell, vm_start, vm_start_debug, vm_stop
from vmsilo.cli.common import guarded
from vmsilo.cli.vmsilo import main as vmsilo_main
from vmsilo.errors import VMStartError
from vmsilo.lifecycle.embedded import EmbeddedApp
from vmsilo.supervisor.launch import take_listen_fd
from vmsilo.supervisor.state import VmLock, VmState, write_state


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "vmsilo.toml"
    path.write_text(
        f"""
user = "alice"
stateDir = "{tmp_path}/state"
runtimeDir = "{tmp_path}/run"
[vms.netvm]
network.isNetvm = true
network.netvm = "host"
[vms.work]
network.netvm = "netvm"
"""
    )
    return path


@pytest.fixture
def app() -> Iterator[StrictApp]:
    fake = StrictApp()
    yield fake
    fake.done()


def vmsilo(cfg: Path, app: StrictApp, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = vmsilo_main(["-c", str(cfg), *args], users=USERS, stdout=out, stderr=err, app=app)
    return status, out.getvalue(), err.getvalue()


def tool(main: Any, *args: str, **kw: Any) -> tuple[int, str]:
    err = io.StringIO()
    status = main(list(args), err=err, **kw)
    return status, err.getvalue()


# ---------------------------------------------------------------- the verbs ask the app


def test_vmsilo_start_stop_status_go_through_the_app(cfg: Path, app: StrictApp) -> None:
    app.expect("start", "work", wait=True)
    assert vmsilo(cfg, app, "start", "work")[:2] == (0, "work: running\n")
    app.expect("start", "work", wait=False)
    assert vmsilo(cfg, app, "start", "--no-wait", "work")[:2] == (0, "work: starting\n")
    app.expect("running_plan", "netvm")
    app.expect("stop", "netvm", with_clients=True, kill=False, returns=True)
    assert vmsilo(cfg, app, "stop", "--force", "netvm")[:2] == (0, "netvm: stopped\n")
    app.expect("running_plan", "work")
    app.expect("stop", "work", with_clients=False, kill=False, returns=False)
    assert vmsilo(cfg, app, "stop", "work")[:2] == (0, "work: not running\n")
    app.expect("status", "netvm", returns={"name": "netvm", "state": "running"})
    app.expect("status", "work", returns={"name": "work", "state": "stopped"})
    status, out, _ = vmsilo(cfg, app, "status", "--json")
    assert status == 0 and '"state": "running"' in out and '"state": "stopped"' in out


def test_unknown_vm_exits_2_without_asking_the_app(cfg: Path, app: StrictApp) -> None:
    status, _out, err = vmsilo(cfg, app, "stop", "nosuch")
    assert status == 2 and "unknown VM: nosuch" in err and "Available VMs: netvm, work" in err


def test_image_gc_asks_the_app_which_images_are_in_use(cfg: Path, app: StrictApp) -> None:
    app.expect("images_in_use", "*", returns=(set(), ["VM x is running but …"]))
    status, out, err = vmsilo(cfg, app, "image", "gc", "--dry-run")
    assert status == 0 and "nothing to remove" in out and "VM x is running" in err


def test_service_cleanup_marks_a_dead_supervisor_failed(cfg: Path, app: StrictApp) -> None:
    run = cfg.parent / "run"
    run.mkdir()
    write_state(run / "work.state.json", VmState("running", supervisor_pid=1, vmm_pid=2))
    app.expect("running_plan", "work")
    status, _out, err = vmsilo(cfg, app, "service", "cleanup", "work")
    assert status == 0, err
    text = (run / "work.state.json").read_text()
    assert '"failed"' in text and "supervisor exited without cleanup" in text


def test_listen_fds_are_taken_only_when_meant_for_this_process() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert take_listen_fd(env) == 3 and env == {}
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert take_listen_fd(env) is None and env == {}
    assert take_listen_fd({}) is None


# ---------------------------------------------------------------- vm-* tools: argparse, exit 1


@pytest.mark.parametrize("args", [[], ["-x"], ["a", "b"], ["-h"], ["--"]])
def test_vm_start_usage(args: list[str], app: StrictApp) -> None:
    assert tool(vm_start.main, *args, app=app) == (1, "Usage: vm-start <vm-name>\n")


def test_vm_start_and_stop_ask_the_app(cfg: Path, app: StrictApp) -> None:
    app.expect("start", "work", wait=True)
    assert tool(vm_start.main, "-c", str(cfg), "work", users=USERS, app=app) == (0, "")
    app.expect("running_plan", "work").expect("stop", "work", with_clients=True, kill=False)
    assert tool(vm_stop.main, "-c", str(cfg), "--force", "work", users=USERS, app=app)[0] == 0
    app.expect("running_plan", "work").expect("stop", "work", with_clients=True, kill=False)
    assert tool(vm_stop.main, "--config", str(cfg), "work", "--force", users=USERS, app=app)[0] == 0


def test_vm_tools_name_an_unknown_vm(cfg: Path, app: StrictApp) -> None:
    expected = (1, "Unknown VM: x\nAvailable VMs: netvm, work\n")
    for main in (vm_start.main, vm_stop.main, vm_shell.main):
        assert tool(main, "-c", str(cfg), "x", users=USERS, app=app) == expected


@pytest.mark.parametrize(
    "args",
    [[], ["a", "b"], ["--force"], ["--forc", "x"], ["--kill"], ["--with-clients"], ["-h"]],
)
def test_vm_stop_usage(args: list[str], app: StrictApp) -> None:
    # issue 15.8: the usage names --with-clients (was --force, still accepted) and --kill
    assert tool(vm_stop.main, *args, app=app) == (
        1,
        "Usage: vm-stop [--with-clients] [--kill] <vm-name>\n",
    )


def test_vm_stop_failure_is_one_line_exit_1(cfg: Path, app: StrictApp) -> None:
    app.expect("running_plan", "work")
    app.expect(
        "stop", "work", with_clients=False, kill=False, raises=VMStartError("boom", "a hint")
    )
    assert tool(vm_stop.main, "-c", str(cfg), "work", users=USERS, app=app) == (
        1,
        "vm-stop: boom (hint: a hint)\n",
    )


def test_vm_shell_usage(app: StrictApp) -> None:
    status, err = tool(vm_shell.main, "--bogus", "x", app=app)
    assert status == 1 and err.startswith("Usage: vm-shell [--ssh [--root]] <vm-name>")
    assert tool(vm_shell.main, "--root", "x", app=app) == (1, "Error: --root requires --ssh\n")


def test_vm_start_debug_usage_and_root(monkeypatch: pytest.MonkeyPatch, app: StrictApp) -> None:
    assert tool(vm_start_debug.main, app=app) == (
        1,
        "Usage: vm-start-debug <vm-name>\nNote: Requires root privileges (use sudo)\n",
    )
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert tool(vm_start_debug.main, "work", app=app) == (
        1,
        "Error: vm-start-debug requires root privileges\nRun: sudo vm-start-debug work\n",
    )


# ---------------------------------------------------------------- vm-run: argparse, exit 255


def test_vm_run_passes_everything_after_the_vm_verbatim() -> None:
    args = vm_run.parse_args(["-t", "--env", "A=1", "VM", "ls", "-l", "--help", "--", "-t"])
    assert args is not None
    assert (args.vm, args.argv) == ("VM", ["ls", "-l", "--help", "--", "-t"])
    assert args.tty and args.env == ["A=1"]
    args = vm_run.parse_args(["--", "VM", "--detach"])
    assert args is not None and (args.vm, args.argv, args.detach) == ("VM", ["--detach"], False)
    args = vm_run.parse_args(["--user", "bob", "--root", "--no-autostart", "VM", "x"])
    assert args is not None and args.user == "root" and not args.autostart
    assert vm_run.parse_args(["--help", "--bogus"]) is None


def test_vm_run_help_teaches() -> None:
    """``vm-run --help`` (the real entry point): every option, the exit statuses, examples."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vm_run", "--help"], capture_output=True, text=True
    )
    assert (p.returncode, p.stderr) == (0, "")
    text = p.stdout
    assert text.startswith("vm-run [OPTIONS...] VM COMMAND [ARGUMENT...]\n")
    for action in vm_run.build_parser()._actions:
        for option in action.option_strings:
            assert f" {option} " in text or f" {option}\n" in text, option
    statuses = text.split("Exit status:", 1)[1].split("Examples:", 1)[0]
    for status in ("126", "127", "128+N", "124 if --timeout", "255"):
        assert status in statuses, status
    examples = text.split("Examples:", 1)[1]
    assert examples.count("    vm-run ") == 2
    assert "/etc/vmsilo/vmsilo.toml" in text
    p = subprocess.run(
        [sys.executable, "-m", "vmsilo.cli.vm_run", "--version"], capture_output=True, text=True
    )
    assert (p.returncode, p.stdout) == (0, f"vm-run (vmsilo) {__version__}\n")
    # after the VM, --help and --version are the guest command's
    args = vm_run.parse_args(["VM", "ls", "--version"])
    assert not isinstance(args, str) and args is not None and args.argv == ["ls", "--version"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["VM"], "expected a VM name and a command"),
        (["--bogus", "VM", "x"], "unknown option --bogus"),
        (["--no", "VM", "x"], "unknown option --no"),
        (["--user"], "option --user needs a value"),
        (["-c"], "option -c needs a value"),
        (["--env", "nope", "VM", "x"], "--env 'nope': expected K=V"),
        (["--timeout", "soon", "VM", "x"], "--timeout 'soon': expected seconds"),
        (["--timeout", "0", "VM", "x"], "--timeout must be positive"),
        (["-t", "--detach", "VM", "x"], "-t and --detach cannot be combined"),
    ],
)
def test_vm_run_usage_errors_exit_255(args: list[str], message: str, app: StrictApp) -> None:
    err = io.StringIO()
    assert vm_run.main(args, stderr=err, app=app) == 255
    assert err.getvalue().startswith(f"vm-run: {message} (hint: usage: vm-run")


def test_vm_run_unknown_and_stopped_vm(cfg: Path, app: StrictApp) -> None:
    err = io.StringIO()
    assert vm_run.main(["-c", str(cfg), "x", "true"], users=USERS, stderr=err, app=app) == 255
    assert "Available VMs: netvm, work" in err.getvalue()
    app.expect("command_socket_live", "work", returns=False)
    err = io.StringIO()
    args = ["-c", str(cfg), "--no-autostart", "work", "true"]
    assert vm_run.main(args, users=USERS, stderr=err, app=app) == 255
    assert err.getvalue() == "vm-run: VM work is not running (hint: start it: vm-start work)\n"


# ---------------------------------------------------------------- no traceback for OSError


@pytest.fixture
def held(cfg: Path) -> Iterator[None]:
    """VM work looks running: its lock is held and its state names a supervisor pid."""
    run = cfg.parent / "run"
    lock = VmLock(run / "work.lock")
    lock.acquire("work")
    write_state(run / "work.state.json", VmState("running", supervisor_pid=424242))
    yield
    lock.release()


def test_stopping_as_a_user_says_it_needs_root(
    cfg: Path, held: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a user who is not root gets from os.kill on the root-owned supervisor."""
    sent: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    line = (
        "stopping VM work needs root here (hint: sudo vm-stop work, or `vmsilo install` so"
        " systemd/polkit let alice do it)\n"
    )
    app = EmbeddedApp(cfg)
    assert tool(vm_stop.main, "-c", str(cfg), "work", users=USERS, app=app) == (
        1,
        "vm-stop: " + line,
    )
    out, err = io.StringIO(), io.StringIO()
    args = ["-c", str(cfg), "stop", "work"]
    assert vmsilo_main(args, users=USERS, stdout=out, stderr=err, app=app) == 2
    assert err.getvalue() == "error: " + line
    assert sent == [(424242, signal.SIGTERM)] * 2


def test_starting_as_a_user_says_it_needs_root(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status, err = tool(vm_start.main, "-c", str(cfg), "work", users=USERS, app=EmbeddedApp(cfg))
    assert status == 1
    assert err.startswith("vm-start: VM work is not running and only root can start it here")
    assert "\n" not in err.rstrip("\n")


def test_logs_unreadable_as_a_user(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = cfg.parent / "state" / "work-console.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("boot\n")
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self.name.endswith("console.log"):
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    status, _out, err = vmsilo(cfg, StrictApp(), "logs", "work")
    assert status == 2
    assert err == (
        "error: reading the console log of VM work needs root here (hint: sudo vmsilo logs work)\n"
    )


def test_any_oserror_is_one_line_with_the_commands_status(cfg: Path, app: StrictApp) -> None:
    def denied() -> int:
        raise PermissionError(13, "Permission denied", "/run/vmsilo/x")

    err = io.StringIO()
    assert guarded(denied, 2, err) == 2
    assert err.getvalue() == (
        "error: Permission denied: /run/vmsilo/x (hint: this needs root here: run it with sudo)\n"
    )
    app.expect("start", "work", wait=True, raises=PermissionError(13, "Permission denied", "/x"))
    status, err_text = tool(vm_start.main, "-c", str(cfg), "work", users=USERS, app=app)
    assert status == 1 and err_text.startswith("vm-start: Permission denied: /x")
    app.expect("command_socket_live", "work", raises=PermissionError(13, "Permission denied"))
    err = io.StringIO()
    assert vm_run.main(["-c", str(cfg), "work", "true"], users=USERS, stderr=err, app=app) == 255
    assert (
        err.getvalue().startswith("vm-run: Permission denied") and "Traceback" not in err.getvalue()
    )
