"""crosvm command line from the plan (SPEC §4), in both flavors.

``upstream`` is google/crosvm as released; ``vmsilo`` is the original module's patched crosvm
(``--no-timestamps``, ``stream-non-blocking``, ``--cid``, the Wayland security context and the
PulseAudio sound backend). Each argv element is built here exactly once, as a list item, so no
value is ever re-split by a shell.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmsilo.contracts.ports import READY_PORT
from vmsilo.plan.model import Plan, VmPlan

SCHEDULING = {
    "full": ["--core-scheduling=true"],
    "vm": ["--per-vm-core-scheduling"],
    "off": ["--core-scheduling=false"],
}


def crosvm_argv(
    plan: Plan,
    vm: VmPlan,
    *,
    extra_params: Sequence[str] = (),
    sound: bool = True,
    restore: str | None = None,
) -> list[str]:
    """crosvm's argv (SPEC §4); ``extra_params``: kernel parameters from host facts;
    ``sound``: whether the host can serve the VM's sound device (SPEC §9.2: without the sound
    daemon a VM that did not ask for sound by name starts without the device); ``restore``:
    a fastStart snapshot to run instead of booting (SPEC §10; ``run --restore``, the same
    devices as the machine it was taken of)."""
    vmsilo = plan.crosvm.flavor == "vmsilo"
    p = vm.paths
    argv = [plan.crosvm.binary, f"--log-level={vm.log_level}", "--no-syslog"]
    if vmsilo:
        argv.append("--no-timestamps")
    argv += vm.extra_args
    argv += ["run", "--name", vm.name, "-m", str(vm.memory)]
    argv += [
        "--hugepages",
        "--balloon-page-reporting",
        "--boost-uclamp",
        "--disable-virtio-intx",
        "--no-i8042",
        "--no-rtc",
        "--s2idle",
    ]
    argv += SCHEDULING[plan.scheduler_isolation]
    argv.append(f"--initrd={vm.initramfs}")
    console = (
        "--serial=hardware=virtio-console,type=unix-stream,"
        f"path={p.console_backend},console,input-unix-stream"
    )
    argv.append(console + (",stream-non-blocking" if vmsilo else ""))
    argv.append(
        "--serial=hardware=virtio-console,num=2,type=unix-stream,"
        f"path={p.ready_socket},name={READY_PORT}"
    )
    for disk in vm.disks:
        argv += ["--block", disk.crosvm_kv]
    for param in (*vm.kernel_params, *extra_params):
        argv += ["-p", param]
    for share in vm.shares:
        argv += ["--vhost-user", f"type=fs,socket={share.socket}"]
    argv += ["--cid", str(vm.id)] if vmsilo else ["--vsock", f"cid={vm.id}"]
    argv += ["--cpus", str(vm.cpus)]
    gpu = vm.gpu
    if gpu is not None:
        argv.append("--gpu=context-types=" + ":".join(gpu.context_types))
        if gpu.vulkan:
            argv.append(f"--gpu-render-server=path={plan.crosvm.render_server}")
        if gpu.wayland and not vmsilo:
            # the VM's filter, not the compositor (SPEC §9.1)
            argv += ["--wayland-sock", gpu.filter_socket]
    if vm.sound.playback and sound:
        if vmsilo:
            argv.append(
                "--virtio-snd=backend=pulse,"
                f"capture={'true' if vm.sound.capture else 'false'},"
                f"pulse_cookie_path={plan.user.home}/.config/pulse/cookie,"
                f"pulse_socket_path={plan.user.runtime_dir}/pulse/native"
            )
        else:
            argv += ["--vhost-user", f"type=sound,socket={p.sound_socket}"]
    argv += ["-s", p.crosvm_control]
    if gpu is not None and gpu.wayland and vmsilo:
        argv += [
            "--wayland-security-context",
            f"wayland_socket={gpu.wayland_socket},app_id=vmsilo:{vm.name}:{vm.color}",
        ]
    for dev in vm.pci_devices:
        argv += ["--vfio", dev.crosvm_kv]
    for i in vm.interfaces:
        argv += ["--net", f"tap-name={i.tap},mac={i.mac},pci-address={i.pci_address}"]
    for vu in vm.vhost_user:
        argv += ["--vhost-user", vu.crosvm_kv]
    argv += vm.extra_run_args
    if restore is not None:
        argv += ["--restore", restore]
    argv.append(vm.kernel)
    return argv


def control_argv(plan: Plan, vm: VmPlan, *words: str) -> list[str]:
    """``crosvm <words...> <control socket>`` — e.g. ``powerbtn``, ``suspend --full`` or
    ``snapshot take PATH`` (the socket is each control command's last positional)."""
    return [plan.crosvm.binary, *words, vm.paths.crosvm_control]
