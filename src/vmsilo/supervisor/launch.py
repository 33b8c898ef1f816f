"""Running a VM's supervisor in this process, to the end: ``vmsilo service vm`` (systemd,
``vm-start-debug``) and the detached child that an embedded start forks
(:mod:`vmsilo.lifecycle.spawn`).

Starting the netvm first is the caller's business (``start_netvm``): the supervisor runs below
the client-side lifecycle, which knows how this host starts VMs; under systemd ``Requires=``
does it and the callback is None.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from typing import TextIO

from vmsilo.plan.model import Plan, VmPlan

#: systemd passes socket-activated descriptors from fd 3 on (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3


def take_listen_fd(environ: MutableMapping[str, str] | None = None) -> int | None:
    """The command socket systemd passed us (``LISTEN_FDS``), if any; clears the variables
    so that nothing this process starts believes they are meant for it."""
    env = os.environ if environ is None else environ
    fd = None
    if env.get("LISTEN_PID") == str(os.getpid()) and int(env.get("LISTEN_FDS", "0") or 0) >= 1:
        fd = SD_LISTEN_FDS_START
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    return fd


def supervise(
    config_path: str,
    config_text: str,
    plan: Plan,
    vm: VmPlan,
    *,
    listen_fd: int | None = None,
    spawner_fd: int | None = None,
    console: bool = False,
    start_netvm: Callable[[str], None] | None = None,
) -> int:
    """Run ``vm``'s supervisor to the end; its exit status.

    The launch up to the VMM runs first, synchronously; asyncio and the rest of the supervisor
    are imported only then, while the guest boots (see :mod:`vmsilo.supervisor.prelaunch`).
    """
    from vmsilo.supervisor.cleanup import cleanup_vm
    from vmsilo.supervisor.prelaunch import Prelaunch, ServiceOptions
    from vmsilo.supervisor.state import is_locked

    if not is_locked(vm.paths.lock):
        cleanup_vm(plan, vm, remove_command_socket=listen_fd is None)  # leftovers of a crash
    options = ServiceOptions(
        config_path=config_path,
        config_text=config_text,
        listen_fd=listen_fd,
        spawner_fd=spawner_fd,
        console_on_tty=console,
        start_netvm=start_netvm,
    )
    launch = Prelaunch(plan, vm, options)
    launch.run()

    import asyncio

    from vmsilo.supervisor.service import Supervisor

    return asyncio.run(Supervisor(launch).run())


def serve(
    config_path: str,
    config_text: str,
    plan: Plan,
    vm: VmPlan,
    *,
    err: TextIO,
    notify_fd: int | None = None,
    console: bool = False,
    start_netvm: Callable[[str], None] | None = None,
) -> int:
    """``vmsilo service vm``: supervise in the foreground on the socket systemd passed (or
    one bound here); on failure, say why on ``err`` (the journal, or vm-start-debug's tty)."""
    from vmsilo.supervisor.state import read_state

    status = supervise(
        config_path,
        config_text,
        plan,
        vm,
        listen_fd=take_listen_fd(),
        spawner_fd=notify_fd,
        console=console,
        start_netvm=start_netvm,
    )
    st = read_state(vm.paths.state_file)
    if status != 0 and st is not None and st.last_exit:
        print(f"vmsilo: VM {vm.name}: {st.last_exit.get('reason')}", file=err)
    return status
