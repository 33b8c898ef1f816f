"""Which identities two VMs would share (vmsilo.host.identity, pure), the refusal a supervisor
words from it and the cleanup that leaves a running VM's identities alone
(vmsilo.supervisor.identities) — SPEC §11.6."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import plan_of
from vmsilo.errors import VmsiloError
from vmsilo.host.identity import Claim, claims_of, conflicts, describe, shared
from vmsilo.plan.model import Plan, VmPlan
from vmsilo.plan.serialize import vm_to_json
from vmsilo.supervisor.identities import (
    held_by_others,
    refuse_shared_identities,
    running_claims,
)
from vmsilo.supervisor.snapshot import write_snapshot

HEAD = 'user = "alice"\nruntimeDir = "{run}"\nstateDir = "{state}"\n'
CLIENT = "[vms.client]\nnetwork.netvm = 'host'\n"
A1 = "[vms.a1]\nnetwork.netvm = 'host'\n"


def claims(vm: VmPlan) -> list[Claim]:
    return claims_of(vm.name, vm_to_json(vm))


def kinds(found: list[Claim]) -> set[str]:
    return {c.label for c in found}


def config(tmp_path: Path, body: str) -> tuple[Plan, str]:
    text = HEAD.format(run=tmp_path / "run", state=tmp_path / "state") + body
    return plan_of(text), text


# --------------------------------------------------------------------------- pure comparison


def test_a_vm_added_before_a_running_one_would_take_its_id_link_and_tables(
    tmp_path: Path,
) -> None:
    before, _ = config(tmp_path, CLIENT)
    after, _ = config(tmp_path, A1 + CLIENT)
    running, new = before.vms["client"], after.vms["a1"]
    assert running.id == new.id == 3  # what the sorted-position ids do on such an edit
    clash = kinds(conflicts(claims(new), claims(running)))
    assert clash == {
        "id and vsock CID 3",
        "nft table vmsilo_3",
        "nft table vmsilo_input_3",
        "netvm link 10.200.0.0/31",
        "address 10.200.0.0",
        "address 10.200.0.1",
    }


def test_the_same_vm_from_the_same_config_shares_everything_and_a_stranger_nothing(
    tmp_path: Path,
) -> None:
    plan, _ = config(tmp_path, A1 + CLIENT)
    a1, client = plan.vms["a1"], plan.vms["client"]
    assert conflicts(claims(a1), claims(client)) == []
    assert conflicts(claims(client), claims(a1)) == []
    # against itself (another copy of the same VM) all but the shareable: read-only disks and
    # the link, which both ends of it hold
    same = {c.key for c in conflicts(claims(a1), claims(a1))}
    assert same == {c.key for c in claims(a1) if c.exclusive and c.link is None}
    assert {("vsock CID", "3"), ("interface", "a1-22"), ("nft table", "vmsilo_3")} <= same


def test_both_ends_of_a_netvm_link_hold_its_bridge_and_subnet_by_design(tmp_path: Path) -> None:
    plan, _ = config(
        tmp_path,
        "[vms.gw]\nnetwork = { isNetvm = true, netvm = 'host' }\n"
        "[vms.work]\nnetwork.netvm = 'gw'\n",
    )
    gw, work = plan.vms["gw"], plan.vms["work"]
    assert conflicts(claims(gw), claims(work)) == []
    assert conflicts(claims(work), claims(gw)) == []
    # ... and cleanup of either keeps them while the other runs
    assert kinds(shared(claims(gw), claims(work))) == {
        f"bridge vmsilo-br{work.id}",
        f"netvm link {plan.links[1].subnet}",
    }


def test_a_link_bridge_that_now_belongs_to_another_client_is_a_conflict(tmp_path: Path) -> None:
    old, _ = config(
        tmp_path,
        "[vms.gw]\nnetwork.isNetvm = true\n[vms.work]\nnetwork.netvm = 'gw'\n",
    )
    new, _ = config(
        tmp_path,
        "[vms.gw]\nnetwork.isNetvm = true\n[vms.home]\nnetwork.netvm = 'gw'\n"
        "[vms.work]\nnetwork.netvm = 'gw'\n",
    )
    # old: gw 3, work 4 (bridge vmsilo-br4, 10.200.0.0/31); new: gw 3, home 4, work 5
    assert new.vms["home"].id == old.vms["work"].id == 4
    clash = kinds(conflicts(claims(new.vms["home"]), claims(old.vms["work"])))
    assert {"id and vsock CID 4", "bridge vmsilo-br4", "netvm link 10.200.0.0/31"} <= clash
    # the netvm restarted from the new config would put home's link on work's bridge
    clash = kinds(conflicts(claims(new.vms["gw"]), claims(old.vms["work"])))
    assert clash == {"bridge vmsilo-br4", "netvm link 10.200.0.0/31"}


def test_disks_readers_share_a_writer_does_not(tmp_path: Path) -> None:
    def vm(name: str, ro: str) -> str:
        return f"[vms.{name}]\nadditionalDisks = [{{ path = '/srv/d.img', ro = {ro} }}]\n"

    plan, _ = config(tmp_path, vm("a", "true") + vm("b", "true") + vm("c", "false"))
    a, b, c = (claims(plan.vms[n]) for n in "abc")
    assert conflicts(a, b) == []  # the image's root disk and /srv/d.img, read-only on both
    assert kinds(conflicts(a, c)) == {"read-only disk /srv/d.img"}
    assert kinds(conflicts(c, a)) == {"writable disk /srv/d.img"}


def test_a_runtime_dir_shared_by_two_configs_is_caught_by_path(tmp_path: Path) -> None:
    plan, _ = config(tmp_path, CLIENT)
    vm = plan.vms["client"]
    renamed = claims_of("other", {**vm_to_json(vm), "id": 9, "interfaces": []})
    assert f"runtime path {vm.paths.command_socket}" in kinds(conflicts(claims(vm), renamed))
    words = describe(conflicts(claims(vm), renamed))
    assert f"writable disk {vm.paths.ephemeral_disk}" in words
    assert words.count(f"runtime path {vm.paths.lock}") == 1


# --------------------------------------------------------------------------- running VMs


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[int]]:
    """Lock files held (as a live supervisor would) until the test ends."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def start(fds: list[int], plan: Plan, text: str, name: str, *, lock: bool = True) -> None:
    vm = plan.vms[name]
    write_snapshot(vm.paths.plan_snapshot, "/etc/vmsilo/vmsilo.toml", text, vm)
    if lock:
        fd = os.open(vm.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fds.append(fd)


def test_a_start_that_would_take_a_running_vms_identities_is_refused_naming_it(
    tmp_path: Path, running: list[int]
) -> None:
    before, text = config(tmp_path, CLIENT)
    start(running, before, text, "client")
    after, _ = config(tmp_path, A1 + CLIENT)
    with pytest.raises(VmsiloError) as refused:
        refuse_shared_identities(after, after.vms["a1"])
    words = str(refused.value)
    assert "running VM client" in words and "nft table vmsilo_3" in words
    assert "id and vsock CID 3" in words and "`vm-stop client`" in words
    # the refused VM's cleanup leaves the running VM's tables alone
    held = held_by_others(after, after.vms["a1"])
    assert {("nft table", "vmsilo_3"), ("nft table", "vmsilo_input_3")} <= held
    # a running VM restarting with its own identities is fine (its own lock is not "another")
    refuse_shared_identities(before, before.vms["client"])


def test_a_running_vm_no_longer_in_the_config_still_counts(
    tmp_path: Path, running: list[int]
) -> None:
    before, text = config(tmp_path, CLIENT)
    start(running, before, text, "client")
    renamed, _ = config(tmp_path, CLIENT.replace("client", "laptop"))
    with pytest.raises(VmsiloError, match="running VM client"):
        refuse_shared_identities(renamed, renamed.vms["laptop"])


def test_stopped_vms_and_unreadable_snapshots_do_not_count(
    tmp_path: Path, running: list[int]
) -> None:
    before, text = config(tmp_path, CLIENT)
    start(running, before, text, "client", lock=False)  # a crashed supervisor's leftovers
    after, _ = config(tmp_path, A1 + CLIENT)
    assert running_claims(after.runtime_dir, besides="a1") == {}
    refuse_shared_identities(after, after.vms["a1"])
    (tmp_path / "run" / "client.plan.json").write_text("{not json")
    fd = os.open(before.vms["client"].paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    running.append(fd)
    assert running_claims(after.runtime_dir, besides="a1") == {}
