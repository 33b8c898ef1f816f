"""The lifecycle app's interface, and the reads both implementations share.

Starting and stopping differ between the embedded supervisor and systemd; what a VM's state
is, which plan it runs and which images it holds are read the same way in both (the lock, the
state file and the plan snapshot the supervisor writes), so they live here once.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmsilo.host.sockets import socket_live
from vmsilo.plan.model import Plan, VmPlan

if TYPE_CHECKING:
    from vmsilo.config.users import UserLookup
    from vmsilo.lifecycle.progress import StartProgress
    from vmsilo.lifecycle.spawn import StartWatch


class App(abc.ABC):
    """How this host starts, stops and inspects the VMs of one config file."""

    def __init__(self, config_path: str | Path) -> None:
        self.config_path = Path(config_path)

    # ------------------------------------------------------------------ what differs

    @abc.abstractmethod
    def start(
        self,
        plan: Plan,
        vm: VmPlan,
        *,
        wait: bool = True,
        progress: StartProgress | None = None,
    ) -> None:
        """Start ``vm``; with ``wait``, return once the guest is ready. ``progress`` hears
        what a start this call makes is doing, and ``done`` when it is over."""

    @abc.abstractmethod
    def start_for_client(
        self, plan: Plan, vm: VmPlan, *, progress: StartProgress | None = None
    ) -> StartWatch | None:
        """Start ``vm`` for a client about to connect to its command socket (``vm-run``).

        Returns a :class:`~vmsilo.lifecycle.spawn.StartWatch` when this call spawned the
        supervisor (its last words explain a start that fails after the socket is bound).
        ``progress`` hears the start's steps until the guest is ready (the client ends it
        sooner when the program's output begins)."""

    @abc.abstractmethod
    def stop(
        self, plan: Plan, vm: VmPlan, *, with_clients: bool = False, kill: bool = False
    ) -> bool:
        """Stop ``vm``; False if it was not running.

        Gracefully (the power button, then kill after ``stopTimeout``), or with ``kill`` at
        once (the VMM is killed, no power button; the supervisor still cleans up). A netvm
        whose clients run is refused unless ``with_clients``: then they are stopped first, the
        same way."""

    # ------------------------------------------------------------------ what is shared

    def is_running(self, vm: VmPlan) -> bool:
        """A supervisor holds the VM's lock."""
        from vmsilo.supervisor.state import is_locked

        return is_locked(vm.paths.lock)

    def command_socket_live(self, vm: VmPlan) -> bool:
        """Something accepts connections on the VM's command socket."""
        return socket_live(vm.paths.command_socket)

    def running_clients(self, plan: Plan, vm: VmPlan) -> list[str]:
        """The running VMs whose netvm ``vm`` is."""
        return [c for c in vm.netvm_clients if c in plan.vms and self.is_running(plan.vms[c])]

    def status(self, plan: Plan, vm: VmPlan) -> dict[str, Any]:
        """SPEC §6's status fields for one VM."""
        from vmsilo.backends.registry import backend_for
        from vmsilo.lifecycle.status import vm_status

        sound = backend_for(vm).sound_facts(plan, vm) if vm.sound.playback else None
        return vm_status(vm, running=self.is_running(vm), sound=sound)

    def running_plan(
        self, plan: Plan, vm: VmPlan, users: UserLookup | None = None
    ) -> tuple[Plan, VmPlan]:
        """The plan a running VM was started with (its snapshot), else ``plan``'s."""
        from vmsilo.lifecycle.status import snapshot_plan

        if self.is_running(vm):
            found = snapshot_plan(vm, users)
            if found is not None:
                return found
        return plan, vm

    def images_in_use(self, plan: Plan) -> tuple[set[Path], list[str]]:
        """(image version directories running VMs use, notes where that had to be guessed)."""
        from vmsilo.lifecycle.images import images_in_use

        return images_in_use(plan.state_dir, plan.runtime_dir)
