"""Attacks SPEC §11.6: editing the config while VMs run never makes a newly started VM share a
running VM's CID, bridge, tap, /31, nft table or disk.

VM ids are sorted positions, so adding ``a1`` while ``client`` runs hands ``a1`` client's id —
and with it client's vsock CID and nft tables ``vmsilo_<id>`` (NAT, anti-spoofing, input filter)
and client's /31 to the host. Starting ``a1`` then deleted client's tables. Real QEMU VMs, in a
network namespace of the test's own.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmenv import VM_DEMO, Install, qemu_install

pytestmark = pytest.mark.vm


def vm(name: str) -> str:
    return VM_DEMO.replace("[vms.demo]", f"[vms.{name}]") + "network.netvm = 'host'\n"


def in_ns(inst: Install, *argv: str) -> str:
    assert inst.netns is not None
    p = subprocess.run(["ip", "netns", "exec", inst.netns, *argv], capture_output=True)
    return p.stdout.decode() if p.returncode == 0 else ""


def test_a_vm_added_while_another_runs_cannot_take_its_identities(
    image: Any, state_dir: Path
) -> None:
    with qemu_install(state_dir, "idshift", vm("client"), netns=True) as inst:
        p = inst.cmd("vmsilo", "start", "client")
        assert p.returncode == 0, p.stderr
        assert inst.status("client")["id"] == 3
        nat = in_ns(inst, "nft", "list", "table", "ip", "vmsilo_3")
        assert "client-22" in nat
        # the edit: a1 sorts before client and so now has client's id, CID, /31 and tables
        inst.config.write_text(inst.config.read_text() + vm("a1"))
        assert inst.status("a1")["id"] == 3
        for tool, status in (("vmsilo", 2), ("vm-start", 1)):
            args = ("start", "a1") if tool == "vmsilo" else ("a1",)
            p = inst.cmd(tool, *args)
            assert p.returncode == status, p.stdout + p.stderr
            err = p.stderr.decode()
            assert "running VM client" in err and "`vm-stop client`" in err, err
            assert "vsock CID 3" in err and "nft table vmsilo_3" in err, err
        p = inst.cmd("vm-run", "a1", "true")
        assert p.returncode == 255 and b"running VM client" in p.stderr, p.stderr
        # client kept all it had: tables, tap, address, its session and its traffic
        assert in_ns(inst, "nft", "list", "table", "ip", "vmsilo_3") == nat
        assert "drop" in in_ns(inst, "nft", "list", "table", "inet", "vmsilo_input_3")
        assert "10.200.0.0/31" in in_ns(inst, "ip", "-o", "addr", "show", "dev", "client-22")
        assert in_ns(inst, "ip", "link", "show", "a1-22") == ""  # a1 touched nothing
        p = inst.cmd("vm-run", "--root", "client", "busybox", "ping", "-c1", "-W5", "10.200.0.0")
        assert p.returncode == 0, p.stdout + p.stderr
        p = inst.cmd("vm-run", "client", "echo", "still here")
        assert p.returncode == 0 and p.stdout == b"still here\n", p.stderr
        assert inst.status("client")["state"] == "running"
        # once client is stopped, a1 starts with the identities it was given
        p = inst.cmd("vm-stop", "client")
        assert p.returncode == 0, p.stderr
        tables = in_ns(inst, "nft", "list", "tables")
        assert "vmsilo_3" not in tables and "vmsilo_input_3" not in tables  # gone with client
        p = inst.cmd("vmsilo", "start", "a1")
        assert p.returncode == 0, p.stderr
        assert "a1-22" in in_ns(inst, "nft", "list", "table", "ip", "vmsilo_3")
        p = inst.cmd("vm-run", "a1", "echo", "a1 here")
        assert p.returncode == 0 and p.stdout == b"a1 here\n", p.stderr
        # ... and client, started again from the edited config, now gets its new identities
        p = inst.cmd("vmsilo", "start", "client")
        assert p.returncode == 0, p.stderr
        assert inst.status("client")["id"] == 4
        assert "client-22" in in_ns(inst, "nft", "list", "table", "ip", "vmsilo_4")
        assert "a1-22" in in_ns(inst, "nft", "list", "table", "ip", "vmsilo_3")
