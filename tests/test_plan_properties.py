"""Property tests over random fleets (hypothesis): what must hold for every valid config."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from crosvm_grammar import assert_valid
from fleet import USERS
from vmsilo.backends.crosvm import crosvm_argv
from vmsilo.config.load import validate_config
from vmsilo.config.problems import ConfigErrors
from vmsilo.plan.build import build_plan
from vmsilo.plan.model import Plan

vm_names = st.from_regex(r"[a-z][a-z0-9-]{0,24}", fullmatch=True).filter(lambda s: s != "host")
if_names = st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True)
share_tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True)
kernel_params = st.from_regex(r"[a-z][a-z0-9_.]{0,10}(=[A-Za-z0-9,:/._-]{0,300})?", fullmatch=True)


@st.composite
def fleets(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(vm_names, min_size=1, max_size=14, unique=True))
    netvms = [n for n in names if draw(st.booleans()) and draw(st.booleans())]
    vms: dict[str, Any] = {}
    prefix = draw(st.sampled_from([16, 20, 24, 26]))
    net_range = f"10.{draw(st.integers(0, 255))}.0.0/{prefix}"
    rng = ipaddress.IPv4Network(net_range)
    pins: set[str] = set()
    for name in names:
        vm: dict[str, Any] = {
            "hypervisor": draw(st.sampled_from(["crosvm", "qemu"])),
            "memory": draw(st.integers(64, 65536)),
            "cpus": draw(st.integers(1, 256)),
        }
        ifaces = draw(st.lists(if_names, max_size=3, unique=True))
        vm["network"] = {
            "interfaces": {
                i: {"addresses": [f"192.168.{k}.2/24"]} if draw(st.booleans()) else {"dhcp": True}
                for k, i in enumerate(ifaces)
                if i != "upstream" and i not in names
            },
            "isNetvm": name in netvms,
        }
        choices = ["host", None, *[n for n in netvms if n != name]]
        netvm = draw(st.sampled_from(choices))
        if netvm is not None and (name not in netvms or netvm == "host"):
            vm["network"]["netvm"] = netvm
            if draw(st.integers(0, 4)) == 0:
                idx = draw(st.integers(0, rng.num_addresses // 2 - 1))
                pin = f"{rng.network_address + 2 * idx}/31"
                if pin not in pins:
                    pins.add(pin)
                    vm["network"]["netvmSubnet"] = pin
        tags = draw(st.lists(share_tags, max_size=3, unique=True))
        vm["sharedDirectories"] = {
            t: {"path": f"/srv/{t}", "mountPoint": f"/mnt/{t}", "readOnly": draw(st.booleans())}
            for t in tags
            if t != "home"
        }
        vm["kernelParams"] = draw(st.lists(kernel_params, max_size=8))
        vm["autoShutdown"] = {"enable": draw(st.booleans()), "after": draw(st.integers(1, 10**6))}
        vms[name] = vm
    return {"user": "alice", "netvmRange": net_range, "vms": vms}


def _plan_or_none(data: dict[str, Any]) -> Plan | None:
    try:
        return build_plan(validate_config(data, USERS), USERS)
    except ConfigErrors as e:
        for p in e.problems:
            assert p.path and p.message and p.hint, p
        event("invalid: " + e.problems[0].message.split(" ")[0])
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_valid_fleets_have_unique_linux_names_and_macs(data: dict[str, Any]) -> None:
    plan = _plan_or_none(data)
    assume(plan is not None)
    assert plan is not None
    event("valid")
    host_ifs: list[str] = []
    macs: list[str] = []
    units: list[str] = []
    for vm in plan.vms.values():
        for i in vm.interfaces:
            host_ifs.append(i.tap)
            macs.append(i.mac)
            assert len(i.name) <= 15 and len(i.tap) <= 15
            if i.bridge is not None:
                assert len(i.bridge) <= 15
        units += [vm.service_unit, vm.socket_unit]
    bridges = {link.bridge for link in plan.links if link.bridge}
    assert len(host_ifs) == len(set(host_ifs))
    assert not bridges & set(host_ifs)
    assert len(macs) == len(set(macs))
    for mac in macs:
        first = int(mac[:2], 16)
        assert first & 1 == 0, "unicast"
        assert first & 2 == 2, "locally administered"
    assert len(units) == len(set(units))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_links_never_overlap_and_stay_in_range(data: dict[str, Any]) -> None:
    plan = _plan_or_none(data)
    assume(plan is not None)
    assert plan is not None
    rng = ipaddress.IPv4Network(plan.netvm_range)
    subnets = [ipaddress.IPv4Network(link.subnet) for link in plan.links]
    assert len(subnets) == len(set(subnets))
    for link, net in zip(plan.links, subnets, strict=True):
        assert net.prefixlen == 31 and net.subnet_of(rng)
        assert link.gateway == str(net.network_address)
        assert link.client_address == str(net.network_address + 1)
        pinned = data["vms"][link.client]["network"].get("netvmSubnet")
        assert (pinned == link.subnet) if pinned else not link.pinned
    pinned_nets = {
        ipaddress.IPv4Network(vm["network"]["netvmSubnet"])
        for vm in data["vms"].values()
        if "netvmSubnet" in vm["network"]
    }
    for link, net in zip(plan.links, subnets, strict=True):
        if not link.pinned:
            assert net not in pinned_nets


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_every_upstream_argv_passes_the_crosvm_grammar(data: dict[str, Any]) -> None:
    plan = _plan_or_none(data)
    assume(plan is not None)
    assert plan is not None
    for vm in plan.vms.values():
        assert_valid(crosvm_argv(plan, vm))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_kernel_command_line_within_limit_or_check_fails(data: dict[str, Any]) -> None:
    try:
        plan = build_plan(validate_config(data, USERS), USERS)
    except ConfigErrors as e:
        too_long = [p for p in e.problems if "kernel command line" in p.message]
        for p in too_long:
            assert "at most 2048" in p.message
        return
    for vm in plan.vms.values():
        assert len(vm.kernel_cmdline.encode()) <= 2048
