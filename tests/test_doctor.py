"""`vmsilo doctor`: findings follow what the config needs and what the host has."""

from __future__ import annotations

import json
from pathlib import Path

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
