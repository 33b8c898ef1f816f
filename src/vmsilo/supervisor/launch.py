"""Running a VM's supervisor: in this process (systemd, vm-start-debug) or forked off.

Embedded starts (``vm-run`` autostart, ``vmsilo start``) fork the supervisor from the process
that already parsed the config and built the plan, instead of exec'ing a fresh interpreter:
the VMM starts a few hundred milliseconds sooner, which is most of vmsilo's share of a cold
``vm-run``. The fork happens before any thread or event loop exists, detaches twice (no zombie,
own session) and closes every inherited descriptor but the milestone pipe, so the caller's
pipes reach EOF when the caller exits.
"""

from __future__ import annotations

import io
import os
import sys
import traceback

from vmsilo.plan.model import Plan, VmPlan


def supervise(
    config_path: str,
    config_text: str,
    plan: Plan,
    vm: VmPlan,
    *,
    listen_fd: int | None = None,
    spawner_fd: int | None = None,
    console: bool = False,
    embedded: bool = True,
) -> int:
    """Run ``vm``'s supervisor to the end; its exit status.

    The launch up to the VMM runs first, synchronously; asyncio and the rest of the supervisor
    are imported only then, while the guest boots (see :mod:`vmsilo.supervisor.prelaunch`).
    """
    from vmsilo.supervisor.cleanup import cleanup_vm
    from vmsilo.supervisor.prelaunch import Prelaunch, ServiceOptions
    from vmsilo.supervisor.state import is_locked

    def start_netvm(name: str) -> None:
        from vmsilo.supervisor.control import start_vm

        start_vm(config_path, plan, plan.vms[name], True)

    if not is_locked(vm.paths.lock):
        cleanup_vm(plan, vm, remove_command_socket=listen_fd is None)  # leftovers of a crash
    options = ServiceOptions(
        config_path=config_path,
        config_text=config_text,
        listen_fd=listen_fd,
        spawner_fd=spawner_fd,
        console_on_tty=console,
        start_netvm=start_netvm if embedded else None,
    )
    launch = Prelaunch(plan, vm, options)
    launch.run()

    import asyncio

    from vmsilo.supervisor.service import Supervisor

    return asyncio.run(Supervisor(launch).run())


def fork_supervisor(
    config_path: str, config_text: str, plan: Plan, vm: VmPlan, write_fd: int, log_path: str
) -> None:
    """Start the supervisor in a detached grandchild; returns in the caller at once."""
    pid = os.fork()
    if pid != 0:
        os.waitpid(pid, 0)  # the middle child exits right away
        return
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        top = max(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
        os.closerange(3, write_fd)  # keep 0-2 and the milestone pipe, nothing else
        os.closerange(write_fd + 1, top)
        # The same stream objects, now on the log, a line at a time. (Replacing them would let
        # the garbage collector close fd 1 and 2 behind the new ones' backs when a supervisor
        # forks another one, e.g. for its netvm.)
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)
        status = supervise(config_path, config_text, plan, vm, spawner_fd=write_fd)
        os._exit(status)
    except BaseException:
        try:
            traceback.print_exc()
        finally:
            os._exit(70)
