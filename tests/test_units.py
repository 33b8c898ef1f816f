"""The rendered host files are accepted by systemd's own parsers, with no warning at all.

``systemd-analyze verify`` exits 0 even on unknown keys and bad values (it only warns), so every
check here requires rc == 0 *and* empty stderr. The ExecStart binary must exist for verify, so
the units point at this checkout's real ``vmsilo`` entry point.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fleet import plan_of
from vmsilo.errors import VmsiloError
from vmsilo.host.install import vmsilo_exe
from vmsilo.host.units import (
    SYSTEMD_DIR,
    TMPFILES_PATH,
    render_host_files,
    systemd_exec_arg,
    systemd_exec_line,
    systemd_value,
    tmpfiles_path,
)
from vmsilo.plan.model import Plan

EVERY = Path(__file__).parent / "data" / "configs" / "every-option.toml"

MINIMAL = """
user = "alice"
[vms.work]
"""

FLEET = """
user = "alice"
[vms.netvm]
network.isNetvm = true
network.netvm = "host"
[vms.work]
network.netvm = "netvm"
[vms.banking]
network.netvm = "netvm"
[vms.direct]
network.netvm = "host"
[vms.offline]
hypervisor = "qemu"
"""

# a runtime/state dir and config path full of what needs quoting in one format or another
AWKWARD = """
user = "alice"
runtimeDir = "/run/vm silo %h"
stateDir = "/var/lib/vm silo $HOME"
[vms.work]
"""
AWKWARD_CONFIG = '/etc/vm silo/it\'s a "$HOME" 100% \\ conf.toml'

CONFIGS = {
    "minimal": MINIMAL,
    "every-option": EVERY.read_text(),
    "fleet": FLEET,
    "awkward": AWKWARD,
}

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def render(tmp_path: Path, plan: Plan, config: str = "/etc/vmsilo/vmsilo.toml") -> Path:
    root = tmp_path / "root"
    for rel, text in render_host_files(plan, vmsilo_exe(), config).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@needs_systemd
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_systemd_analyze_verify_is_silent(tmp_path: Path, name: str) -> None:
    plan = plan_of(CONFIGS[name])
    config = AWKWARD_CONFIG if name == "awkward" else "/etc/vmsilo/vmsilo.toml"
    root = render(tmp_path, plan, config)
    units = sorted(str(p) for p in (root / SYSTEMD_DIR).glob("vmsilo*"))
    assert len(units) == 2 * len(plan.vms) + 1
    p = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (p.returncode, p.stderr) == (0, ""), p.stderr


def test_service_and_socket_settings() -> None:
    plan = plan_of(EVERY.read_text())
    files = render_host_files(plan, ["/usr/bin/vmsilo"], "/etc/vmsilo/vmsilo.toml")
    service = files[f"{SYSTEMD_DIR}/vmsilo-work-vm.service"].splitlines()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/usr/bin/vmsilo -c /etc/vmsilo/vmsilo.toml service vm work",
        "ExecStopPost=+/usr/bin/vmsilo -c /etc/vmsilo/vmsilo.toml service cleanup work",
        "KillMode=mixed",
        "TimeoutStartSec=90",
        "TimeoutStopSec=60",  # stopTimeout 45 + the margin
        "Slice=vmsilo.slice",
        "Requires=vmsilo-work-command.socket",
        "After=vmsilo-work-command.socket",
        "Requires=vmsilo-netvm-vm.service",  # its netvm is a VM
        "After=vmsilo-netvm-vm.service",
    ):
        assert line in service, line
    netvm = files[f"{SYSTEMD_DIR}/vmsilo-netvm-vm.service"]
    assert "Requires=vmsilo-netvm-command.socket" in netvm
    assert "-vm.service" not in netvm.split("[Service]")[0].replace("Description", "")  # host
    socket = files[f"{SYSTEMD_DIR}/vmsilo-work-command.socket"].splitlines()
    for line in (
        "ListenStream=/run/vms/work-command.socket",
        "Accept=no",
        "Service=vmsilo-work-vm.service",
        "SocketUser=alice",
        "SocketMode=0600",
        "RemoveOnStop=yes",
        "WantedBy=sockets.target",
    ):
        assert line in socket, line


def test_rendering_is_a_pure_function_of_the_plan() -> None:
    a = render_host_files(plan_of(FLEET), ["/usr/bin/vmsilo"], "/etc/vmsilo/vmsilo.toml")
    b = render_host_files(plan_of(FLEET), ["/usr/bin/vmsilo"], "/etc/vmsilo/vmsilo.toml")
    assert a == b
    assert set(a) == {
        *(
            f"{SYSTEMD_DIR}/vmsilo-{vm}-{kind}"
            for vm in ("netvm", "work", "banking", "direct", "offline")
            for kind in ("vm.service", "command.socket")
        ),
        f"{SYSTEMD_DIR}/vmsilo.slice",
        TMPFILES_PATH,
        "etc/polkit-1/rules.d/50-vmsilo.rules",
        "etc/bash_completion.d/vmsilo",
        # SPEC §9.1: the compositor rules marking each VM's windows
        "etc/sway/config.d/vmsilo.conf",
        "etc/xdg/kwinrulesrc",
        *(
            f"usr/share/color-schemes/vmsilo-{vm}.colors"
            for vm in ("netvm", "work", "banking", "direct", "offline")
        ),
    }


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("/usr/bin/vmsilo", "/usr/bin/vmsilo"),
        ("work", "work"),
        ("two words", '"two words"'),
        ("100%", '"100%%"'),
        ("$HOME", '"$$HOME"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("it's", '"it\'s"'),
        (";", '";"'),
        ("", '""'),
        ("new\nline", '"new\\nline"'),
    ],
)
def test_exec_argument_quoting(arg: str, quoted: str) -> None:
    assert systemd_exec_arg(arg) == quoted


def test_exec_line_and_values() -> None:
    assert systemd_exec_line(["/a b/vmsilo", "-c", "x"]) == '"/a b/vmsilo" -c x'
    assert systemd_value("/run/vm silo %h") == "/run/vm silo %%h"
    with pytest.raises(VmsiloError):
        systemd_value("two\nlines")
    assert tmpfiles_path("/run/vmsilo") == "/run/vmsilo"
    assert tmpfiles_path("/run/vm silo %h") == '"/run/vm silo %%h"'


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="no systemd-tmpfiles")
@pytest.mark.parametrize("name", ["minimal", "awkward"])
def test_tmpfiles_create_makes_runtime_and_state_dirs(tmp_path: Path, name: str) -> None:
    plan = plan_of(CONFIGS[name])
    root = render(tmp_path, plan)
    conf = root / TMPFILES_PATH
    target = tmp_path / "target"
    target.mkdir()
    p = subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={target}", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    for d in (plan.runtime_dir, plan.state_dir):
        made = target / d.lstrip("/")
        assert made.is_dir(), d
        assert made.stat().st_mode & 0o777 == 0o755


def test_completion_script_is_valid_bash(tmp_path: Path) -> None:
    files = render_host_files(plan_of(MINIMAL), ["/opt/my vmsilo/bin/vmsilo"], "/x.toml")
    script = tmp_path / "vmsilo"
    script.write_text(files["etc/bash_completion.d/vmsilo"])
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert (p.returncode, p.stderr) == (0, "")
    assert "'/opt/my vmsilo/bin/vmsilo' \"${cfg[@]}\" _complete" in script.read_text()
