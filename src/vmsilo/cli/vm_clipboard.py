"""``vm-clipboard copy [VM]`` / ``vm-clipboard paste [VM]`` — the clipboard between VMs, only
when the user says so (SPEC §9.4, as Qubes' Ctrl-Shift-C / Ctrl-Shift-V).

``copy`` takes VM's current selection into the host's one vmsilo clipboard,
``/run/user/<uid>/vmsilo/clipboard`` (0600; one type: text, or e.g. an image; at most 16 MiB);
``paste`` makes that VM's selection and empties the buffer. The clipboard only: a VM's primary
selection (middle-click paste) is kept by its filter too, but never leaves the VM. Without VM:
the VM whose window has keyboard focus (each VM's filter sees keyboard enter/leave), so a
compositor key binding needs no name. Both talk to the VM's filter over its control socket
(:mod:`vmsilo.wayland.control`); the selection never passes through the compositor.

Exit: 0 done; 1 nothing to do (nothing selected in VM, the buffer empty, no VM focused);
255 vm-clipboard's own failures (usage, unknown VM, a VM without windows, a filter that does
not answer), as vm-run and vm-copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from typing import TYPE_CHECKING, Any, TextIO

from vmsilo.cli.helptext import ToolHelp
from vmsilo.cli.vm_common import ToolParser
from vmsilo.errors import VmsiloError

if TYPE_CHECKING:
    from vmsilo.config.users import UserLookup
    from vmsilo.plan.model import Plan, VmPlan

EXIT_NOTHING = 1
EXIT_FAILURE = 255
PROG = "vm-clipboard"
USAGE = "usage: vm-clipboard [-c FILE] copy|paste [VM]"
#: The buffer's first line: format version and the data's type.
MAGIC = b"vmsilo-clipboard 1 "
#: The control socket may take this long (a guest program writes the selection meanwhile).
TIMEOUT = 30.0
INFO = ToolHelp(
    usage=USAGE,
    summary=(
        "Move the clipboard between VMs, only when you ask. `copy` takes VM's current"
        " selection into the vmsilo clipboard (/run/user/<uid>/vmsilo/clipboard); `paste` makes"
        " it VM's selection and empties the vmsilo clipboard. Without VM: the VM whose window"
        " has the keyboard focus, so that a key binding (Ctrl-Shift-C / Ctrl-Shift-V) works."
        " The clipboard only: the primary selection (middle-click paste) never leaves its VM."
    ),
    exit_statuses=[
        ("0", "copied, or pasted"),
        ("1", "nothing selected in the VM, the vmsilo clipboard is empty, or no VM has focus"),
        ("255", "usage, unknown VM, a VM that shows no windows now, the filter not answering"),
    ],
    examples=[
        ("vm-clipboard copy work", "work's selection into the vmsilo clipboard"),
        ("vm-clipboard paste banking", "…and into banking's, once"),
    ],
)


class Nothing(Exception):
    """Nothing to copy or paste (exit 1)."""


def build_parser() -> ToolParser:
    p = ToolParser(PROG, USAGE, INFO)
    p.add_argument("action", choices=("copy", "paste"), metavar="copy|paste")
    p.add_argument("vm", nargs="?", metavar="VM", help="the VM (default: the focused one)")
    return p


def buffer_path(plan: Plan) -> str:
    return f"{plan.user.runtime_dir}/vmsilo/clipboard"


def ask(path: str, request: dict[str, Any], data: bytes = b"") -> tuple[dict[str, Any], bytes]:
    """One request to a filter's control socket: its answer and the bytes after it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n" + data)
        reader = s.makefile("rb")
        answer = json.loads(reader.readline(4096) or b"null")
        if not isinstance(answer, dict):
            raise VmsiloError("the VM's Wayland filter gave no answer")
        size = answer.get("size", 0)
        payload = reader.read(size) if isinstance(size, int) and size > 0 else b""
        return answer, payload


def windowed(plan: Plan) -> list[VmPlan]:
    return [vm for vm in plan.vms.values() if vm.gpu is not None and vm.gpu.wayland]


