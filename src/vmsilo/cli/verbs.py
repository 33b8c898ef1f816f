"""The ``vmsilo`` verbs that act on VMs and images (start, stop, status, service, image, logs).

Each registers its sub-parser with ``handler(args, out=, err=, users=) -> int``. Runtime verbs
use the plan snapshot of a running VM where one exists (SPEC §6), so they act on what runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

from vmsilo.cli.common import Loaded, load, select_vm
from vmsilo.config.load import parse_config
from vmsilo.config.location import config_path
from vmsilo.config.users import UserLookup, system_users
from vmsilo.errors import UsageError, VmsiloError
from vmsilo.plan.build import build_plan
from vmsilo.plan.model import Plan, VmPlan


def register(sub: Any) -> None:
    from vmsilo.cli import verbs_doctor

    verbs_doctor.register(sub)
    p = sub.add_parser("start", help="start a VM (embedded supervisor) and wait until ready")
    p.add_argument("vm")
    p.add_argument("--no-wait", action="store_true", help="return once the supervisor runs")
    p.set_defaults(handler=cmd_start)

    p = sub.add_parser("stop", help="stop a VM gracefully (power button, then kill)")
    p.add_argument("vm")
    p.add_argument("--force", action="store_true", help="stop a netvm's running clients first")
    p.set_defaults(handler=cmd_stop)

    p = sub.add_parser("status", help="list VMs and their state")
    p.add_argument("vm", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("logs", help="show a VM's console log")
    p.add_argument("vm")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(handler=cmd_logs)

    svc = sub.add_parser("service", help="internal: the per-VM supervisor (systemd runs it)")
    ssub = svc.add_subparsers(dest="service_verb", required=True, metavar="ACTION")
    p = ssub.add_parser("vm", help="run the supervisor of a VM in the foreground")
    p.add_argument("vm")
    p.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--console", action="store_true", help="console on this terminal")
    p.set_defaults(handler=cmd_service_vm)
    p = ssub.add_parser("cleanup", help="clean up after a VM whose supervisor is gone")
    p.add_argument("vm")
    p.set_defaults(handler=cmd_service_cleanup)

    img = sub.add_parser("image", help="build and list guest images")
    isub = img.add_subparsers(dest="image_verb", required=True, metavar="ACTION")
    p = isub.add_parser("build", help="build an image (default: 'default')")
    p.add_argument("name", nargs="?", default="default")
    p.add_argument("--force", action="store_true", help="rebuild even if unchanged")
    p.add_argument("--cache-dir", help="download/root cache (default: $VMSILO_CACHE_DIR)")
    p.set_defaults(handler=cmd_image_build)
    p = isub.add_parser("list", help="list built images")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_image_list)
    __import__("vmsilo.cli.verbs_image_gc", fromlist=["register"]).register(isub)

    from vmsilo.cli import verbs_install

    verbs_install.register(sub)


# ---------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace, users: UserLookup | None) -> Loaded:
    return load(args.config, users)


def running_plan(loaded: Loaded, name: str, users: UserLookup | None) -> tuple[Plan, VmPlan]:
    """The plan a running VM was started with (its snapshot), else the current one."""
    from vmsilo.supervisor.snapshot import plan_from_snapshot, read_snapshot
    from vmsilo.supervisor.state import is_locked

    vm = select_vm(loaded.plan, name)
    if is_locked(vm.paths.lock):
        snap = read_snapshot(vm.paths.plan_snapshot)
        if snap is not None:
            try:
                if users is not None:
                    return plan_from_snapshot(snap, name, users)
                return plan_from_snapshot(snap, name)
            except (VmsiloError, KeyError):
                pass
    return loaded.plan, vm


# ---------------------------------------------------------------------- verbs


def cmd_start(
    args: argparse.Namespace, *, out: TextIO, err: TextIO, users: UserLookup | None
) -> int:
    from vmsilo.supervisor import manage

    loaded = load(args.config, users, cache=True)
    vm = select_vm(loaded.plan, args.vm)
    manage.start(loaded.path, loaded.plan, vm, wait=not args.no_wait)
    print(f"{vm.name}: running" if not args.no_wait else f"{vm.name}: starting", file=out)
    return 0


def cmd_stop(
    args: argparse.Namespace, *, out: TextIO, err: TextIO, users: UserLookup | None
) -> int:
    from vmsilo.supervisor import manage

    loaded = _load(args, users)
    plan, vm = running_plan(loaded, args.vm, users)
    stopped = manage.stop(loaded.path, plan, vm, force=args.force)
    print(f"{vm.name}: stopped" if stopped else f"{vm.name}: not running", file=out)
    return 0


def vm_status(plan: Plan, vm: VmPlan) -> dict[str, Any]:
    """SPEC §6's status fields for one VM."""
    from vmsilo.supervisor.snapshot import changed_since, read_snapshot
    from vmsilo.supervisor.state import is_locked, read_state

    running = is_locked(vm.paths.lock)
    st = read_state(vm.paths.state_file)
    if running and st is not None:
        state = st.state
    elif st is not None and st.state == "failed":
        state = "failed"
    elif st is not None and st.state in ("starting", "running", "stopping"):
        state = "failed"  # the supervisor died without cleaning up
    else:
        state = "stopped"
    uptime = None
    if running and st is not None and st.ready_at is not None:
        uptime = round(time.time() - st.ready_at, 1)
    config_changed = False
    if running:
        snap = read_snapshot(vm.paths.plan_snapshot)
        config_changed = snap is not None and changed_since(snap, vm)
    last_exit = st.last_exit if st is not None else None
    if st is not None and not running and st.state in ("starting", "running", "stopping"):
        last_exit = {"reason": "supervisor exited without cleanup", "at": None}
    return {
        "name": vm.name,
        "state": state,
        "id": vm.id,
        "hypervisor": vm.hypervisor,
        "memory": vm.memory,
        "cpus": vm.cpus,
        "pid": st.vmm_pid if running and st is not None else None,
        "supervisor_pid": st.supervisor_pid if running and st is not None else None,
        "uptime_s": uptime,
        "netvm": vm.netvm,
        "color": vm.color,
        "config_changed": config_changed,
        "last_exit": last_exit,
        "detail": st.detail if running and st is not None else None,
    }


