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
from typing import TYPE_CHECKING, Any, TextIO

from vmsilo.cli.common import Loaded, add_stop_options, load, select_vm, stop_with_clients
from vmsilo.config.load import parse_config
from vmsilo.config.location import config_path
from vmsilo.config.users import UserLookup, system_users
from vmsilo.errors import UsageError, VmsiloError
from vmsilo.plan.build import build_plan

if TYPE_CHECKING:
    from vmsilo.lifecycle.base import App


RAW = argparse.RawDescriptionHelpFormatter


def register(sub: Any) -> None:
    from vmsilo.cli import verbs_doctor, verbs_image_gc

    verbs_doctor.register(sub)
    p = sub.add_parser(
        "start",
        help="start a VM and wait until it is ready",
        description=(
            "Start a VM (its netvm first) and wait until its guest is ready to run programs;"
            " prints `VM: running`. Under systemd (after `vmsilo install`) this starts the VM's"
            " service; otherwise it spawns the VM's supervisor, detached, which needs root."
            " A VM that already runs is left as it is."
        ),
    )
    p.add_argument("vm", help="the VM, by its name in the config")
    p.add_argument(
        "--no-wait", action="store_true", help="return once the start is under way (`VM: starting`)"
    )
    p.set_defaults(handler=cmd_start)

    p = sub.add_parser(
        "stop",
        help="stop a VM (power button, then kill after stopTimeout; or --kill)",
        description=(
            "Stop a VM and wait until it has stopped; prints `VM: stopped` or `VM: not running`."
            " Gracefully by default: the power button, then the VM is killed if its guest has"
            " not powered off within stopTimeout. A netvm whose clients run is refused unless"
            " --with-clients. The stop of a running VM uses the plan it was started with."
        ),
    )
    p.add_argument("vm", help="the VM, by its name in the config")
    add_stop_options(p)
    p.set_defaults(handler=cmd_stop)

    p = sub.add_parser(
        "status",
        help="list VMs and their state",
        formatter_class=RAW,
        description=(
            "The state of every VM (or one): stopped, starting, running, stopping or failed,"
            "\nwith its id, hypervisor, memory, cpus, VMM pid, uptime, netvm and colour, and"
            "\nwhy it last stopped. A running VM shows the values it was started with; where"
            "\nthe config has changed since, the config's value is shown beside it."
        ),
        epilog=(
            "last exit: stopped on request | killed on request | killed after stopTimeout |"
            "\nauto-shutdown | guest powered off | a crash (the VMM's exit) | a failed start"
        ),
    )
    p.add_argument("vm", nargs="?", help="only this VM")
    p.add_argument("--json", action="store_true", help="machine-readable output (SPEC fields)")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser(
        "logs",
        help="show a VM's console log",
        description=(
            "Print the console log of a VM (kernel, init and console sessions), with terminal"
            " escape sequences filtered out. The log outlives the VM."
        ),
    )
    p.add_argument("vm", help="the VM, by its name in the config")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    p.set_defaults(handler=cmd_logs)

    svc = sub.add_parser(
        "service",
        help="internal: the per-VM supervisor (systemd runs it)",
        description="Internal: what systemd units and `vmsilo start` run; not for daily use.",
    )
    ssub = svc.add_subparsers(dest="service_verb", required=True, metavar="ACTION")
    p = ssub.add_parser("vm", help="run the supervisor of a VM in the foreground")
    p.add_argument("vm")
    p.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--console", action="store_true", help="console on this terminal")
    p.set_defaults(handler=cmd_service_vm)
    p = ssub.add_parser("cleanup", help="clean up after a VM whose supervisor is gone")
    p.add_argument("vm")
    p.set_defaults(handler=cmd_service_cleanup)

    img = sub.add_parser(
        "image",
        help="build and list guest images",
        description="Guest images: built from Debian packages into stateDir, one version each.",
    )
    isub = img.add_subparsers(dest="image_verb", required=True, metavar="ACTION")
    p = isub.add_parser(
        "build",
        help="build an image (default: 'default')",
        description=(
            "Build a guest image from its config (suite, packages). The version is a hash of"
            " every input: an unchanged image is not rebuilt (`unchanged`); a new version"
            " becomes current for VMs started afterwards, running VMs keep theirs."
        ),
    )
    p.add_argument("name", nargs="?", default="default", help="the image (default: default)")
    p.add_argument("--force", action="store_true", help="rebuild even if unchanged")
    p.add_argument("--cache-dir", help="download/root cache (default: $VMSILO_CACHE_DIR)")
    p.set_defaults(handler=cmd_image_build)
    p = isub.add_parser(
        "list",
        help="list built images",
        description=(
            "Every built image version: size, build date, whether it is the current version"
            " of its image and whether a running VM uses it."
        ),
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (raw values)")
    p.set_defaults(handler=cmd_image_list)
    verbs_image_gc.register(isub)

    from vmsilo.cli import verbs_install

    verbs_install.register(sub)


# ---------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace, users: UserLookup | None) -> Loaded:
    return load(args.config, users)


def _app(app: App | None, loaded: Loaded) -> App:
    """The injected lifecycle app, else the one this host uses for the loaded config."""
    from vmsilo.lifecycle.app import open_app

    return app if app is not None else open_app(loaded.path, state_dir=loaded.plan.state_dir)


# ---------------------------------------------------------------------- verbs


def cmd_start(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    loaded = load(args.config, users, cache=True)
    vm = select_vm(loaded.plan, args.vm)
    from vmsilo.cli.start_status import start_status

    status = None if args.no_wait else start_status(vm.name, err)
    _app(app, loaded).start(loaded.plan, vm, wait=not args.no_wait, progress=status)
    print(f"{vm.name}: running" if not args.no_wait else f"{vm.name}: starting", file=out)
    return 0


def cmd_stop(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    loaded = _load(args, users)
    lifecycle = _app(app, loaded)
    with_clients = stop_with_clients(args, "vmsilo stop", err)
    plan, vm = lifecycle.running_plan(loaded.plan, select_vm(loaded.plan, args.vm), users)
    stopped = lifecycle.stop(plan, vm, with_clients=with_clients, kill=args.kill)
    print(f"{vm.name}: stopped" if stopped else f"{vm.name}: not running", file=out)
    return 0


def cmd_status(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    loaded = _load(args, users)
    vms = [select_vm(loaded.plan, args.vm)] if args.vm else list(loaded.plan.vms.values())
    lifecycle = _app(app, loaded)
    rows = [lifecycle.status(loaded.plan, vm) for vm in vms]
    if args.json:
        json.dump({"vms": rows}, out, indent=2)
        out.write("\n")
        return 0
    from vmsilo.cli.tables import print_status

    print_status(rows, out)
    return 0


def cmd_logs(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    loaded = _load(args, users)
    vm = select_vm(loaded.plan, args.vm)
    from vmsilo.cli.escapes import LogFilter

    path = Path(vm.paths.console_log)
    unreadable = VmsiloError(
        f"reading the console log of VM {vm.name} needs root here",
        f"sudo vmsilo logs {vm.name}",
    )
    if args.follow:
        if path.exists() and not os.access(path, os.R_OK):
            raise unreadable  # tail -F would retry it for ever
        return _follow(path, out)
    if not path.exists():
        raise VmsiloError(f"no console log for {vm.name} yet", f"start it: vmsilo start {vm.name}")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise unreadable from None
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
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.host.systemd import run_by_systemd
    from vmsilo.lifecycle.embedded import EmbeddedApp
    from vmsilo.supervisor.launch import serve

    path = config_path(args.config).resolve()
    text = path.read_text()
    lookup = users or system_users
    plan = build_plan(parse_config(text, lookup, source=str(path)), lookup)
    vm = select_vm(plan, args.vm)
    netvms = app if app is not None else EmbeddedApp(path)

    def start_netvm(name: str) -> None:
        netvms.start(plan, plan.vms[name], wait=True)

    return serve(
        str(path),
        text,
        plan,
        vm,
        err=err,
        notify_fd=args.notify_fd,
        console=args.console,
        start_netvm=None if run_by_systemd() else start_netvm,  # systemd: Requires=
    )


def cmd_service_cleanup(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.host.systemd import run_by_systemd
    from vmsilo.supervisor.cleanup import cleanup_after_exit

    loaded = _load(args, users)
    vm = select_vm(loaded.plan, args.vm)
    plan, vm = _app(app, loaded).running_plan(loaded.plan, vm, users)
    # under systemd the command socket belongs to the socket unit: it stays
    problems = cleanup_after_exit(plan, vm, remove_command_socket=not run_by_systemd())
    if problems is None:
        print(f"{vm.name}: supervisor still running; nothing to clean", file=out)
        return 0
    for problem in problems:
        print(f"cleanup: {problem}", file=err)
    return 0


def _progress(console_file: TextIO) -> Any:
    from rich.console import Console

    # log_path: no `verbs.py:306` on every line (the time stays)
    return Console(file=console_file, highlight=False, log_path=False)


def cmd_image_build(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
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
    from vmsilo.image.desktop import image_entries, select_entries

    offered = list(image_entries(built.path))
    for vm in loaded.plan.vms.values():  # an unknown id is an image-build error (SPEC §9.3)
        if vm.image == built.name:
            select_entries(vm.name, vm.image, vm.desktop_entries, offered)
    verb = "unchanged" if built.reused else "built"
    print(
        f"image {built.name} {verb}: version {built.version} in"
        f" {time.monotonic() - started:.1f} s ({built.path})",
        file=out,
    )
    return 0


def cmd_image_list(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
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
    from vmsilo.cli.tables import print_images

    in_use, _notes = _app(app, loaded).images_in_use(loaded.plan)
    print_images(images, out, in_use)
    return 0
