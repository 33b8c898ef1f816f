"""The guest's sound (SPEC §9.2): the card's driver, its device nodes, and a PulseAudio for the
VM user that every program reaches — ``paplay`` directly, ALSA programs (``aplay``,
``speaker-test``) through ALSA's pulse plugin as their default device.

Only a VM with a sound card pays for any of this: :func:`sound_modules` reads the PCI and
virtio buses (an Intel HDA controller under QEMU, virtio-snd under crosvm) and the init starts
:func:`main` only when it names a driver.

No udev runs in the guest, so devtmpfs creates ``/dev/snd/*`` as root 0600 and nothing hands
them to the user. The helper therefore listens to the kernel's uevents (bound before the
driver is loaded: no event is missed), hands each sound node to the VM user as it appears,
and starts PulseAudio once the card is complete (its control device, which ALSA registers after
the card's PCMs) — woken by the kernel, never polling.
It stays PulseAudio's parent, handing on nodes that come later, until PulseAudio exits.

The server's socket is bound by PID 1 before the agent says hello (:func:`bind_server`), and
PulseAudio takes it over through systemd-style socket activation (``LISTEN_FDS``): a program
that a ``vm-run`` starts right after the VM is ready waits in the socket's backlog instead of
finding no server. No capture device exists unless the host gave one (QEMU's ``hda-output``
has no input); the helper loads a source only when the card has a capture PCM.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence

#: The card's drivers by bus: Intel HDA (PCI class 0x0403) and virtio-snd (virtio id 25).
HDA_MODULES = ("snd_hda_intel", "snd_hda_codec_generic")
VIRTIO_SND_MODULES = ("virtio_snd",)
PCI_AUDIO_CLASS = "0x0403"
VIRTIO_SOUND_ID = "0x0019"

RUN_DIR = "/run/vmsilo/pulse"
SERVER_SOCKET = f"{RUN_DIR}/native"
#: Every client (the VM user's programs, ALSA's pulse plugin, root's) finds the server here.
CLIENT_CONF = f"default-server = unix:{SERVER_SOCKET}\nautospawn = no\n"
ASOUND_CONF = "pcm.!default {\n  type pulse\n}\nctl.!default {\n  type pulse\n}\n"
#: Full volume (1.0): the host's mixer is where the user turns it down.
FULL_VOLUME = 65536
#: How long the card may take to show its first PCM after its driver is loaded (a guard for a
#: card that never comes, not a poll: every wake-up is a kernel event).
CARD_TIMEOUT = 60.0

NETLINK_KOBJECT_UEVENT = 15
PULSEAUDIO = "/usr/bin/pulseaudio"
CONTROL_NODE = "/dev/snd/controlC0"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def sound_modules(sys_root: str = "/sys") -> tuple[str, ...]:
    """The drivers of the sound cards this VM has (empty: no sound card)."""
    found: list[str] = []
    pci = f"{sys_root}/bus/pci/devices"
    with contextlib.suppress(OSError):
        if any(_read(f"{pci}/{d}/class").startswith(PCI_AUDIO_CLASS) for d in os.listdir(pci)):
            found += HDA_MODULES
    virtio = f"{sys_root}/bus/virtio/devices"
    with contextlib.suppress(OSError):
        if any(_read(f"{virtio}/{d}/device") == VIRTIO_SOUND_ID for d in os.listdir(virtio)):
            found += VIRTIO_SND_MODULES
    return tuple(found)


def pulse_script(capture: bool) -> str:
    """PulseAudio's startup script: the card's output (and input, when it has one), the
    native protocol on :data:`SERVER_SOCKET` for every local client, volume 1.0."""
    lines = [
        "load-module module-alsa-sink device=hw:0,0 sink_name=vmsilo_out tsched=0",
        "set-default-sink vmsilo_out",
    ]
    if capture:
        lines += [
            "load-module module-alsa-source device=hw:0,0 source_name=vmsilo_in tsched=0",
            "set-default-source vmsilo_in",
        ]
    lines += [
        "load-module module-native-protocol-unix auth-anonymous=1 auth-cookie-enabled=0"
        f" socket={SERVER_SOCKET}",
        "load-module module-suspend-on-idle",
        f"set-sink-volume vmsilo_out {FULL_VOLUME}",
        "set-sink-mute vmsilo_out 0",
    ]
    if capture:
        lines += [f"set-source-volume vmsilo_in {FULL_VOLUME}", "set-source-mute vmsilo_in 0"]
    return "\n".join(lines) + "\n"


def pulse_argv(script: str) -> list[str]:
    return [
        PULSEAUDIO,
        "--daemonize=no",
        "--system=no",
        "--use-pid-file=no",
        "--exit-idle-time=-1",
        "--realtime=no",
        "--high-priority=no",
        "--log-target=stderr",
        "--log-level=error",  # not its D-Bus warnings: the guest has no session bus
        "--resample-method=trivial",
        "-n",
        "-F",
        script,
    ]


def parse_uevent(data: bytes) -> dict[str, str]:
    """A kernel uevent (``ACTION@DEVPATH\\0KEY=VALUE\\0…``) as its keys."""
    fields: dict[str, str] = {}
    for part in data.split(b"\0")[1:]:
        key, eq, value = part.partition(b"=")
        if eq:
            fields[key.decode(errors="replace")] = value.decode(errors="replace")
    return fields


def bind_server(uid: int, gid: int) -> socket.socket:
    """PulseAudio's listening socket, owned by the VM user (PID 1 binds it before the agent
    says hello; PulseAudio inherits it)."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    os.chown(RUN_DIR, uid, gid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SERVER_SOCKET)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(SERVER_SOCKET)
    os.chown(SERVER_SOCKET, uid, gid)
    os.chmod(SERVER_SOCKET, 0o777)  # any local program may play (auth-anonymous)
    sock.listen(64)
    return sock


