"""Sound without a VM (SPEC §9.2): what the plan records, the argv each VMM gets with and
without the host's audio server or sound daemon, and what ``status`` says about it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet import plan_of
from vmsilo.backends import crosvm_backend, qemu_backend
from vmsilo.backends.base import HostFacts, SoundFacts
from vmsilo.backends.crosvm import crosvm_argv
from vmsilo.backends.crosvm_backend import CROSVM
from vmsilo.backends.qemu import qemu_argv
from vmsilo.backends.qemu_backend import QEMU, QemuVmm
from vmsilo.lifecycle.status import sound_text

CONFIG = """
user = "alice"
[vms.dflt]
[vms.said]
sound = { playback = true }
[vms.cap]
sound = { capture = true }
[vms.off]
sound = { playback = false }
[vms.q]
hypervisor = "qemu"
[vms.qplay]
hypervisor = "qemu"
sound = { playback = true }
[vms.qcap]
hypervisor = "qemu"
sound = { capture = true }
"""


def test_the_plan_records_whether_sound_was_written() -> None:
    plan = plan_of(CONFIG)
    got = {n: (v.sound.playback, v.sound.capture, v.sound.explicit) for n, v in plan.vms.items()}
    assert got == {
        "cap": (True, True, True),
        "dflt": (True, False, False),  # crosvm's default: on, but not asked for by name
        "off": (False, False, False),
        "q": (False, False, False),  # QEMU's default stays off (SPEC §2)
        "qcap": (True, True, True),
        "qplay": (True, False, True),
        "said": (True, False, True),
    }


def test_qemu_plays_through_hda_to_the_users_server() -> None:
    plan = plan_of(CONFIG)
    argv = qemu_argv(plan, plan.vms["qplay"])
    assert argv[-6:] == [
        "-audiodev",
        "pa,id=snd0,server=unix:/run/user/1000/pulse/native",
        "-device",
        "intel-hda,id=hda0",
        "-device",
        "hda-output,bus=hda0.0,audiodev=snd0,mixer=off",
    ]
    # capture: a duplex codec; without it the guest has no input at all (hda-output)
    assert qemu_argv(plan, plan.vms["qcap"])[-1] == "hda-duplex,bus=hda0.0,audiodev=snd0,mixer=off"
    assert not any("audiodev" in w or "hda" in w for w in qemu_argv(plan, plan.vms["q"]))


def test_qemu_without_an_audio_server_keeps_the_same_devices() -> None:
    """QEMU 7.2 exits at once when ``pa`` cannot connect: ``none`` behind the same card."""
    plan = plan_of(CONFIG)
    vm = plan.vms["qcap"]
    with_server = qemu_argv(plan, vm)
    without = qemu_argv(plan, vm, audio_server=False)
    assert without[-5] == "none,id=snd0"
    assert without[:-5] == with_server[:-5] and without[-4:] == with_server[-4:]
    # the backend passes the fact through
    facts = HostFacts(sound=SoundFacts(True, False, "no audio server"))
    assert QEMU.argv(plan, vm, facts) == without


def test_qemu_gets_the_users_cookie() -> None:
    plan = plan_of(CONFIG)
    env = QemuVmm(plan, plan.vms["qplay"], []).env()
    assert env is not None and env["PULSE_COOKIE"] == "/home/alice/.config/pulse/cookie"
    assert QemuVmm(plan, plan.vms["q"], []).env() is None


def test_qemu_sound_facts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plan = plan_of(CONFIG)
    monkeypatch.setattr(qemu_backend.sound, "qemu_pa_module", lambda: None)
    facts = QEMU.sound_facts(plan, plan.vms["qplay"])
    assert (facts.device, facts.server) == (True, False) and "qemu-system-gui" in str(facts.why)
    monkeypatch.setattr(qemu_backend.sound, "qemu_pa_module", lambda: "/x/audio-pa.so")
    facts = QEMU.sound_facts(plan, plan.vms["qplay"])
    assert facts.why == "no audio server at /run/user/1000/pulse/native"
    monkeypatch.setattr(qemu_backend.sound, "is_socket", lambda p: True)
    assert QEMU.sound_facts(plan, plan.vms["qplay"]).available
    assert not QEMU.sound_facts(plan, plan.vms["q"]).device


def test_crosvm_without_the_sound_daemon_has_no_sound_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = plan_of(CONFIG)
    vm = plan.vms["dflt"]
    words = ["--vhost-user", "type=sound,socket=/run/vmsilo/dflt-sound.socket"]
    full = crosvm_argv(plan, vm)
    at = full.index(words[1]) - 1
    assert full[at : at + 2] == words
    assert crosvm_argv(plan, vm, sound=False) == full[:at] + full[at + 2 :]
    monkeypatch.setattr(crosvm_backend.sound, "find_program", lambda name: None)
    facts = CROSVM.sound_facts(plan, vm)
    assert not facts.device and "vhost-device-sound (crosvm.soundDevice) not found" in str(
        facts.why
    )
    assert CROSVM.argv(plan, vm, HostFacts(sound=facts)) == full[:at] + full[at + 2 :]
    assert CROSVM.sound_sidecar(plan, vm, HostFacts(sound=facts)) is None


def test_crosvm_sound_daemon_plays_into_null_without_pipewire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = plan_of(CONFIG)
    vm = plan.vms["dflt"]
    monkeypatch.setattr(crosvm_backend.sound, "find_program", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(crosvm_backend.sound, "is_socket", lambda p: False)
    facts = CROSVM.sound_facts(plan, vm)
    assert (facts.device, facts.server) == (True, False)
    sidecar = CROSVM.sound_sidecar(plan, vm, HostFacts(sound=facts))
    assert sidecar is not None
    assert sidecar.argv(5) == [
        "/usr/bin/vhost-device-sound",
        "--socket-fd=5",
        "--backend=null",
    ]
    assert (sidecar.uid, sidecar.socket) == (1000, "/run/vmsilo/dflt-sound.socket")
    monkeypatch.setattr(crosvm_backend.sound, "is_socket", lambda p: True)
    sidecar = CROSVM.sound_sidecar(plan, vm, HostFacts(sound=CROSVM.sound_facts(plan, vm)))
    assert sidecar is not None and sidecar.backend == "pipewire"
    assert ("XDG_RUNTIME_DIR", "/run/user/1000") in sidecar.env


def test_status_says_why_sound_is_unavailable() -> None:
    plan = plan_of(CONFIG)
    assert sound_text(plan.vms["off"], None, None) == "off"
    assert sound_text(plan.vms["qcap"], None, SoundFacts()) == "playback and capture"
    assert sound_text(plan.vms["qplay"], {"available": True, "why": None}, None) == "playback"
    gone = SoundFacts(True, False, "no audio server at /run/user/1000/pulse/native")
    assert (
        sound_text(plan.vms["qplay"], {"available": True, "why": None}, gone)
        == "unavailable: no audio server at /run/user/1000/pulse/native"
    )
    recorded = {"available": False, "why": "vhost-device-sound not found"}
    assert sound_text(plan.vms["dflt"], recorded, SoundFacts()) == (
        "unavailable: vhost-device-sound not found"
    )


def test_guest_finds_its_sound_card_by_bus(tmp_path: Path) -> None:
    from vmsilo.guest.sound import sound_modules

    pci = tmp_path / "bus" / "pci" / "devices"
    for name, cls in (("0000:00:01.0", "0x020000"), ("0000:00:02.0", "0x040300")):
        (pci / name).mkdir(parents=True)
        (pci / name / "class").write_text(cls + "\n")
    assert sound_modules(str(tmp_path)) == ("snd_hda_intel", "snd_hda_codec_generic")
    (pci / "0000:00:02.0" / "class").write_text("0x010000\n")
    assert sound_modules(str(tmp_path)) == ()
    virtio = tmp_path / "bus" / "virtio" / "devices" / "virtio3"
    virtio.mkdir(parents=True)
    (virtio / "device").write_text("0x0019\n")
    assert sound_modules(str(tmp_path)) == ("virtio_snd",)


def test_guest_pulse_script_has_an_input_only_with_a_capture_pcm() -> None:
    from vmsilo.guest.sound import SERVER_SOCKET, parse_uevent, pulse_script

    out = pulse_script(capture=False)
    assert "module-alsa-sink device=hw:0,0" in out and "alsa-source" not in out
    assert "set-sink-volume vmsilo_out 65536" in out  # volume 1.0
    assert f"socket={SERVER_SOCKET}" in out
    both = pulse_script(capture=True)
    assert "module-alsa-source device=hw:0,0" in both
    assert "set-source-volume vmsilo_in 65536" in both
    ev = parse_uevent(
        b"add@/devices/x/sound/card0/pcmC0D0p\0ACTION=add\0SUBSYSTEM=sound\0DEVNAME=snd/pcmC0D0p\0"
    )
    assert ev == {"ACTION": "add", "SUBSYSTEM": "sound", "DEVNAME": "snd/pcmC0D0p"}
