"""Host side of a VM's networking: its taps and link bridges, made with pyroute2 (netlink).

The plan says which taps exist, which bridge each joins and which host address it carries;
this module only applies that and undoes it. Creation is idempotent (a stale tap left by a
crashed run is reused, not an error) and removal ignores what is already gone, so cleanup after
any kind of exit is the same call.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable
from typing import Any

from vmsilo.errors import VmsiloError
from vmsilo.plan.model import InterfacePlan, VmPlan


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _ensure(ipr: Any, name: str, **kind: Any) -> int:
    idx = _index(ipr, name)
    if idx is None:
        try:
            ipr.link("add", ifname=name, **kind)
        except Exception as e:  # pyroute2 raises NetlinkError / OSError subclasses
            code = getattr(e, "code", None)
            if code != errno.EEXIST:
                raise VmsiloError(
                    f"cannot create host interface {name}: {e}",
                    "run as root; check that /dev/net/tun exists (modprobe tun)",
                ) from e
        idx = _index(ipr, name)
    if idx is None:
        raise VmsiloError(f"host interface {name} did not appear", "check `ip link`")
    return idx


def _add_address(ipr: Any, idx: int, cidr: str) -> None:
    iface = ipaddress.IPv4Interface(cidr)
    try:
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    except Exception as e:
        if getattr(e, "code", None) != errno.EEXIST:
            raise VmsiloError(f"cannot set address {cidr}: {e}", "check `ip addr`") from e


def bridges_of(vm: VmPlan) -> list[str]:
    return sorted({i.bridge for i in vm.interfaces if i.bridge is not None})


def setup_interfaces(vm: VmPlan) -> None:
    """Create the VM's taps (and the bridges they join), bring them up, set host addresses."""
    if not vm.interfaces:
        return
    with _iproute() as ipr:
        for i in vm.interfaces:
            _setup_one(ipr, i)


def _setup_one(ipr: Any, i: InterfacePlan) -> None:
    tap = _ensure(ipr, i.tap, kind="tuntap", mode="tap")
    if i.bridge is not None:
        br = _ensure(ipr, i.bridge, kind="bridge")
        ipr.link("set", index=br, state="up")
        ipr.link("set", index=tap, master=br)
    if i.host_address is not None:
        _add_address(ipr, tap, i.host_address)
    ipr.link("set", index=tap, state="up")


def teardown_interfaces(vm: VmPlan, keep: Iterable[str] = ()) -> None:
    """Remove the VM's taps and link bridges, except ``keep``: those another running VM still
    uses (a link bridge shared with a running peer, or a tap after a config edit)."""
    if not vm.interfaces:
        return
    kept = set(keep)
    with _iproute() as ipr:
        for name in [i.tap for i in vm.interfaces] + bridges_of(vm):
            if name in kept:
                continue
            idx = _index(ipr, name)
            if idx is None:
                continue
            try:
                ipr.link("del", index=idx)
            except Exception as e:
                if getattr(e, "code", None) not in (errno.ENODEV, errno.ENOENT):
                    raise


def interface_exists(name: str) -> bool:
    with _iproute() as ipr:
        return _index(ipr, name) is not None


def attach_to_bridge(tap: str, bridge: str) -> None:
    """Enslave an existing tap to ``bridge`` (no-op if either is missing)."""
    with _iproute() as ipr:
        tap_idx, br_idx = _index(ipr, tap), _index(ipr, bridge)
        if tap_idx is not None and br_idx is not None:
            ipr.link("set", index=tap_idx, master=br_idx)
