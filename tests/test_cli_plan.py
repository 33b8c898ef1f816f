"""`vmsilo plan`, `vmsilo argv --backend qemu` and the QEMU accelerator choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fleet import plan_of, run_vmsilo, run_vmsilo_json
from vmsilo.backends import accel
from vmsilo.backends.qemu import qemu_argv

EVERY = Path(__file__).parent / "data" / "configs" / "every-option.toml"


def test_plan_json_has_the_documented_fields() -> None:
    data = run_vmsilo_json(["-c", str(EVERY), "plan", "--json"])
    assert set(data["vms"]) == {"netvm", "work"}
    work = data["vms"]["work"]
    for key in (
        "id",
        "hypervisor",
        "memory",
        "cpus",
        "color",
        "interfaces",
        "kernelParams",
        "disks",
        "shares",
        "paths",
        "notApplied",
    ):
        assert key in work, key
    iface = work["interfaces"][0]
    assert {k: iface[k] for k in ("name", "ifIndex", "pciAddress", "mac", "tap")} == {
        "name": "eth0",
        "ifIndex": 22,
        "pciAddress": "00:16.0",
        "mac": "02:00:00:00:00:01",
        "tap": "worktap",
    }
    assert iface["hostAddress"] == "192.168.50.1/24" and iface["bridge"] is None
    assert work["interfaces"][2]["bridge"] == "vmsilo-br4"
    assert work["paths"]["commandSocket"] == "/run/vms/work-command.socket"
    assert work["paths"]["ephemeralDisk"] == "/var/lib/vms/work-ephemeral.raw"
    assert work["notApplied"] == []
    assert [d["role"] for d in work["disks"]] == ["root", "additional", "additional", "ephemeral"]
    one = run_vmsilo_json(["-c", str(EVERY), "plan", "work", "--json"])
    assert list(one["vms"]) == ["work"]
    assert [link["client"] for link in one["links"]] == ["work"]


def test_plan_human_output(tmp_path: Path) -> None:
    status, out, err = run_vmsilo(["-c", str(EVERY), "plan", "work"])
    assert status == 0, err
    assert "vmsilo.hostname=work" in out and "worktap" in out


def test_qemu_argv_maps_the_plan() -> None:
    plan = plan_of(
        """
        user = "alice"
        [vms.q]
        hypervisor = "qemu"
        memory = 1024
        cpus = 2
        network.interfaces.eth0 = { addresses = ["10.0.0.2/24"] }
        sharedDirectories.docs = { path = "/srv/docs", mountPoint = "/mnt/docs" }
        pciDevices = [{ path = "01:00.0" }]
        gpu = { opengl = true }
        """
    )
    vm = plan.vms["q"]
    argv = qemu_argv(plan, vm, "tcg")
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-m") + 1] == "1024M" and argv[argv.index("-smp") + 1] == "2"
    append = argv[argv.index("-append") + 1].split(" ")
    assert append[:2] == ["console=hvc0", "panic=-1"] and append[2:] == list(vm.kernel_params)
    assert "serial=ephemeral" in joined
    assert "tap,id=net-eth0,ifname=q-22,script=no,downscript=no" in argv
    assert f"virtio-net-pci,netdev=net-eth0,mac={vm.interfaces[0].mac},addr=0x16.0" in argv
    assert "vhost-user-fs-pci,chardev=fs-docs,tag=docs" in argv
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in argv
    assert "vfio-pci,host=0000:01:00.0" in argv
    assert "virtserialport,bus=vser0.0,nr=2,chardev=channel,name=org.vmsilo.channel" in argv
    assert f"socket,id=qmp,path={vm.paths.qmp},server=on,wait=off" in argv
    vsock = qemu_argv(plan, vm, "kvm", vsock=True)
    assert f"vhost-vsock-pci,guest-cid={vm.id}" in vsock and "org.vmsilo.channel" not in " ".join(
        vsock
    )
    assert vsock[vsock.index("-cpu") + 1] == "host"


def test_qemu_windows_go_through_waypipe_by_default() -> None:
    """SPEC §9.1: a QEMU VM shows windows unless ``gpu = false``; the guest learns it from
    ``vmsilo.waypipe=1``, which comes before the user's ``kernelParams`` (they can override
    it) and is not one of the plan's parameters (SPEC §3's list stays crosvm's)."""
    from vmsilo.contracts.cmdline import WAYPIPE_PARAM, parse_cmdline

    plan = plan_of(
        'user = "alice"\n[vms.q]\nhypervisor = "qemu"\nkernelParams = ["quiet"]\n'
        '[vms.g]\nhypervisor = "qemu"\ngpu = true\n'
        '[vms.n]\nhypervisor = "qemu"\ngpu = false\n'
    )

    def append_of(name: str) -> str:
        argv = qemu_argv(plan, plan.vms[name], "tcg")
        return argv[argv.index("-append") + 1]

    for name in ("q", "g"):
        words = append_of(name).split(" ")
        assert words[2] == WAYPIPE_PARAM and WAYPIPE_PARAM not in plan.vms[name].kernel_params
        assert parse_cmdline(append_of(name)).waypipe
    assert append_of("q").split(" ").index("quiet") > 2
    append = append_of("n")
    assert WAYPIPE_PARAM not in append and not parse_cmdline(append).waypipe
    assert not parse_cmdline(append + " " + WAYPIPE_PARAM + " vmsilo.waypipe=0").waypipe
    # gpu = true on QEMU: windows and virgl OpenGL (no longer refused)
    assert "virtio-gpu-gl-pci" in qemu_argv(plan, plan.vms["g"], "tcg")
    assert "virtio-gpu-gl-pci" not in qemu_argv(plan, plan.vms["q"], "tcg")


