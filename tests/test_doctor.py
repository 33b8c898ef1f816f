"""`vmsilo doctor`: findings follow what the config needs and what the host has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet import run_vmsilo


def _cfg(tmp_path: Path, body: str) -> str:
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text(
        f'user = "alice"\nstateDir = "{tmp_path}/state"\nruntimeDir = "{tmp_path}/run"\n' + body
    )
    return str(cfg)


def test_missing_vmm_and_image_fail_with_hints(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, '[crosvm]\nbinary = "/nonexistent/crosvm"\n[vms.a]\n')
    status, out, err = run_vmsilo(["-c", cfg, "doctor", "--json"])
    assert status == 1, err
    report = json.loads(out)
    by_check = {f["check"]: f for f in report["findings"]}
    assert report["ok"] is False
    assert by_check["/nonexistent/crosvm"]["level"] == "fail"
    assert by_check["image default"]["level"] == "fail"
    assert by_check["image default"]["hint"] == "vmsilo image build default"


def test_only_needed_checks_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, '[vms.q]\nhypervisor = "qemu"\nsharedHome = false\n')
    _, out, _ = run_vmsilo(["-c", cfg, "doctor", "--json"])
    checks = {f["check"] for f in json.loads(out)["findings"]}
    assert "/dev/net/tun" not in checks  # no interfaces configured
    assert "virtiofsd" not in checks  # no shares
    assert "IOMMU" not in checks  # no passthrough
    cfg = _cfg(
        tmp_path,
        '[vms.q]\nhypervisor = "qemu"\nnetwork.netvm = "host"\n'
        'pciDevices = [{ path = "01:00.0" }]\n',
    )
    _, out, _ = run_vmsilo(["-c", cfg, "doctor", "--json"])
    checks = {f["check"] for f in json.loads(out)["findings"]}
    assert {"/dev/net/tun", "virtiofsd", "IOMMU"} <= checks


def test_human_output(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, '[vms.q]\nhypervisor = "qemu"\n')
    status, out, _ = run_vmsilo(["-c", cfg, "doctor"])
    assert "vmsilo doctor" in out and "image default" in out
    assert status == 1  # the image is not built in this temp state dir


def test_a_missing_share_directory_fails_before_any_start(tmp_path: Path) -> None:
    """Issue 15.10: start used to be the first to say so."""
    (tmp_path / "docs").mkdir()
    cfg = _cfg(
        tmp_path,
        '[vms.q]\nhypervisor = "qemu"\n'
        f'sharedDirectories.docs = {{ path = "{tmp_path}/docs", mountPoint = "/mnt/docs" }}\n'
        f'sharedDirectories.gone = {{ path = "{tmp_path}/gone", mountPoint = "/mnt/gone" }}\n',
    )
    _, out, _ = run_vmsilo(["-c", cfg, "doctor", "--json"])
    by_check = {f["check"]: f for f in json.loads(out)["findings"]}
    gone = by_check["share q/gone"]
    assert gone["level"] == "fail" and f"{tmp_path}/gone does not exist" in gone["detail"]
    assert gone["hint"] == "create it, or fix vms.q.sharedDirectories.gone.path"
    assert "share q/docs" not in by_check and "share q/home" not in by_check
    (tmp_path / "gone").mkdir()
    _, out, _ = run_vmsilo(["-c", cfg, "doctor", "--json"])
    by_check = {f["check"]: f for f in json.loads(out)["findings"]}
    assert by_check["shares"]["level"] == "ok"


def test_nftables_is_checked_for_netvm_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, '[vms.q]\nhypervisor = "qemu"\nnetwork.netvm = "host"\n')
    _, out, _ = run_vmsilo(["-c", cfg, "doctor", "--json"])
    nft = {f["check"]: f for f in json.loads(out)["findings"]}["nft"]
    assert nft["level"] == "ok" and "needed by q" in nft["detail"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no nft on PATH
    _, out, _ = run_vmsilo(["-c", cfg, "doctor", "--json"])
    nft = {f["check"]: f for f in json.loads(out)["findings"]}["nft"]
    assert nft["level"] == "fail" and nft["hint"] == "apt-get install nftables"
    alone = _cfg(tmp_path, '[vms.q]\nhypervisor = "qemu"\n')
    _, out, _ = run_vmsilo(["-c", alone, "doctor", "--json"])
    assert "nft" not in {f["check"] for f in json.loads(out)["findings"]}


def test_windows_need_a_compositor_and_waypipe(tmp_path: Path) -> None:
    """QEMU VMs show windows through waypipe (SPEC §9.1): doctor names the compositor socket
    and waypipe, warns (never fails) when either is missing, and says nothing without gpu."""
    import shutil
    import socket

    sock = tmp_path / "wayland-7"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    try:
        body = (
            f'[vms.q]\nhypervisor = "qemu"\nsharedHome = false\n'
            f'gpu = {{ wayland = true, waylandSocket = "{sock}" }}\n'
            '[vms.r]\nhypervisor = "qemu"\nsharedHome = false\n'
            f'gpu = {{ wayland = true, waylandSocket = "{tmp_path}/none" }}\n'
            '[vms.s]\nhypervisor = "qemu"\nsharedHome = false\ngpu = false\n'
        )
        _, out, _ = run_vmsilo(["-c", _cfg(tmp_path, body), "doctor", "--json"])
    finally:
        listener.close()
    findings = [f for f in json.loads(out)["findings"] if f["check"] == "Wayland compositor"]
    by_level = {f["level"]: f["detail"] for f in findings}
    assert by_level["ok"] == f"{sock} (windows of q)"  # s has no gpu: not listed
    assert by_level["warn"].startswith(f"no socket at {tmp_path}/none: window programs in r fail")
    assert len(findings) == 2
    waypipe = [f for f in json.loads(out)["findings"] if f["check"] == "waypipe"]
    assert len(waypipe) == 1
    assert waypipe[0]["level"] == ("ok" if shutil.which("waypipe") else "warn")
    assert "q, r" in waypipe[0]["detail"]
