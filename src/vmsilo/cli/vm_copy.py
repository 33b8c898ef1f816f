"""``vm-copy [--no-autostart] SRC DST PATH…`` — copy files from one VM to another (SPEC §9.4).

Two vm-run sessions, reached (and started on demand) the way vm-run reaches a VM
(:func:`vmsilo.cli.reach.reach_vm`): in SRC the VM user runs the packer
(:mod:`vmsilo.guest.copy_pack`), in DST the VM user runs the unpacker
(:mod:`vmsilo.guest.copy_unpack`), which treats the stream as hostile and creates the items
under ``~/Incoming/<SRC>/``. The host only relays the bytes: SRC's output goes through a pipe,
``splice(2)`` (counting them for the progress bar) and a second pipe into DST's input. Each
session keeps the channel's flow control, so a slow DST slows SRC down and the host holds no
more than the pipes and one credit window of data.

Exit: 0 when everything arrived; 1 when a side refused (a name that exists, a bad path, a
limit: the guest's own message says which); 255 for vm-copy's own failures (usage, unknown VM,
a VM that does not run with ``--no-autostart`` or failed to start, a lost channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from vmsilo.cli.helptext import ToolHelp
from vmsilo.cli.vm_common import ToolParser
from vmsilo.errors import VmsiloError

if TYPE_CHECKING:
    from vmsilo.cli.copy_progress import Progress
    from vmsilo.cli.reach import Reached
    from vmsilo.config.users import UserLookup
    from vmsilo.lifecycle.base import App

EXIT_REFUSED = 1
EXIT_FAILURE = 255
PROG = "vm-copy"
USAGE = "usage: vm-copy [--no-autostart] [-c FILE] SRC DST PATH..."
INFO = ToolHelp(
    usage=USAGE,
    summary=(
        "Copy files and directories from the VM SRC to the VM DST: each PATH (relative to"
        " the home of SRC's user, or absolute) arrives in DST as ~/Incoming/<SRC>/<its name>."
        " Both VMs are started if they are not running. Only regular files, directories and"
        " symlinks that stay inside the copy are accepted; setuid/setgid bits are dropped;"
        " nothing that exists in DST is overwritten. The limits are copy.maxBytes and"
        " copy.maxFiles of the config. On a terminal a progress bar shows the bytes sent."
    ),
    exit_statuses=[
        ("0", "everything arrived"),
        (
            "1",
            "refused: a name exists in DST (named), a bad path, a file type that is not"
            " copied, or a limit",
        ),
        (
            "255",
            "vm-copy's own failure: usage, unknown VM, a VM that is not running"
            " (--no-autostart) or failed to start, the connection to a VM lost",
        ),
    ],
    examples=[
        ("vm-copy work banking Documents/invoice.pdf", "banking gets ~/Incoming/work/invoice.pdf"),
        (
            "vm-copy --no-autostart untrusted work /tmp/photos",
            "the directory photos, only if both VMs already run",
        ),
    ],
)


def build_parser() -> ToolParser:
    p = ToolParser(PROG, USAGE, INFO)
    p.add_argument(
        "--no-autostart",
        dest="autostart",
        action="store_false",
        help="fail instead of starting a VM that is not running",
    )
    p.add_argument("src", metavar="SRC", help="the VM the files come from")
    p.add_argument("dst", metavar="DST", help="the VM they go to")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files or directories in SRC")
    return p


def main(
    argv: list[str] | None = None,
    app: App | None = None,
    *,
    users: UserLookup | None = None,
    stderr: TextIO | None = None,
) -> int:
    err = stderr or sys.stderr
    try:
        args = build_parser().parse(argv, err)
        if args is None:
            return EXIT_FAILURE
        return _copy(args.config, args.src, args.dst, args.paths, args.autostart, users, err, app)
    except VmsiloError as e:
        print(f"{PROG}: {e}", file=err)
        return EXIT_FAILURE
    except OSError as e:
        from vmsilo.cli.common import os_error

        print(f"{PROG}: {os_error(e)}", file=err)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


@dataclass
class Limits:
    max_bytes: int
    max_files: int


def _copy(
    config: str | None,
    src: str,
    dst: str,
    paths: list[str],
    autostart: bool,
    users: UserLookup | None,
    err: TextIO,
    app: App | None,
) -> int:
    from vmsilo.cli.common import load, select_vm
    from vmsilo.cli.reach import reach_vm

    loaded = load(config, users)  # the limits; an unknown VM is reported before any start
    for name in (src, dst):
        select_vm(loaded.plan, name)
    copy = loaded.config.copy_limits
    limits = Limits(copy.max_bytes, copy.max_files)
    reached_src = reach_vm(config, src, autostart=autostart, users=users, err=err, app=app)
    try:
        reached_dst = reach_vm(
            config,
            dst,
            autostart=autostart,
            users=users,
            err=err,
            app=app,
            show_status=reached_src.status is None,
        )
    except BaseException:
        _done(reached_src)
        raise
    try:
        return Relay(src, dst, paths, limits, reached_src, reached_dst, err).run()
    finally:
        _done(reached_src)
        _done(reached_dst)
        for reached in (reached_src, reached_dst):
            if reached.watch is not None:
                reached.watch.close()


def _done(reached: Reached) -> None:
    if reached.status is not None:
        reached.status.done()


#: ``-I``: the guest's own modules only, never a ``vmsilo`` directory in the user's home
#: (``-m`` would put the working directory first on the path).
PYTHON = ("python3", "-I", "-m")


def pack_argv(paths: list[str], limits: Limits) -> list[str]:
    return [
        *PYTHON,
        "vmsilo.guest.copy_pack",
        f"--max-bytes={limits.max_bytes}",
        f"--max-files={limits.max_files}",
        "--",
        *paths,
    ]


def unpack_argv(src: str, limits: Limits) -> list[str]:
    return [
        *PYTHON,
        "vmsilo.guest.copy_unpack",
        f"--src={src}",
        f"--max-bytes={limits.max_bytes}",
        f"--max-files={limits.max_files}",
    ]


class Relay:
    """The two sessions and the pipes between them (see the module text)."""

    def __init__(
        self,
        src: str,
        dst: str,
        paths: list[str],
        limits: Limits,
        reached_src: Reached,
        reached_dst: Reached,
        err: TextIO,
    ) -> None:
        self.src, self.dst = src, dst
        self.paths = paths
        self.limits = limits
        self.reached = {src: reached_src, dst: reached_dst}
        self.reached_src, self.reached_dst = reached_src, reached_dst
        self.err = err
        self.sent = 0
        self.progress: Progress | None = None

    def run(self) -> int:
        try:
            return asyncio.run(self._run())
        except _SideFailed as e:
            from vmsilo.cli.vm_run import channel_failure

            watch = self.reached[e.vm].watch
            raise channel_failure(
                e.vm, e.error, watch.failure() if watch is not None else None
            ) from None
        finally:
            if self.progress is not None:
                self.progress.stop()

    async def _run(self) -> int:
        from vmsilo.channel.client import run_session
        from vmsilo.channel.escapes import EscapeFilter
        from vmsilo.channel.protocol import ExecRequest

        out_r, out_w = os.pipe()  # SRC's output → the splicer
        in_r, in_w = os.pipe()  # the splicer → DST's input
        err_r, err_w = os.pipe()  # SRC's standard error → the line reader
        on_tty = os.isatty(2)
        new_filter = EscapeFilter if on_tty else None
        if on_tty:
            from vmsilo.cli.copy_progress import Progress

            self.progress = Progress(self.err)
        splicer = threading.Thread(
            target=_splice, args=(out_r, in_w, self._count), name="vm-copy-splice", daemon=True
        )
        splicer.start()
        lines = threading.Thread(
            target=self._src_errors, args=(err_r,), name="vm-copy-stderr", daemon=True
        )
        lines.start()

        def request(argv: list[str]) -> ExecRequest:
            return ExecRequest(argv=[os.fsencode(a) for a in argv])

        src_task = asyncio.create_task(
            _side(
                self.src,
                run_session(
                    self.reached_src.socket_path,
                    request(pack_argv(self.paths, self.limits)),
                    stdin=None,
                    stdout=out_w,
                    stderr=err_w,
                    forward_signals=False,
                    prog=PROG,
                    on_output=lambda: _done(self.reached_src),
                ),
            )
        )
        dst_task = asyncio.create_task(
            _side(
                self.dst,
                run_session(
                    self.reached_dst.socket_path,
                    request(unpack_argv(self.src, self.limits)),
                    stdin=in_r,
                    stdout=None,
                    stderr=2,
                    forward_signals=False,
                    new_output_filter=new_filter,
                    prog=PROG,
                    on_output=lambda: _done(self.reached_dst),
                ),
            )
        )
        src_status: int | None = None
        closed_src = closed_dst = False
        try:
            pending: set[asyncio.Task[int]] = {src_task, dst_task}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if src_task in done and not closed_src:
                    closed_src = True
                    os.close(out_w)  # DST sees the end of the stream
                    os.close(err_w)
                    if src_task.exception() is not None:
                        dst_task.cancel()
                        with contextlib.suppress(BaseException):
                            await dst_task
                        src_task.result()  # raises: SRC's channel failed
                    src_status = src_task.result()
                if dst_task in done and not closed_dst:
                    closed_dst = True
                    os.close(in_r)  # a splice still waiting for DST fails, SRC's output breaks
                    if src_task in pending:
                        src_task.cancel()
                        with contextlib.suppress(BaseException):
                            await src_task
                        pending.discard(src_task)
                    dst_status = dst_task.result()  # raises: DST's channel failed
                    return self._outcome(src_status, dst_status)
            raise AssertionError("unreachable: DST ended the loop")  # pragma: no cover
        finally:
            for task in (src_task, dst_task):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            if not closed_src:
                os.close(out_w)
                os.close(err_w)
            if not closed_dst:
                os.close(in_r)
            lines.join(timeout=5)

    def _outcome(self, src_status: int | None, dst_status: int) -> int:
        if self.progress is not None:
            self.progress.stop()
        if dst_status == 0 and src_status == 0:
            return 0
        for vm, status in ((self.dst, dst_status), (self.src, src_status)):
            if status not in (None, 0, EXIT_REFUSED):
                print(
                    f"{PROG}: the copy program in {vm} failed (exit status {status})",
                    file=self.err,
                )
                return EXIT_FAILURE
        return EXIT_REFUSED

    def _count(self, n: int) -> None:
        self.sent += n
        if self.progress is not None:
            self.progress.advance(n)

    def _src_errors(self, fd: int) -> None:
        """SRC's standard error: the totals line for the progress bar, then its messages
        (made printable: they come from a VM)."""
        from vmsilo.channel.escapes import printable
        from vmsilo.guest.copy_rules import TOTAL_PREFIX

        with open(fd, "rb", closefd=True) as f:
            first = True
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if first and line.startswith(TOTAL_PREFIX):
                    first = False
                    if self.progress is not None:
                        with contextlib.suppress(ValueError, IndexError):
                            self.progress.total(int(line[len(TOTAL_PREFIX) :].split()[0]))
                    continue
                first = False
                text = f"{PROG}: {self.src}: {printable(line)}"
                if self.progress is not None:
                    self.progress.message(text)
                else:
                    print(text, file=self.err, flush=True)


class _SideFailed(Exception):
    def __init__(self, vm: str, error: Any) -> None:
        super().__init__(vm)
        self.vm = vm
        self.error = error


async def _side(vm: str, coro: Any) -> int:
    """A session whose channel failure names its VM."""
    from vmsilo.channel.protocol import ChannelError

    try:
        status: int = await coro
    except ChannelError as e:
        raise _SideFailed(vm, e) from None
    return status


def _splice(src: int, dst: int, count: Callable[[int], None]) -> None:
    """Move bytes from pipe ``src`` to pipe ``dst`` in the kernel, reporting each move; closes
    both at the end (EOF, or DST's side gone)."""
    try:
        while True:
            n = os.splice(src, dst, 1 << 20)
            if n == 0:
                return
            count(n)
    except OSError:
        return
    finally:
        os.close(src)
        os.close(dst)


if __name__ == "__main__":
    sys.exit(main())
