"""Driving a VMM process: start it, ask the guest to power off, read why it exited.

This is what every backend shares; each backend subclasses :class:`Vmm` with its own power
button and exit codes (QEMU: QMP ``system_powerdown`` in :mod:`vmsilo.backends.qemu_backend`;
crosvm: control socket ``powerbtn`` and its reset/crash/panic/watchdog codes in
:mod:`vmsilo.backends.crosvm_backend`).

The VMM is started synchronously, before the supervisor's event loop exists (see
:mod:`vmsilo.supervisor.prelaunch`); the loop later waits for it through a pidfd. That is why
asyncio is imported inside the coroutines here and not at the top: starting a VMM must not
pay for loading it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmsilo.plan.model import Plan, VmPlan
from vmsilo.runcmd import describe_status


@dataclass(frozen=True)
class VmmExit:
    code: int  # returncode (negative: signal)
    reason: str
    clean: bool  # guest powered off or stopped on request
    restart: bool = False  # crosvm reset: boot again with a fresh ephemeral disk
    #: why, in one word, for ``vmsilo status`` (the supervisor fills it in: see
    #: :mod:`vmsilo.supervisor.stopping`); empty as a backend classifies the exit code
    cause: str = ""


async def wait_process(proc: subprocess.Popen[bytes]) -> int:
    """Wait on the running loop for a child started with ``subprocess.Popen``; its status.

    The kernel signals the child's exit on a pidfd, which the loop watches like any other
    descriptor: no thread, no polling. Safe to call from several tasks at once.
    """
    import asyncio

    if proc.poll() is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:  # reaped in between by another waiter
        return proc.wait()
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()


class ResumeFailed(Exception):
    """A saving VMM could not resume its guest: the VM is stuck paused (the start fails)."""


@contextlib.contextmanager
def resumed_after(
    resume: Callable[[], object], resume_errors: tuple[type[Exception], ...]
) -> Iterator[None]:
    """Run the block with the guest paused, then ``resume`` it whatever happened: a saved
    state that failed must not leave the VM paused. A failed resume raises
    :class:`ResumeFailed`, naming the block's own failure too."""
    failure: BaseException | None = None
    try:
        yield
    except BaseException as e:
        failure = e
        raise
    finally:
        try:
            resume()
        except resume_errors as e:
            after = f" (after: {failure})" if failure is not None else ""
            raise ResumeFailed(f"{e}{after}") from e


class Vmm:
    """A running VMM child; subclasses know how to ask it to power off."""

    name = "vmm"

    def __init__(self, plan: Plan, vm: VmPlan, argv: list[str]) -> None:
        self.plan = plan
        self.vm = vm
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        #: descriptors the VMM inherits (its argv names them)
        self.pass_fds: tuple[int, ...] = ()

    def env(self) -> dict[str, str] | None:
        """The VMM's environment (None: the supervisor's own)."""
        return None

    def start(self) -> int:
        """Start the VMM in its own session (no shell, stdin on /dev/null); its pid."""
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=self.env(),
            pass_fds=self.pass_fds,
        )
        return self.proc.pid

    async def wait(self) -> VmmExit:
        assert self.proc is not None
        return self.classify(await wait_process(self.proc))

    def classify(self, code: int) -> VmmExit:
        if code == 0:
            return VmmExit(0, "guest powered off", clean=True)
        return VmmExit(code, f"{self.name} {describe_status(code)}", clean=False)

    async def request_poweroff(self) -> None:
        raise NotImplementedError

    def save_state(self, target: Path, while_stopped: Callable[[], None], timeout: float) -> None:
        """Save the running guest's state as ``target`` (a path that does not exist yet, in a
        root-only directory; a file or a directory, as the VMM writes it), run
        ``while_stopped`` while it is paused, then resume it (backends whose ``saves_state``
        is true; blocking). Raises on failure; :class:`ResumeFailed` if the guest stays
        paused."""
        raise NotImplementedError

    def restore_state(self, state: Path, timeout: float) -> None:
        """Have this just started VMM (its argv named ``state``, see
        :attr:`~vmsilo.backends.base.HostFacts.restore_from`) run the saved guest (blocking;
        raises on failure)."""
        raise NotImplementedError

    def plug_shares(self, connections: Sequence[tuple[str, int]], timeout: float) -> None:
        """Hot-plug the shares of a VM saved without them: (tag, socket connected to the
        share's daemon) each (blocking)."""
        raise NotImplementedError

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)  # a no-op once it is reaped
