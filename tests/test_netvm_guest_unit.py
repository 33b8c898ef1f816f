"""vmsilo.guest.netvm's pieces off the VM: its argv parsing, and its ruleset loaded by the real
nft (in a network namespace of the test's own) — twice, as every start of a netvm does, the
second replacing the first in one transaction. The whole program in a netvm guest:
tests/test_vm_network.py and tests/test_fast_start_netvm.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from vmsilo.guest.netvm import parse_args, ruleset


def test_parse_args() -> None:
    assert parse_args([]) == (None, [])
    argv = ["--upstream", "upstream", "--client", "a", "--client", "b"]
    assert parse_args(argv) == ("upstream", ["a", "b"])
    for bad in (["--upstream"], ["--client", "a b"], ["--other", "x"], ["--client", "-x"]):
        with pytest.raises(ValueError):
            parse_args(bad)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft")
    name = f"vmsilo-nft{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_ruleset_replaces_itself_in_one_transaction(netns: str) -> None:
    def load(text: str) -> None:
        argv = ["ip", "netns", "exec", netns, "nft", "-f", "-"]
        p = subprocess.run(argv, input=text.encode(), capture_output=True)
        assert p.returncode == 0, p.stderr

    load(ruleset("upstream", ["a", "b"]))
    load(ruleset("upstream", ["c"]))  # an existing table: replaced, not doubled
    listed = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "list", "table", "ip", "vmsilo_netvm"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'iifname "c" oifname "upstream" accept' in listed
    assert '"a"' not in listed and listed.count("masquerade") == 1