def cmd_status(
    args: argparse.Namespace, *, out: TextIO, err: TextIO, users: UserLookup | None
) -> int:
    loaded = _load(args, users)
    vms = [select_vm(loaded.plan, args.vm)] if args.vm else list(loaded.plan.vms.values())
    rows = [vm_status(loaded.plan, vm) for vm in vms]
    if args.json:
        json.dump({"vms": rows}, out, indent=2)
        out.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vmsilo status")
    for col in ("VM", "state", "id", "hypervisor", "memory", "cpus", "pid", "uptime", "last exit"):
        table.add_column(col)
    for r in rows:
        last = r["last_exit"]["reason"] if r["last_exit"] else ""
        state = r["state"] + (" (config changed)" if r["config_changed"] else "")
        table.add_row(
            r["name"],
            state,
            str(r["id"]),
            r["hypervisor"],
            f"{r['memory']} MiB",
            str(r["cpus"]),
            str(r["pid"] or ""),
            f"{r['uptime_s']:.0f} s" if r["uptime_s"] is not None else "",
            last,
        )
    Console(file=out, highlight=False, width=120).print(table)
    return 0


def cmd_logs(
    args: argparse.Namespace, *, out: TextIO, err: TextIO, users: UserLookup | None
) -> int:
    loaded = _load(args, users)
    vm = select_vm(loaded.plan, args.vm)
    from vmsilo.cli.escapes import LogFilter

    path = Path(vm.paths.console_log)
    if args.follow:
        return _follow(path, out)
    if not path.exists():
        raise VmsiloError(f"no console log for {vm.name} yet", f"start it: vmsilo start {vm.name}")
    data = path.read_bytes()
    out.write(LogFilter()(data).decode(errors="replace"))
    return 0


