"""Forking a VM's supervisor off this process (embedded starts) and watching it come up.

Embedded starts (``vm-run`` autostart, ``vmsilo start``, ``vm-start``) fork the supervisor from
the process that already parsed the config and built the plan, instead of exec'ing a fresh
interpreter: the VMM starts a few hundred milliseconds sooner, which is most of vmsilo's share
of a cold ``vm-run``. The fork happens before any thread or event loop exists, detaches twice
(no zombie, own session) and closes every inherited descriptor but the milestone pipe, so the
caller's pipes reach EOF when the caller exits. The child runs
:func:`vmsilo.supervisor.launch.supervise`, the same code systemd runs.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import IO

from vmsilo.errors import VMStartError
from vmsilo.lifecycle.progress import StartProgress
from vmsilo.plan.model import Plan, VmPlan


class StartWatch:
    """The read end of a freshly spawned supervisor's milestone pipe.

    After ``bound`` the spawner connects like any client; if that connection is refused or
    dropped because the start failed, :meth:`failure` reads the supervisor's last words
    (``failed <message>``) — it blocks only until the supervisor reports or exits.
    """

    def __init__(self, pipe: IO[bytes], vm: VmPlan) -> None:
        self.pipe = pipe
        self.vm = vm
        self._follower: threading.Thread | None = None
        self._failure: str | None = None

    def failure(self) -> str | None:
        if self._follower is not None:
            self._follower.join()
            return self._failure
        return self._read(None)

    def follow(self, progress: StartProgress) -> None:
        """Report the supervisor's steps to ``progress`` from a thread of its own, until the
        guest is ready or the start failed (:meth:`failure` then waits for that thread)."""
        self._follower = threading.Thread(
            target=self._follow, args=(progress,), name="start-steps", daemon=True
        )
        self._follower.start()

    def _follow(self, progress: StartProgress) -> None:
        try:
            self._failure = self._read(progress)
        except (OSError, ValueError):  # closed under us: the caller is done with the start
            pass
        finally:
            progress.done()

    def _read(self, progress: StartProgress | None) -> str | None:
        with self.pipe:
            for raw in self.pipe:
                line = raw.decode(errors="replace").strip()
                if line == "ready":
                    return None
                if line.startswith("failed "):
                    return line[7:]
                if line.startswith("step ") and progress is not None:
                    progress.step(line[5:])
        return None

    def close(self) -> None:
        """Done with the start (the follower, if any, closes the pipe when the supervisor
        reports its end; closing it under that thread's read would wait for the read)."""
        if self._follower is None:
            self.pipe.close()


def spawn_supervisor(
    config_path: str,
    vm: VmPlan,
    plan: Plan,
    start_netvm: Callable[[str], None],
    progress: StartProgress | None = None,
) -> StartWatch:
    """Fork the supervisor from this process (which already planned the config); return
    once its command socket is bound. ``start_netvm`` runs in the child; ``progress`` hears
    the steps until then, and, following the watch, until the guest is ready."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    path = os.path.abspath(config_path)
    with open(path) as f:
        text = f.read()
    try:
        os.set_inheritable(write_fd, True)
        fork_supervisor(path, text, plan, vm, write_fd, vm.paths.supervisor_log, start_netvm)
    finally:
        os.close(write_fd)
    pipe = os.fdopen(read_fd, "rb")
    for raw in pipe:
        line = raw.decode(errors="replace").strip()
        if line == "bound":
            watch = StartWatch(pipe, vm)
            if progress is not None:
                watch.follow(progress)
            return watch
        if line.startswith("step ") and progress is not None:
            progress.step(line[5:])
        if line.startswith("failed "):
            pipe.close()
            raise VMStartError(f"VM {vm.name} failed to start: {line[7:]}")
    pipe.close()
    raise VMStartError(
        f"VM {vm.name}: the supervisor exited before it was ready",
        f"see {vm.paths.supervisor_log}",
    )


def fork_supervisor(
    config_path: str,
    config_text: str,
    plan: Plan,
    vm: VmPlan,
    write_fd: int,
    log_path: str,
    start_netvm: Callable[[str], None],
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
        from vmsilo.supervisor.launch import supervise

        status = supervise(
            config_path, config_text, plan, vm, spawner_fd=write_fd, start_netvm=start_netvm
        )
        os._exit(status)
    except BaseException:
        try:
            traceback.print_exc()
        finally:
            os._exit(70)
