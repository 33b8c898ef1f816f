"""The host's input filter on VM links (vmsilo.host.input_filter): which interfaces it covers,
and that nft accepts the ruleset it writes (SPEC §11.3)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from fleet import plan_of
from vmsilo.host.input_filter import link_interfaces, ruleset

CONFIG = """
user = "alice"
[vms.gw]
network = { isNetvm = true, netvm = "host" }
[vms.work]
network.netvm = "gw"
[vms.lab]
network.interfaces.lan = { tap = { name = "lab-lan", hostAddress = "192.168.50.1/24" } }
"""


def test_it_covers_every_link_tap_and_bridge_and_leaves_the_users_own_taps_alone() -> None:
    plan = plan_of(CONFIG)
    gw, lab, work = plan.vms["gw"], plan.vms["lab"], plan.vms["work"]
    assert link_interfaces(gw) == sorted([gw.interfaces[0].tap, gw.interfaces[1].tap, "vmsilo-br5"])
    assert link_interfaces(work) == ["vmsilo-br5", "work-22"]
    assert link_interfaces(lab) == []  # explicit tap.hostAddress: the user's choice


def test_replies_and_pings_pass_everything_else_from_a_link_is_dropped() -> None:
    text = ruleset(plan_of(CONFIG).vms["work"])
    assert "table inet vmsilo_input_5" in text  # inet: IPv6 link-local too
    lines = [line.strip() for line in text.splitlines() if "iifname" in line]
    assert lines == [
        'iifname { "vmsilo-br5", "work-22" } ct state established,related accept',
        'iifname { "vmsilo-br5", "work-22" } icmp type echo-request accept',
        'iifname { "vmsilo-br5", "work-22" } drop',
    ]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")
def test_nft_accepts_the_ruleset() -> None:
    text = ruleset(plan_of(CONFIG).vms["gw"])
    # --check: parsed and validated by the kernel, nothing committed
    p = subprocess.run(["nft", "--check", "-f", "-"], input=text.encode(), capture_output=True)
    assert p.returncode == 0, p.stderr