def _follow(path: Path, out: TextIO) -> int:
    """``tail -F`` (it follows the log across its size-cap rotation), filtered like the rest."""
    import subprocess

    from vmsilo.cli.escapes import LogFilter

    safe = LogFilter()
    out.flush()
    with subprocess.Popen(
        ["tail", "-n", "+1", "-F", str(path)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    ) as tail:
        assert tail.stdout is not None
        try:
            while chunk := os.read(tail.stdout.fileno(), 65536):
                out.write(safe(chunk).decode(errors="replace"))
                out.flush()
        except KeyboardInterrupt:
            tail.terminate()
            return 130
    return tail.returncode


def cmd_service_vm(
    args: argparse.Namespace, *, out: TextIO, err: TextIO, users: UserLookup | None
) -> int:
    from vmsilo.supervisor.launch import supervise
    from vmsilo.supervisor.state import read_state

    path = config_path(args.config).resolve()
    text = path.read_text()
    lookup = users or system_users
    plan = build_plan(parse_config(text, lookup, source=str(path)), lookup)
    vm = select_vm(plan, args.vm)
    listen_fd = None
    if (
        os.environ.get("LISTEN_PID") == str(os.getpid())
        and int(os.environ.get("LISTEN_FDS", "0")) >= 1
    ):
        listen_fd = 3
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    status = supervise(
        str(path),
        text,
        plan,
        vm,
        listen_fd=listen_fd,
        spawner_fd=args.notify_fd,
        console=args.console,
        embedded=not os.environ.get("INVOCATION_ID"),
    )
    st = read_state(vm.paths.state_file)
    if status != 0 and st is not None and st.last_exit:
        print(f"vmsilo: VM {vm.name}: {st.last_exit.get('reason')}", file=err)
    return status


def cmd_service_cleanup(
    args: argparse.Namespace, *, out: TextIO, err: TextIO, users: UserLookup | None
) -> int:
    from vmsilo.supervisor.cleanup import cleanup_vm
    from vmsilo.supervisor.state import is_locked, now, read_state, write_state

    loaded = _load(args, users)
    plan, vm = running_plan(loaded, args.vm, users)
    if is_locked(vm.paths.lock):
        print(f"{vm.name}: supervisor still running; nothing to clean", file=out)
        return 0
    socket_from_systemd = bool(os.environ.get("INVOCATION_ID"))
    problems = cleanup_vm(plan, vm, remove_command_socket=not socket_from_systemd)
    st = read_state(vm.paths.state_file)
    if st is not None and st.state in ("starting", "running", "stopping"):
        st.state = "failed"
        st.last_exit = {"reason": "supervisor exited without cleanup", "at": now()}
        st.supervisor_pid = st.vmm_pid = None
        write_state(vm.paths.state_file, st)
    for problem in problems:
        print(f"cleanup: {problem}", file=err)
    return 0


def _progress(console_file: TextIO) -> Any:
    from rich.console import Console

    return Console(file=console_file, highlight=False)


def cmd_image_build(
    args: argparse.Namespace, *, out: TextIO, err: TextIO, users: UserLookup | None
) -> int:
    from vmsilo.image.build import ImageSpec, build_image

    loaded = _load(args, users)
    img = loaded.plan.images.get(args.name)
    if img is None:
        raise UsageError(
            f"no image named {args.name!r}",
            "images: " + ", ".join(loaded.plan.images),
        )
    cache = args.cache_dir or os.environ.get("VMSILO_CACHE_DIR")
    console = _progress(err)
    started = time.monotonic()
    with console.status(f"building image {img.name}") as status:

        def progress(msg: str) -> None:
            status.update(f"image {img.name}: {msg}")
            console.log(msg)

        built = build_image(
            ImageSpec(img.name, img.suite, img.packages),
            Path(loaded.plan.state_dir),
            cache_dir=Path(cache) if cache else None,
            progress=progress,
            force=args.force,
        )
    verb = "unchanged" if built.reused else "built"
    print(
        f"image {built.name} {verb}: version {built.version} in"
        f" {time.monotonic() - started:.1f} s ({built.path})",
        file=out,
    )
    return 0


def cmd_image_list(
    args: argparse.Namespace, *, out: TextIO, err: TextIO, users: UserLookup | None
) -> int:
    from dataclasses import asdict

    from vmsilo.image.store import list_images

    loaded = _load(args, users)
    images = list_images(Path(loaded.plan.state_dir))
    if args.json:
        json.dump([asdict(i) for i in images], out, indent=2, default=str)
        out.write("\n")
        return 0
    if not images:
        print("no images built yet (vmsilo image build)", file=out)
        return 0
    for i in images:
        print(" ".join(str(v) for v in asdict(i).values()), file=out)
    return 0
