"""Issue 15 items 5, 7, 8, 10 through the real entry points (in-process ``main()`` with a
strict fake app): help that teaches, ``--version`` everywhere, stop options named for what
they do, the status and image tables, one-line reports of vm-start/vm-stop, check's warnings.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import USERS
from strict import StrictApp
from vmsilo.cli import vm_shell, vm_start, vm_start_debug, vm_stop
from vmsilo.cli.helptext import OPTION_COLUMN, version
from vmsilo.cli.vmsilo import main as vmsilo_main
from vmsilo.image.store import ImageInfo


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
color = "green"
memory = 4096
network.netvm = "netvm"
sharedDirectories.docs = {{ path = "{tmp_path}/no-such-dir", mountPoint = "/mnt/docs" }}
"""
    )
    return path


@pytest.fixture
def app() -> Iterator[StrictApp]:
    fake = StrictApp()
    yield fake
    fake.done()


def vmsilo(cfg: Path | None, app: StrictApp, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    config = ["-c", str(cfg)] if cfg is not None else []
    status = vmsilo_main([*config, *args], users=USERS, stdout=out, stderr=err, app=app)
    return status, out.getvalue(), err.getvalue()


def exits(capsys: pytest.CaptureFixture[str], main: Any, *args: str) -> tuple[int, str, str]:
    """(status, stdout, stderr) of a main() that ends with SystemExit (--help, --version)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    captured = capsys.readouterr()
    return int(e.value.code or 0), captured.out, captured.err


# ---------------------------------------------------------------- 7: help that teaches


def test_vmsilo_help_hides_the_completion_helper(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = exits(capsys, vmsilo_main, "--help")
    assert status == 0
    assert "_complete" not in out and "SUPPRESS" not in out
    assert "examples:" in out and "vmsilo stop --kill work" in out and "exit status" in out


@pytest.mark.parametrize(
    ("main", "prog"),
    [
        (vmsilo_main, "vmsilo"),
        (vm_start.main, "vm-start"),
        (vm_stop.main, "vm-stop"),
        (vm_shell.main, "vm-shell"),
        (vm_start_debug.main, "vm-start-debug"),
    ],
)
def test_every_command_has_version(
    main: Any, prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exits(capsys, main, "--version") == (0, f"{prog} {version()}\n", "")


@pytest.mark.parametrize(
    ("main", "usage", "options"),
    [
        (vm_start.main, "vm-start [OPTIONS...] VM", ["--config FILE"]),
        (vm_stop.main, "vm-stop [OPTIONS...] VM", ["--with-clients", "--kill"]),
        (vm_start_debug.main, "vm-start-debug [OPTIONS...] VM", ["--config FILE"]),
    ],
)
def test_vm_tools_help_describes_options_statuses_and_examples(
    main: Any, usage: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = exits(capsys, main, "--help")
    assert (status, err) == (0, "")
    assert out.startswith(usage + "\n\n")
    for section in ("Arguments:", "Options:", "Exit status:", "Examples:"):
        assert f"\n{section}\n" in out
    for option in [*options, "--help", "--version"]:
        lines = out.splitlines()
        at = next(i for i, ln in enumerate(lines) if option in ln and ln.startswith("  "))
        description = lines[at][OPTION_COLUMN:] or lines[at + 1][OPTION_COLUMN:]
        assert len(description.split()) >= 3, lines[at]  # described, not just named
    assert "--force" not in out  # the deprecated alias is hidden
    examples = out.split("\nExamples:\n")[1]
    commands = [ln for ln in examples.splitlines() if ln.startswith("  ") and ln[2] != " "]
    assert len(commands) == 2 and all("vm-" in c for c in commands)
    assert "\n  0 " in out and "\n  1 " in out


def test_vmsilo_verb_help_explains(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = exits(capsys, vmsilo_main, "stop", "--help")
    assert status == 0
    assert "--with-clients" in out and "--kill" in out and "--force" not in out
    assert "power button" in out and "stopTimeout" in out


# ---------------------------------------------------------------- 8: options that mislead


def test_stop_kill_and_with_clients_reach_the_app(cfg: Path, app: StrictApp) -> None:
    app.expect("running_plan", "work").expect("stop", "work", with_clients=False, kill=True)
    assert vmsilo(cfg, app, "stop", "--kill", "work") == (0, "work: stopped\n", "")
    app.expect("running_plan", "netvm")
    app.expect("stop", "netvm", with_clients=True, kill=True, returns=False)
    status, out, err = vmsilo(cfg, app, "stop", "--with-clients", "--kill", "netvm")
    assert (status, out, err) == (0, "netvm: not running\n", "")


def test_force_still_works_with_a_note(cfg: Path, app: StrictApp) -> None:
    app.expect("running_plan", "netvm").expect("stop", "netvm", with_clients=True, kill=False)
    status, out, err = vmsilo(cfg, app, "stop", "--force", "netvm")
    assert (status, out) == (0, "netvm: stopped\n")
    assert err == (
        "vmsilo stop: note: --force is deprecated, it means --with-clients (stop a netvm's"
        " clients first); --kill stops at once\n"
    )
    app.expect("running_plan", "netvm").expect("stop", "netvm", with_clients=True, kill=False)
    err_stream, out_stream = io.StringIO(), io.StringIO()
    argv = ["-c", str(cfg), "--force", "netvm"]
    assert vm_stop.main(argv, users=USERS, err=err_stream, out=out_stream, app=app) == 0
    assert err_stream.getvalue().startswith("vm-stop: note: --force is deprecated")
    assert out_stream.getvalue() == "netvm: stopped\n"


def test_vm_start_and_vm_stop_report_like_vmsilo(cfg: Path, app: StrictApp) -> None:
    out, err = io.StringIO(), io.StringIO()
    app.expect("start", "work", wait=True)
    argv = ["-c", str(cfg), "work"]
    assert vm_start.main(argv, users=USERS, err=err, out=out, app=app) == 0
    assert (out.getvalue(), err.getvalue()) == ("work: running\n", "")
    out = io.StringIO()
    app.expect("running_plan", "work").expect("stop", "work", with_clients=False, kill=True)
    argv = ["-c", str(cfg), "--kill", "work"]
    assert vm_stop.main(argv, users=USERS, err=err, out=out, app=app) == 0
    assert (out.getvalue(), err.getvalue()) == ("work: stopped\n", "")


def test_the_systemd_app_kills_through_systemctl(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet import plan_of
    from strict import StrictRun
    from vmsilo.lifecycle import systemd as systemd_lifecycle
    from vmsilo.lifecycle.systemd import SystemdApp

    plan = plan_of('user = "alice"\n[vms.work]\n')
    ctl = StrictRun(monkeypatch, systemd_lifecycle)
    app = SystemdApp("/etc/vmsilo/vmsilo.toml", [vm.service_unit for vm in plan.vms.values()])
    monkeypatch.setattr(app, "running_clients", lambda _p, _v: [])
    monkeypatch.setattr(app, "is_running", lambda _v: True)
    unit = "vmsilo-work-vm.service"
    ctl.expect(["systemctl", "kill", "--kill-whom=main", "--signal=SIGQUIT", unit])
    ctl.expect(["systemctl", "stop", unit])
    assert app.stop(plan, plan.vms["work"], kill=True)
    ctl.done()


# ---------------------------------------------------------------- 5: status


def _row(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": "work",
        "state": "running",
        "id": 4,
        "hypervisor": "qemu",
        "memory": 2048,
        "cpus": 2,
        "pid": 4242,
        "uptime_s": 125.0,
        "netvm": "netvm",
        "color": "green",
        "config_changed": False,
        "config_changes": [],
        "config_values": {},
        "last_exit": None,
    }
    row.update(kw)
    return row


def test_status_table_has_netvm_colour_and_config_changes(cfg: Path, app: StrictApp) -> None:
    changed = _row(
        config_changed=True,
        config_changes=["color", "memory"],
        config_values={"memory": 4096, "color": "green"},
        color="red",
        last_exit={"reason": "auto-shutdown: idle for 600 s", "cause": "auto-shutdown"},
    )
    app.expect("status", "work", returns=changed)
    status, out, _ = vmsilo(cfg, app, "status", "work")
    assert status == 0
    header = next(ln for ln in out.splitlines() if "hypervisor" in ln)
    for col in ("VM", "state", "memory", "cpus", "uptime", "netvm", "colour", "last exit"):
        assert col in header
    assert "2048 MiB (config: 4096 MiB)" in out
    assert "running *" in out and "2 min" in out and "netvm" in out and "red" in out
    assert "auto-shutdown: idle for 600 s" in out
    assert "* work: config changed since it started (color, memory)" in out


@pytest.mark.parametrize(
    ("last", "shown"),
    [
        ({"reason": "stopped on request (power button)", "cause": "stop", "code": 0}, "power"),
        ({"reason": "killed on request (stop --kill)", "cause": "kill", "code": -9}, "--kill"),
        ({"reason": "crosvm: guest panic", "cause": "crash", "code": 34}, "panic (exit 34)"),
    ],
)
def test_status_shows_why_it_last_stopped(
    cfg: Path, app: StrictApp, last: dict[str, Any], shown: str
) -> None:
    last["at"] = time.time() - 3600
    row = _row(state="stopped", pid=None, uptime_s=None, last_exit=last)
    app.expect("status", "work", returns=row)
    out = vmsilo(cfg, app, "status", "work")[1]
    assert shown in out and "1 h ago" in out


def test_status_of_a_running_vm_shows_the_running_plan(tmp_path: Path, cfg: Path) -> None:
    """The real status read: the snapshot's values, the config's beside them."""
    from vmsilo.cli.common import load
    from vmsilo.lifecycle.status import vm_status
    from vmsilo.supervisor.snapshot import write_snapshot
    from vmsilo.supervisor.state import VmLock, VmState, write_state

    old = load(str(cfg), USERS).plan.vms["work"]
    cfg.write_text(cfg.read_text().replace("memory = 4096", "memory = 2048"))
    new = load(str(cfg), USERS).plan.vms["work"]
    Path(new.paths.lock).parent.mkdir(parents=True)
    write_snapshot(new.paths.plan_snapshot, str(cfg), "", old)
    write_state(new.paths.state_file, VmState("running", supervisor_pid=1, vmm_pid=2))
    lock = VmLock(new.paths.lock)
    lock.acquire("work")
    try:
        st = vm_status(new, running=True)
    finally:
        lock.release()
    assert st["memory"] == 4096 and st["config_values"] == {"memory": 2048}
    assert st["config_changed"] and "memory" in st["config_changes"]
    assert st["netvm"] == "netvm" and st["color"] == "green"


# ---------------------------------------------------------------- 10: small cuts


def test_image_list_is_a_table_json_stays_raw(
    cfg: Path, app: StrictApp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from vmsilo.image import store

    v1, v2 = tmp_path / "images/default/v1", tmp_path / "images/default/v2"
    images = [
        ImageInfo("default", "v1", v1, 3 << 30, 1_700_000_000.0, False),
        ImageInfo("default", "v2", v2, 700 << 20, time.time() - 7200, True),
    ]
    monkeypatch.setattr(store, "list_images", lambda _state: images)
    app.expect("images_in_use", "*", returns=({v1}, []))
    status, out, _ = vmsilo(cfg, app, "image", "list")
    assert status == 0
    assert "image" in out and "version" in out and "size" in out and "built" in out
    assert "3.0 GiB" in out and "700.0 MiB" in out and "2023-11-1" in out
    assert "2 h ago" in out and "current" in out and "in use" in out
    assert "True" not in out and "1700000000" not in out and str(3 << 30) not in out
    status, out, _ = vmsilo(cfg, app, "image", "list", "--json")
    assert status == 0 and '"size": 3221225472' in out and '"is_current": true' in out


def test_check_says_1_vm_and_warns_about_missing_share_dirs(
    cfg: Path, app: StrictApp, tmp_path: Path
) -> None:
    status, out, err = vmsilo(cfg, app, "check")
    assert (status, out) == (0, "ok: 2 VMs\n")
    assert err == (
        f"warning: vms.work.sharedDirectories.docs.path: {tmp_path}/no-such-dir does not exist"
        " yet: VM work cannot start until it does\n"
    )
    (tmp_path / "no-such-dir").mkdir()
    assert vmsilo(cfg, app, "check") == (0, "ok: 2 VMs\n", "")
    one = tmp_path / "one.toml"
    one.write_text('user = "alice"\n[vms.solo]\n')
    assert vmsilo(one, app, "check") == (0, "ok: 1 VM\n", "")


def test_image_build_log_lines_carry_no_source_location() -> None:
    from vmsilo.cli.verbs import _progress

    stream = io.StringIO()
    _progress(stream).log("fetching packages")
    assert "fetching packages" in stream.getvalue()
    assert ".py:" not in stream.getvalue()
