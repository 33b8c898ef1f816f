"""Starting and stopping VMs through systemd when the units are installed (SPEC §5).

``vm-start``/``vm-stop`` and ``vmsilo start/stop`` must not run a second, embedded supervisor
beside the one systemd would start from the command socket: when systemd is PID 1 and
``vmsilo install`` put this config's units in place, they go through ``systemctl start/stop
vmsilo-<vm>-vm.service`` (polkit lets the configured user do that).

``systemctl start`` of a ``Type=notify`` unit returns when the supervisor sends ``READY=1``,
i.e. when the guest is ready — the same promise as the embedded start. The netvm-in-use check
is ours, not systemd's: a plain ``systemctl stop`` of a netvm would stop its clients silently
(they ``Requires=`` it), so without ``--with-clients`` the stop is refused first.

``--kill`` sends the supervisor :data:`~vmsilo.supervisor.state.KILL_SIGNAL` through
``systemctl kill --kill-whom=main`` (it kills the VMM at once, no power button), then ``systemctl
stop`` waits for the unit to end as usual (its ``ExecStopPost`` cleans up).

A VM added to the config since the last ``vmsilo install`` has no units yet; it runs with the
embedded supervisor, as it would on a host without systemd.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from vmsilo.errors import VmsiloError, VMStartError
from vmsilo.lifecycle.base import App
from vmsilo.lifecycle.embedded import EmbeddedApp, netvm_in_use
from vmsilo.lifecycle.progress import StartProgress
from vmsilo.lifecycle.spawn import StartWatch
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.runcmd import run
from vmsilo.supervisor.state import KILL_SIGNAL

#: systemctl itself waits for the job; this only bounds a wedged systemd.
SYSTEMCTL_MARGIN_S = 60


class SystemdApp(App):
    """systemd runs the supervisors of the VMs whose units are installed (``units``)."""

    def __init__(self, config_path: str | Path, units: Collection[str]) -> None:
        super().__init__(config_path)
        self.units = frozenset(units)
        self.embedded = EmbeddedApp(config_path)

    def manages(self, vm: VmPlan) -> bool:
        return vm.service_unit in self.units

    def start(
        self,
        plan: Plan,
        vm: VmPlan,
        *,
        wait: bool = True,
        progress: StartProgress | None = None,
    ) -> None:
        """``systemctl start`` the VM's service; returns once the guest is ready (READY=1), or
        at once with ``wait=False`` (the job is queued; systemd reports failures in the
        journal). ``progress`` hears one step: systemd's job (its own steps are in the
        unit's status)."""
        if not self.manages(vm):
            self.embedded.start(plan, vm, wait=wait, progress=progress)
            return
        if progress is not None and wait and not self.is_running(vm):
            progress.step(f"systemctl start {vm.service_unit}")
        try:
            proc = run(
                ["systemctl", "start", *([] if wait else ["--no-block"]), vm.service_unit],
                check=False,
                timeout=vm.start_timeout + SYSTEMCTL_MARGIN_S,
                hint=f"see `journalctl -u {vm.service_unit}`",
            )
        finally:
            if progress is not None:
                progress.done()
        if proc.returncode != 0:
            detail = (proc.stderr or b"").decode(errors="replace").strip()
            raise VMStartError(
                f"VM {vm.name} failed to start: {detail or f'systemctl exit {proc.returncode}'}",
                f"see `journalctl -u {vm.service_unit}` and {vm.paths.console_log}",
            )

    def start_for_client(
        self, plan: Plan, vm: VmPlan, *, progress: StartProgress | None = None
    ) -> StartWatch | None:
        """Returns once the guest is ready: the socket unit may be stopped as well, so there
        may be nothing to connect to before that (polkit lets the configured user)."""
        if not self.manages(vm):
            return self.embedded.start_for_client(plan, vm, progress=progress)
        self.start(plan, vm, wait=True, progress=progress)
        return None

    def stop(
        self, plan: Plan, vm: VmPlan, *, with_clients: bool = False, kill: bool = False
    ) -> bool:
        """``systemctl stop`` the VM (clients first with ``with_clients``); False if it was
        not running. A netvm whose clients run is refused without ``with_clients``, as
        embedded; ``kill`` kills each VMM at once before its unit is stopped."""
        if not self.manages(vm):
            return self.embedded.stop(plan, vm, with_clients=with_clients, kill=kill)
        clients = self.running_clients(plan, vm)
        if clients and not with_clients:
            raise netvm_in_use(vm, clients)
        was_running = self.is_running(vm)
        stopping = [plan.vms[c] for c in clients] + [vm]
        for each in stopping:  # one at a time: the clients' power buttons before the netvm's
            unit = each.service_unit
            if kill and self.is_running(each):
                self._systemctl(["kill", "--kill-whom=main", f"--signal={KILL_SIGNAL.name}", unit])
            timeout = max(v.stop_timeout for v in plan.vms.values()) + 2 * SYSTEMCTL_MARGIN_S
            self._systemctl(["stop", unit], timeout=timeout)
        return was_running

    def _systemctl(self, args: list[str], timeout: int = SYSTEMCTL_MARGIN_S) -> None:
        unit = args[-1]
        proc = run(["systemctl", *args], check=False, timeout=timeout)
        if proc.returncode != 0:
            detail = (proc.stderr or b"").decode(errors="replace").strip()
            raise VmsiloError(
                f"systemctl {args[0]} {unit} failed: {detail or f'exit {proc.returncode}'}",
                f"see `journalctl -u {unit}`",
            )