def write_client_config(root: str = "") -> None:
    """Point libpulse (hence ALSA's pulse plugin) of every account at the server."""
    for path, text in (
        (f"{root}/etc/pulse/client.conf.d/vmsilo.conf", CLIENT_CONF),
        (f"{root}/etc/asound.conf", ASOUND_CONF),
    ):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _log(message: str) -> None:
    print(f"vmsilo sound: {message}", file=sys.stderr, flush=True)


def _give(node: str, uid: int, gid: int) -> None:
    with contextlib.suppress(OSError):
        os.chown(node, uid, gid)
        os.chmod(node, 0o660)


def _existing_nodes() -> Iterator[str]:
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/dev/snd")):
            yield f"/dev/snd/{name}"


def _events(sock: socket.socket, deadline: float | None) -> Iterator[dict[str, str]]:
    """Sound uevents as they come (until ``deadline``, monotonic)."""
    while True:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            return
        sock.settimeout(timeout)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            return
        ev = parse_uevent(data)
        if ev.get("SUBSYSTEM") == "sound":
            yield ev


def _drain(sock: socket.socket) -> Iterator[dict[str, str]]:
    """The sound uevents already queued (without waiting for more)."""
    sock.setblocking(False)  # MSG_DONTWAIT alone would still wait out a socket timeout
    while True:
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        ev = parse_uevent(data)
        if ev.get("SUBSYSTEM") == "sound":
            yield ev


def _spawn_pulse(uid: int, gid: int, server_fd: int, script: str) -> int:
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        os.dup2(server_fd, 3)
        os.set_inheritable(3, True)
        os.closerange(4, 1024)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": RUN_DIR,
            "XDG_RUNTIME_DIR": RUN_DIR,
            "PULSE_RUNTIME_PATH": RUN_DIR,
            "PULSE_STATE_PATH": f"{RUN_DIR}/state",
            "LISTEN_FDS": "1",
            "LISTEN_PID": str(os.getpid()),
            "LANG": "C.UTF-8",
        }
        os.execve(PULSEAUDIO, pulse_argv(script), env)
    finally:
        os._exit(127)


def main(uid: int, gid: int, server_fd: int, modules: Sequence[str]) -> int:
    """The sound helper (a child of PID 1): driver, nodes, PulseAudio; PulseAudio's status."""
    uevents = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    uevents.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    uevents.bind((0, 1))  # before the driver loads: its events are queued for us
    write_client_config()
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/busybox", ["busybox", "modprobe", "-a", *modules])
    os.waitpid(pid, 0)
    for node in _existing_nodes():
        _give(node, uid, gid)
    deadline = time.monotonic() + CARD_TIMEOUT
    # ALSA registers a card's control device after all its others (PCMs, hwdep): once
    # controlC0 exists, the card is complete and what it has (a capture PCM or not) is known
    if not os.path.exists(CONTROL_NODE):
        for ev in _events(uevents, deadline):
            if "DEVNAME" in ev:
                _give(f"/dev/{ev['DEVNAME']}", uid, gid)
            if ev.get("DEVNAME") == CONTROL_NODE.removeprefix("/dev/"):
                break
        else:
            _log(f"no sound card appeared within {CARD_TIMEOUT:.0f} s ({', '.join(modules)})")
            return 1
    for node in _existing_nodes():  # those that came before we listened, or between
        _give(node, uid, gid)
    if not os.path.exists("/dev/snd/pcmC0D0p"):
        _log("the sound card has no playback device")
        return 1
    capture = os.path.exists("/dev/snd/pcmC0D0c")
    script = f"{RUN_DIR}/vmsilo.pa"
    with open(script, "w") as f:
        f.write(pulse_script(capture))
    os.makedirs(f"{RUN_DIR}/state", exist_ok=True)
    os.chown(f"{RUN_DIR}/state", uid, gid)
    pulse = _spawn_pulse(uid, gid, server_fd, script)
    _log(f"PulseAudio started (pid {pulse}), {'playback and capture' if capture else 'playback'}")
    for ev in _events_until_exit(uevents, pulse):
        if "DEVNAME" in ev:
            _give(f"/dev/{ev['DEVNAME']}", uid, gid)
    _, status = os.waitpid(pulse, 0)
    return os.waitstatus_to_exitcode(status)


def _events_until_exit(sock: socket.socket, pid: int) -> Iterator[dict[str, str]]:
    """Sound uevents until process ``pid`` (our child) exits: one wait on both, through a
    pidfd, so neither is polled."""
    import selectors

    pidfd = os.pidfd_open(pid)
    sock.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        sel.register(sock, selectors.EVENT_READ, "uevent")
        while True:
            for key, _ in sel.select():
                if key.data == "exit":
                    os.close(pidfd)
                    return
                yield from _drain(sock)
