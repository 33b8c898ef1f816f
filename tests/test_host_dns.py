"""DNS for VMs behind the host's NAT (issue 15.6): the host's reachable resolvers, by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet import plan_of, run_vmsilo
from vmsilo.backends.registry import launch_argv
from vmsilo.host import resolvers
from vmsilo.host.resolvers import host_nameservers

NAT = 'user = "alice"\n[vms.a]\nhypervisor = "qemu"\nnetwork.netvm = "host"\n'


def test_loopback_stubs_are_skipped_for_resolveds_upstreams(tmp_path: Path) -> None:
    etc, resolved = tmp_path / "etc", tmp_path / "resolved"
    etc.write_text("# stub\nnameserver 127.0.0.53\noptions edns0\nsearch lan\n")
    resolved.write_text(
        "nameserver 192.168.1.1\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\n"
    )
    assert host_nameservers([etc, resolved]) == ("192.168.1.1", "2001:db8::53")
    etc.write_text("nameserver 10.0.0.2\nnameserver 10.0.0.2\nnameserver ::1\n")
    assert host_nameservers([etc, resolved]) == ("10.0.0.2",)
    etc.write_text("nameserver 127.0.0.1\n")
    assert host_nameservers([etc, tmp_path / "missing"]) == ()
    etc.write_text("".join(f"nameserver 10.0.0.{n}\n" for n in range(1, 6)))
    assert len(host_nameservers([etc])) == 3  # what glibc reads


@pytest.mark.parametrize("backend", ["qemu", "crosvm"])
def test_a_host_nat_vm_gets_the_hosts_resolvers_on_its_command_line(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setattr(resolvers, "host_nameservers", lambda: ("192.0.2.53",))
    plan = plan_of(NAT.replace('"qemu"', f'"{backend}"'))
    argv = " ".join(launch_argv(plan, plan.vms["a"], probe=False))
    assert "nameserver=192.0.2.53" in argv
    # a VM that names its own resolvers, or is not behind the host, gets none of the host's
    own = plan_of(NAT.replace('"qemu"', f'"{backend}"') + 'network.nameservers = ["9.9.9.9"]\n')
    argv = " ".join(launch_argv(own, own.vms["a"], probe=False))
    assert "nameserver=9.9.9.9" in argv and "192.0.2.53" not in argv
    alone = plan_of(f'user = "alice"\n[vms.b]\nhypervisor = "{backend}"\n')
    assert "nameserver=" not in " ".join(launch_argv(alone, alone.vms["b"], probe=False))


def test_doctor_warns_when_the_host_has_only_a_loopback_resolver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(NAT.replace('user = "alice"\n', f'user = "alice"\nstateDir = "{tmp_path}"\n'))
    monkeypatch.setattr(resolvers, "host_nameservers", lambda: ())
    _, out, _ = run_vmsilo(["-c", str(cfg), "doctor", "--json"])
    dns = {f["check"]: f for f in json.loads(out)["findings"]}["DNS"]
    assert dns["level"] == "warn" and "network.nameservers" in dns["hint"]
    monkeypatch.setattr(resolvers, "host_nameservers", lambda: ("192.0.2.53",))
    _, out, _ = run_vmsilo(["-c", str(cfg), "doctor", "--json"])
    dns = {f["check"]: f for f in json.loads(out)["findings"]}["DNS"]
    assert dns["level"] == "ok" and "192.0.2.53" in dns["detail"]


def test_the_hosts_own_addresses_are_skipped(tmp_path: Path) -> None:
    """A resolver on the host itself is behind the input filter of the VM's link."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 53))  # no packet: just picks the host's outgoing address
        own = s.getsockname()[0]
    etc = tmp_path / "etc"
    etc.write_text(f"nameserver {own}\nnameserver 192.0.2.53\n")
    assert host_nameservers([etc]) == ("192.0.2.53",)