def test_argv_backend_qemu_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'user = "alice"\nruntimeDir = "{tmp_path}"\n[qemu]\naccel = "tcg"\n[vms.a]\n'
        'hypervisor = "qemu"\n'
    )
    argv = run_vmsilo_json(["-c", str(cfg), "argv", "a"])
    assert argv[0] == "qemu-system-x86_64" and "accel=tcg" in " ".join(argv)
    crosvm = run_vmsilo_json(["-c", str(cfg), "argv", "a", "--backend", "crosvm"])
    assert crosvm[0] == "crosvm" and "run" in crosvm


def _fake_qemu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "qemu-probe"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm to probe")
def test_accel_probe_believes_only_a_real_boot(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    booting = _fake_qemu(tmp_path, 'echo "Kernel panic - not syncing: VFS"\n')
    assert accel.probe_kvm(booting, str(kernel), timeout=5) is True
    failing = _fake_qemu(tmp_path, "echo 'kvm: failed to initialize' >&2; exit 1\n")
    assert accel.probe_kvm(failing, str(kernel), timeout=5) is False
    hanging = _fake_qemu(tmp_path, "exec sleep 30\n")
    assert accel.probe_kvm(hanging, str(kernel), timeout=1) is False


def test_accel_auto_is_cached_in_the_state_dir_per_host_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15.3: the verdict survives a reboot (runtime dir on tmpfs) and is probed again
    only for another host kernel, QEMU build or guest kernel."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    count = tmp_path / "count"
    binary = _fake_qemu(tmp_path, f'echo x >> {count}\necho "Kernel panic"\n')
    plan = plan_of(
        f'user = "alice"\nruntimeDir = "{tmp_path}/run"\nstateDir = "{tmp_path}/state"\n'
        f'[qemu]\nbinary = "{binary}"\n[vms.a]\nhypervisor = "qemu"\nkernel = "{kernel}"\n'
    )
    vm = plan.vms["a"]
    first = accel.resolve_accel(plan, vm)
    second = accel.resolve_accel(plan, vm)
    assert first == second == accel.cached_accel(plan, vm)
    assert not (tmp_path / "run").exists()
    cache = json.loads((tmp_path / "state" / accel.CACHE_NAME).read_text())
    assert list(cache.values()) == [first]
    [key] = cache
    assert os.uname().release in key
    if not (os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.W_OK)):
        assert first == "tcg"
        return
    assert first == "kvm" and count.read_text().count("x") == 1  # probed once
    real = os.uname()
    monkeypatch.setattr(
        accel.os, "uname", lambda: os.uname_result((*real[:2], "9.9.9-other", *real[3:]))
    )
    assert accel.resolve_accel(plan, vm) == "kvm"
    assert count.read_text().count("x") == 2  # a new host kernel is probed again
    assert len(json.loads((tmp_path / "state" / accel.CACHE_NAME).read_text())) == 2


def test_the_probe_is_capped_well_below_twenty_seconds() -> None:
    assert accel.PROBE_TIMEOUT <= 5


def test_explicit_accel_is_not_probed() -> None:
    plan = plan_of('user = "alice"\n[qemu]\naccel = "tcg"\n[vms.a]\nhypervisor = "qemu"\n')
    assert accel.resolve_accel(plan, plan.vms["a"]) == "tcg"
