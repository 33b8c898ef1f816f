"""The way from a ``vm-*`` command to a VM's command socket (SPEC §6): find the VM running, or
start it — vm-run's and vm-copy's :func:`reach_vm`.

A running VM is found by connecting to its socket after a quick look at the config (no typed
model, see :mod:`vmsilo.cli.quick_look`); a cold start uses the cached plan of this exact
config text when there is one, else the validated config. Imports are late, as in
:mod:`vmsilo.cli.vm_run`: the warm path must not pay for the start path.
"""

from __future__ import annotations

import os

from vmsilo.errors import VmsiloError

#: ``typing.TYPE_CHECKING`` without importing :mod:`typing` (see :mod:`vmsilo.cli.vm_run`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import TextIO

    from vmsilo.cli.start_status import StartStatus
    from vmsilo.config.users import UserLookup
    from vmsilo.lifecycle.base import App
    from vmsilo.lifecycle.spawn import StartWatch


class Reached:
    """A VM's command socket, what watches its start when this call started it, and — on the
    warm path, when asked for — the connection made to find it running."""

    __slots__ = ("sock", "socket_path", "status", "watch")

    def __init__(
        self,
        socket_path: str,
        watch: StartWatch | None = None,
        status: StartStatus | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.watch = watch
        self.status = status
        self.sock = sock


def reach_vm(
    config: str | None,
    name: str,
    *,
    autostart: bool,
    users: UserLookup | None,
    err: TextIO,
    app: App | None,
    show_status: bool = True,
    keep_connection: bool = False,
) -> Reached:
    """The command socket of VM ``name``, starting the VM first unless it runs (or raise with
    ``autostart`` off). vm-run's way to a VM, shared with vm-copy; the caller ends
    ``status`` (a status line on a terminal, unless ``show_status`` is off) when it is done.

    A running VM is found by connecting to its socket; with ``keep_connection`` that
    connection is handed back in ``sock`` (the caller owns it) instead of being closed, so
    vm-run's session needs no second connect."""
    from vmsilo.channel.blocking_client import connect
    from vmsilo.channel.protocol import ChannelError
    from vmsilo.cli.quick_look import quick_look
    from vmsilo.defaults import command_socket

    look = quick_look(config, name) if users is None else None
    if look is not None:
        candidate = command_socket(look.runtime_dir, name)
        try:
            sock = connect(candidate)
        except ChannelError:
            pass
        else:
            if not keep_connection:
                sock.close()
            return Reached(candidate, sock=sock if keep_connection else None)
        if autostart and os.geteuid() == 0:
            reached = _start_from_cached_plan(config, name, err, app, show_status)
            if reached is not None:
                return reached
    from vmsilo.cli.common import load, select_vm
    from vmsilo.lifecycle.app import open_app

    loaded = load(config, users, cache=True)
    vm = select_vm(loaded.plan, name)
    lifecycle = app or open_app(loaded.path, state_dir=loaded.plan.state_dir)
    if lifecycle.command_socket_live(vm):
        return Reached(vm.paths.command_socket)
    if not autostart:
        raise VmsiloError(f"VM {vm.name} is not running", f"start it: vm-start {vm.name}")
    from vmsilo.cli.start_status import start_status

    status = start_status(vm.name, err) if show_status else None
    reached = Reached(vm.paths.command_socket, status=status)
    reached.watch = _start(
        lambda: lifecycle.start_for_client(loaded.plan, vm, progress=status), status
    )
    return reached


def _start_from_cached_plan(
    config: str | None, name: str, err: TextIO, app: App | None, show_status: bool
) -> Reached | None:
    """A cold start with the cached plan of this exact config text, if there is one (None:
    nothing happened, the caller plans the slow way)."""
    from vmsilo.cli.quick_look import quick_look
    from vmsilo.config.location import config_path
    from vmsilo.plan.cache import load_plan

    look = quick_look(config, name, memo=False)  # the text is the plan cache's key
    if look is None or look.text is None:
        return None
    cached = load_plan(look.runtime_dir, look.text, look.user)
    if cached is None or name not in cached.vms:
        return None
    from vmsilo.cli.start_status import start_status
    from vmsilo.lifecycle.app import open_app

    vm = cached.vms[name]
    lifecycle = app or open_app(str(config_path(config)), state_dir=cached.state_dir)
    status = start_status(name, err) if show_status else None
    reached = Reached(vm.paths.command_socket, status=status)
    reached.watch = _start(lambda: lifecycle.start_for_client(cached, vm, progress=status), status)
    return reached


def _start(
    start: Callable[[], StartWatch | None], status: StartStatus | None = None
) -> StartWatch | None:
    """``start()``; the status line is erased before a failed start's message."""
    try:
        return start()
    except BaseException:
        if status is not None:
            status.done()
        raise
