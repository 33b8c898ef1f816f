"""Rules on derived values (SPEC §2): they need the plan, so they run after it is built.

Uniqueness is checked across the whole fleet with one dictionary per namespace (MACs, host
interface names, unit names, runtime paths), so the check is linear in the number of VMs and
each duplicate is reported once, naming both owners.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vmsilo.config.problems import Problem, join_path
from vmsilo.plan.derive import MAX_INTERFACES

if TYPE_CHECKING:
    from vmsilo.config.model import Config
    from vmsilo.plan.model import Plan

MAX_CMDLINE = 2048

#: Guest directories a share must not cover: the system the guest runs from, and the API
#: file systems the init mounts (a share on or below them would hide or fake them).
SYSTEM_DIRS = frozenset(
    [
        "/",
        "/bin",
        "/boot",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/root",
        "/sbin",
        "/tmp",
        "/usr",
        "/var",
    ]
)
API_TREES = ("/proc", "/sys", "/dev", "/run")


def check_plan(plan: Plan, config: Config) -> list[Problem]:
    return [*_interfaces(plan), *_unique(plan), *_cmdline(plan), *_mount_points(plan, config)]


def _iface_path(vm: str, ifname: str, *rest: str) -> str:
    return join_path("vms", vm, "network", "interfaces", ifname, *rest)


def _interfaces(plan: Plan) -> Iterator[Problem]:
    for vm in plan.vms.values():
        names: dict[str, str | None] = {}
        for i in vm.interfaces:
            if i.name in names:
                sources = [
                    f"injected for {p}" if p else "configured"
                    for p in (names[i.name], i.injected_for)
                ]
                yield Problem(
                    _iface_path(vm.name, i.name),
                    f"interface name {i.name!r} is used twice ({' and '.join(sources)})",
                    "rename the configured interface; 'upstream' and client names are taken by"
                    " netvm links",
                )
            names[i.name] = i.injected_for
        if len(vm.interfaces) > MAX_INTERFACES:
            extra = ""
            if vm.netvm_clients:
                extra = f"; netvm {vm.name!r} has a link for each client: " + ", ".join(
                    vm.netvm_clients
                )
            yield Problem(
                join_path("vms", vm.name, "network", "interfaces"),
                f"{len(vm.interfaces)} effective interfaces, at most {MAX_INTERFACES}"
                f" (PCI slots 22-31){extra}",
                "remove interfaces, or move clients to another netvm",
            )


def _unique(plan: Plan) -> Iterator[Problem]:
    macs: dict[str, str] = {}
    host_ifs: dict[str, str] = {}
    user_bridges: dict[str, str] = {}
    link_bridges: dict[str, str] = {}
    paths: dict[str, str] = {}
    for vm in plan.vms.values():
        for i in vm.interfaces:
            where = _iface_path(vm.name, i.name)
            if i.mac in macs:
                yield Problem(
                    join_path(where, "macAddress"),
                    f"MAC address {i.mac} is also used by {macs[i.mac]}",
                    "set a different macAddress",
                )
            else:
                macs[i.mac] = where
            if i.tap in host_ifs:
                yield Problem(
                    join_path(where, "tap", "name"),
                    f"host interface name {i.tap!r} is also used by {host_ifs[i.tap]}",
                    "set a different tap.name",
                )
            else:
                host_ifs[i.tap] = where
            if i.bridge is not None:
                if i.injected_for is None:
                    user_bridges.setdefault(i.bridge, where)
                else:
                    link_bridges.setdefault(i.bridge, where)
        for other in (*(s.socket for s in vm.shares), *vm.paths.as_dict().values()):
            if other in paths and paths[other] != vm.name:
                yield Problem(
                    join_path("vms", vm.name),
                    f"runtime path {other} is also used by VM {paths[other]!r}",
                    "rename the VM or the share so their socket paths differ",
                )
            else:
                paths[other] = vm.name
        for d in vm.disks:
            if d.role != "ephemeral" and not d.read_only and d.path in paths:
                yield Problem(
                    join_path("vms", vm.name),
                    f"writable disk {d.path} is also used by VM {paths[d.path]!r}",
                    "give each VM its own writable disk, or make it ro = true",
                )
            elif not d.read_only:
                paths[d.path] = vm.name
    for bridge, where in link_bridges.items():
        if bridge in host_ifs:
            yield Problem(
                join_path(host_ifs[bridge], "tap", "name"),
                f"host interface name {bridge!r} is the netvm link bridge of {where}",
                "set a different tap.name",
            )
        else:
            host_ifs[bridge] = where
    for bridge, where in user_bridges.items():
        if bridge in host_ifs:
            yield Problem(
                join_path(where, "tap", "bridge"),
                f"bridge name {bridge!r} is also a host interface of {host_ifs[bridge]}",
                "a bridge must not be named like a tap or a vmsilo-br<id> bridge",
            )


def _cmdline(plan: Plan) -> Iterator[Problem]:
    for vm in plan.vms.values():
        size = len(vm.kernel_cmdline.encode())
        if size > MAX_CMDLINE:
            yield Problem(
                join_path("vms", vm.name, "kernelParams"),
                f"kernel command line is {size} bytes, at most {MAX_CMDLINE}",
                "drop kernelParams, shares or interfaces",
            )


def _share_path(config: Config, vm: str, tag: str) -> str:
    """Where the user wrote this share's mount point (the home share comes from sharedHome)."""
    if tag in config.vms[vm].shared_directories:
        return join_path("vms", vm, "sharedDirectories", tag, "mountPoint")
    return join_path("vms", vm, "sharedHome")


def _mount_points(plan: Plan, config: Config) -> Iterator[Problem]:
    """Two shares on one guest directory, one inside another, or one over a system directory.

    The guest can mount only one file system per directory: without this check one share
    silently hides the other (or a system directory) in the guest.
    """
    for vm in plan.vms.values():
        seen: list[tuple[str, str]] = []  # (normalised mount point, config path)
        for share in vm.shares:
            mount = posixpath.normpath(share.mount_point)
            where = _share_path(config, vm.name, share.tag)
            api = next((t for t in API_TREES if mount == t or mount.startswith(t + "/")), None)
            if mount in SYSTEM_DIRS or api is not None:
                yield Problem(
                    where,
                    f"mount point {share.mount_point} would cover the guest's system directory"
                    f" {api or mount}",
                    "mount shares below a directory of their own, e.g. /mnt/" + share.tag,
                )
                continue
            for other, other_where in seen:
                if other == mount:
                    problem = f"mount point {mount} is also the mount point of {other_where}"
                elif mount.startswith(other + "/") or other.startswith(mount + "/"):
                    inner, outer = (mount, other) if len(mount) > len(other) else (other, mount)
                    problem = (
                        f"mount point {mount} and the mount point of {other_where} ({other})"
                        f" nest: {inner} lies inside {outer}"
                    )
                else:
                    continue
                yield Problem(
                    where,
                    problem,
                    "give each share its own directory, side by side (e.g. /mnt/a and /mnt/b)",
                )
                break
            seen.append((mount, where))
