"""Starting and stopping VMs through systemd when the units are installed (SPEC §5).

``vm-start``/``vm-stop`` and ``vmsilo start/stop`` must not run a second, embedded supervisor
beside the one systemd would start from the command socket: when systemd is PID 1 and
``vmsilo install`` put this VM's units in place for this config, they go through
``systemctl start/stop vmsilo-<vm>-vm.service`` (polkit lets the configured user do that);
otherwise the embedded supervisor (:mod:`vmsilo.supervisor.control`) does the work.

``systemctl start`` of a ``Type=notify`` unit returns when the supervisor sends ``READY=1``,
i.e. when the guest is ready — the same promise as the embedded start. The netvm-in-use check
is ours, not systemd's: a plain ``systemctl stop`` of a netvm would stop its clients silently
(they ``Requires=`` it), so without ``--force`` the stop is refused first.
"""

from __future__ import annotations

from pathlib import Path

from vmsilo.errors import VMInUseError, VmsiloError, VMStartError
from vmsilo.host.systemd import systemd_running
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.runcmd import run
from vmsilo.supervisor.control import is_running, running_clients

#: systemctl itself waits for the job; this only bounds a wedged systemd.
SYSTEMCTL_MARGIN_S = 60


def units_installed(vm: VmPlan, config: str | Path, root: Path = Path("/")) -> bool:
    """True when systemd runs here and manages ``vm`` for this config."""
    if not systemd_running():
        return False
    from vmsilo.host.install import read_manifest  # only where systemd runs: vm-run's path

    try:
        manifest = read_manifest(root)
    except VmsiloError:
        return False
    if vm.service_unit not in manifest.units or manifest.config is None:
        return False
    return Path(manifest.config).resolve() == Path(config).resolve()


def start_vm(vm: VmPlan, wait: bool = True) -> None:
    """``systemctl start`` the VM's service; returns once the guest is ready (READY=1), or
    at once with ``wait=False`` (the job is queued; systemd reports failures in the journal)."""
    proc = run(
        ["systemctl", "start", *([] if wait else ["--no-block"]), vm.service_unit],
        check=False,
        timeout=vm.start_timeout + SYSTEMCTL_MARGIN_S,
        hint=f"see `journalctl -u {vm.service_unit}`",
    )
    if proc.returncode != 0:
        detail = (proc.stderr or b"").decode(errors="replace").strip()
        raise VMStartError(
            f"VM {vm.name} failed to start: {detail or f'systemctl exit {proc.returncode}'}",
            f"see `journalctl -u {vm.service_unit}` and {vm.paths.console_log}",
        )


def stop_vm(plan: Plan, vm: VmPlan, force: bool = False) -> bool:
    """``systemctl stop`` the VM (clients first with ``force``); False if it was not running.

    A netvm whose clients run is refused without ``force``, as in the embedded mode."""
    clients = running_clients(plan, vm)
    if clients and not force:
        raise VMInUseError(
            f"VM {vm.name} is the netvm of running VMs: {', '.join(clients)}",
            f"stop them first, or use --force to stop them and {vm.name}",
        )
    was_running = is_running(vm)
    units = [plan.vms[c].service_unit for c in clients] + [vm.service_unit]
    for unit in units:  # one at a time: the clients' power buttons before the netvm's
        timeout = max(v.stop_timeout for v in plan.vms.values()) + 2 * SYSTEMCTL_MARGIN_S
        proc = run(["systemctl", "stop", unit], check=False, timeout=timeout)
        if proc.returncode != 0:
            detail = (proc.stderr or b"").decode(errors="replace").strip()
            raise VmsiloError(
                f"systemctl stop {unit} failed: {detail or f'exit {proc.returncode}'}",
                f"see `journalctl -u {unit}`",
            )
    return was_running