def control_of(vm: VmPlan) -> str:
    assert vm.gpu is not None
    path = vm.gpu.control_socket
    if not os.path.exists(path):
        raise VmsiloError(
            f"VM {vm.name} shows no windows now (no {path})",
            "its Wayland filter starts with its first window; open one in it first",
        )
    return path


def focused_vm(plan: Plan) -> VmPlan:
    for vm in windowed(plan):
        path = vm.gpu.control_socket if vm.gpu is not None else ""
        if not os.path.exists(path):
            continue
        with contextlib.suppress(OSError, ValueError, VmsiloError):
            answer, _ = ask(path, {"op": "focus"})
            if answer.get("focused") is True:
                return vm
    raise Nothing("no VM's window has the keyboard focus: name the VM")


def write_buffer(path: str, mime: str, data: bytes, owner: tuple[int, int] | None) -> None:
    """The buffer, replaced atomically, 0600 from its creation (and the user's when root)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + mime.encode() + b"\n" + data)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_buffer(path: str) -> tuple[str, bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Nothing("the vmsilo clipboard is empty: `vm-clipboard copy VM` first") from None
    with os.fdopen(fd, "rb") as f:
        content = f.read()
    head, _, data = content.partition(b"\n")
    if not head.startswith(MAGIC):
        raise VmsiloError(f"{path} is not a vmsilo clipboard", "remove it")
    return head[len(MAGIC) :].decode("ascii", "replace"), data


def copy(plan: Plan, vm: VmPlan, out: TextIO) -> int:
    answer, data = ask(control_of(vm), {"op": "copy"})
    if not answer.get("ok"):
        raise Nothing(str(answer.get("error", "nothing to copy")))
    mime = str(answer.get("mime", "application/octet-stream"))
    owner = (plan.user.uid, plan.user.gid) if os.geteuid() == 0 else None
    write_buffer(buffer_path(plan), mime, data, owner)
    print(f"{vm.name}: {len(data)} bytes ({mime}) in the vmsilo clipboard", file=out)
    return 0


def paste(plan: Plan, vm: VmPlan, out: TextIO) -> int:
    path = buffer_path(plan)
    mime, data = read_buffer(path)
    answer, _ = ask(control_of(vm), {"op": "paste", "mime": mime, "size": len(data)}, data)
    if not answer.get("ok"):
        raise VmsiloError(f"VM {vm.name}: {answer.get('error', 'the paste failed')}")
    os.unlink(path)  # pasted once, as Qubes does
    print(f"{vm.name}: {len(data)} bytes ({mime}) pasted; the vmsilo clipboard is empty", file=out)
    return 0


def main(
    argv: list[str] | None = None,
    *,
    users: UserLookup | None = None,
    err: TextIO | None = None,
    out: TextIO | None = None,
) -> int:
    stream, output = err or sys.stderr, out or sys.stdout
    args = build_parser().parse(argv, stream, output)
    if args is None:
        return EXIT_FAILURE
    try:
        from vmsilo.cli.vm_common import load_for_tool

        plan = load_for_tool(args.config, users).plan
        if args.vm is None:
            vm = focused_vm(plan)
        else:
            found = plan.vms.get(args.vm)
            if found is None:
                print(f"{PROG}: unknown VM: {args.vm}", file=stream)
                print(f"Available VMs: {', '.join(plan.vms)}", file=stream)
                return EXIT_FAILURE
            vm = found
        if vm.gpu is None or not vm.gpu.wayland:
            raise VmsiloError(f"VM {vm.name} has no windows", "its gpu.wayland is off")
        return (copy if args.action == "copy" else paste)(plan, vm, output)
    except Nothing as e:
        print(f"{PROG}: {e}", file=stream)
        return EXIT_NOTHING
    except VmsiloError as e:
        print(f"{PROG}: {e}", file=stream)
        return EXIT_FAILURE
    except (OSError, ValueError) as e:
        print(f"{PROG}: cannot reach the VM's Wayland filter: {e}", file=stream)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
