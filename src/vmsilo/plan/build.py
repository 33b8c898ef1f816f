"""Build the :class:`~vmsilo.plan.model.Plan` from a validated config (pure; no I/O).

The only outside input is the host user's ids, through the injectable lookup. Problems that can
only be seen once values are derived (duplicate taps, too many interfaces, an over-long kernel
command line) are checked by :func:`vmsilo.plan.checks.check_plan` before the plan is returned,
so a plan that exists is a plan that can be launched.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from vmsilo.backends.features import table as feature_table
from vmsilo.config.model import Config, GpuConfig, ImageConfig, Interface, VmConfig
from vmsilo.config.problems import ConfigErrors, Problem, raise_if_any
from vmsilo.config.types import is_bdf, normalize_bdf
from vmsilo.config.users import UserLookup, system_users
from vmsilo.contracts import cmdline
from vmsilo.defaults import DEFAULT_IMAGE, command_socket
from vmsilo.plan.checks import check_plan
from vmsilo.plan.derive import (
    IF_INDEX_BASE,
    generated_mac,
    netvm_side_ifname,
    pci_address,
    sort_key,
    tap_name,
    vm_ids,
)
from vmsilo.plan.links import allocate_links
from vmsilo.plan.model import (
    CrosvmSettings,
    DiskPlan,
    GpuPlan,
    HostUserPlan,
    ImagePlan,
    InterfacePlan,
    KvValue,
    NetvmLink,
    PciDevicePlan,
    Plan,
    QemuSettings,
    Route,
    RuntimePaths,
    SharePlan,
    SoundPlan,
    VhostUserPlan,
    VmPlan,
)

DEFAULT_BLOCK_OPTIONS: dict[str, KvValue] = {"direct": True, "packed-queue": True}
EPHEMERAL_ID = cmdline.EPHEMERAL_DISK_ID


@dataclass
class _Injected:
    """Interfaces a netvm link adds to one VM (before sorting and numbering)."""

    interfaces: list[tuple[str, Interface, str]] = field(default_factory=list)  # name, iface, peer


def build_plan(config: Config, users: UserLookup = system_users) -> Plan:
    """The plan of ``config``; raises :class:`ConfigErrors` listing every derived problem."""
    host_user = users(config.user)
    if host_user is None:
        raise ConfigErrors([Problem("user", f"no host user named {config.user!r}", "create it")])
    user = HostUserPlan(
        host_user.name, host_user.uid, host_user.gid, host_user.home, host_user.runtime_dir
    )
    problems: list[Problem] = []
    ids = vm_ids(list(config.vms))
    links = allocate_links(
        {n: vm.network.netvm for n, vm in config.vms.items() if vm.network.netvm is not None},
        {
            n: vm.network.netvm_subnet
            for n, vm in config.vms.items()
            if vm.network.netvm is not None and vm.network.netvm_subnet is not None
        },
        ids,
        config.netvm_range,
        problems,
    )
    injected = _inject_links(links, ids)
    clients: dict[str, list[str]] = {}
    for link in links:
        clients.setdefault(link.netvm, []).append(link.client)

    images = {
        name: ImagePlan(
            name=name,
            suite=img.suite,
            packages=tuple(img.packages),
            directory=posixpath.join(config.state_dir, "images", name),
            current=posixpath.join(config.state_dir, "images", name, "current"),
        )
        for name, img in {DEFAULT_IMAGE: ImageConfig(), **config.images}.items()
    }

    vms: dict[str, VmPlan] = {}
    for name in sorted(config.vms, key=sort_key):
        vms[name] = _plan_vm(
            config,
            name,
            config.vms[name],
            ids[name],
            user,
            injected.get(name, _Injected()),
            tuple(clients.get(name, ())),
            images[config.vms[name].image],
        )
    plan = Plan(
        user=user,
        vms=vms,
        links=tuple(links),
        images=images,
        scheduler_isolation=config.scheduler_isolation,
        isolated_pci_devices=tuple(config.isolated_pci_devices),
        netvm_range=config.netvm_range,
        state_dir=config.state_dir,
        runtime_dir=config.runtime_dir,
        shared_root=config.shared_root,
        crosvm=CrosvmSettings(
            binary=config.crosvm.binary,
            flavor=config.crosvm.flavor,
            render_server=config.crosvm.render_server,
            sound_device=config.crosvm.sound_device,
        ),
        qemu=QemuSettings(binary=config.qemu.binary, accel=config.qemu.accel),
    )
    problems += check_plan(plan, config)
    raise_if_any(problems)
    return plan


def _inject_links(links: list[NetvmLink], ids: dict[str, int]) -> dict[str, _Injected]:
    out: dict[str, _Injected] = {}
    for link in links:
        client = out.setdefault(link.client, _Injected())
        upstream = Interface.model_validate(
            {
                "addresses": [f"{link.client_address}/31"],
                "routes": {"0.0.0.0/0": {"via": link.gateway}},
                "tap": (
                    {"hostAddress": f"{link.gateway}/31"}
                    if link.netvm == "host"
                    else {"bridge": link.bridge}
                ),
            }
        )
        client.interfaces.append(("upstream", upstream, link.netvm))
        if link.netvm != "host":
            gw = out.setdefault(link.netvm, _Injected())
            ifname = netvm_side_ifname(link.client, ids[link.client])
            side = Interface.model_validate(
                {"addresses": [f"{link.gateway}/31"], "tap": {"bridge": link.bridge}}
            )
            gw.interfaces.append((ifname, side, link.client))
    return out


def _plan_vm(
    config: Config,
    name: str,
    vm: VmConfig,
    vm_id: int,
    user: HostUserPlan,
    injected: _Injected,
    netvm_clients: tuple[str, ...],
    image: ImagePlan,
) -> VmPlan:
    R, S = config.runtime_dir, config.state_dir
    paths = RuntimePaths(
        command_socket=command_socket(R, name),
        console=f"{R}/{name}-console",
        console_backend=f"{R}/{name}-console-backend.socket",
        ready_socket=f"{R}/{name}-ready.socket",
        channel_socket=f"{R}/{name}-channel.socket",
        crosvm_control=f"{R}/{name}-crosvm-control.socket",
        qmp=f"{R}/{name}-qmp.socket",
        sound_socket=f"{R}/{name}-sound.socket",
        plan_snapshot=f"{R}/{name}.plan.json",
        state_file=f"{R}/{name}.state.json",
        lock=f"{R}/{name}.lock",
        spawn_lock=f"{R}/{name}.spawn.lock",
        supervisor_log=f"{R}/{name}.supervisor.log",
        ephemeral_disk=f"{S}/{name}-ephemeral.raw",
        console_log=f"{S}/{name}-console.log",
    )

    # Interfaces: the user's plus the injected ones, sorted by name, numbered from slot 22.
    all_ifaces: list[tuple[str, Interface, str | None]] = [
        (n, i, None) for n, i in vm.network.interfaces.items()
    ]
    all_ifaces += injected.interfaces
    all_ifaces.sort(key=lambda t: sort_key(t[0]))
    interfaces = []
    for pos, (ifname, iface, peer) in enumerate(all_ifaces):
        if_index = IF_INDEX_BASE + pos
        interfaces.append(
            InterfacePlan(
                name=ifname,
                if_index=if_index,
                pci_address=pci_address(if_index),
                mac=iface.mac_address or generated_mac(name, ifname),
                tap=iface.tap.name or tap_name(name, vm_id, if_index),
                host_address=iface.tap.host_address,
                bridge=iface.tap.bridge,
                dhcp=iface.dhcp,
                addresses=tuple(iface.addresses),
                v6_addresses=tuple(iface.v6_addresses),
                routes=tuple(
                    Route(d, r.via) for d, r in sorted(iface.routes.items(), key=_by_dest)
                ),
                v6_routes=tuple(
                    Route(d, r.via) for d, r in sorted(iface.v6_routes.items(), key=_by_dest)
                ),
                injected_for=peer,
            )
        )

    shares = _shares(config, name, vm, R)
    disks = _disks(vm, image, paths)
    gpu = _gpu(name, vm, user)
    sound = _sound(vm)
    auto_after = vm.auto_shutdown.after if vm.auto_shutdown.enable else None

    params = cmdline.encode(
        cmdline.KernelParams(
            hostname=name,
            uid=user.uid,
            gid=user.gid,
            interfaces=tuple(_kernel_interface(i) for i in interfaces),
            nameservers=tuple(vm.network.nameservers),
            auto_shutdown_after=auto_after,
            root_overlay=vm.root_overlay.type,
            shares=tuple(cmdline.Share(s.tag, s.mount_point, s.read_only) for s in shares),
            extra=tuple(vm.kernel_params),
        )
    )

    return VmPlan(
        name=name,
        id=vm_id,
        hypervisor=vm.hypervisor,
        memory=vm.memory,
        cpus=vm.cpus,
        color=vm.color,
        image=vm.image,
        kernel=vm.kernel or f"{image.current}/vmlinuz",
        initramfs=vm.initramfs or f"{image.current}/initrd.img",
        disks=disks,
        interfaces=tuple(interfaces),
        kernel_params=tuple(params),
        shares=shares,
        gpu=gpu,
        sound=sound,
        pci_devices=tuple(_pci(d.crosvm_items()) for d in vm.pci_devices),
        vhost_user=tuple(
            VhostUserPlan(tuple(sorted(v.crosvm_items().items()))) for v in vm.vhost_user
        ),
        root_overlay=vm.root_overlay.type,
        root_overlay_size=vm.root_overlay.size,
        auto_shutdown_after=auto_after,
        nameservers=tuple(vm.network.nameservers),
        netvm=vm.network.netvm,
        is_netvm=vm.network.is_netvm,
        netvm_clients=netvm_clients,
        start_timeout=vm.start_timeout or config.start_timeout,
        stop_timeout=vm.stop_timeout or config.stop_timeout,
        log_level=vm.crosvm.log_level or config.crosvm.log_level,
        extra_args=(*config.crosvm.extra_args, *vm.crosvm.extra_args),
        extra_run_args=(*config.crosvm.extra_run_args, *vm.crosvm.extra_run_args),
        paths=paths,
        service_unit=f"vmsilo-{name}-vm.service",
        socket_unit=f"vmsilo-{name}-command.socket",
        not_applied=feature_table(vm.hypervisor).not_applied,
        desktop_entries=None if vm.desktop_entries is None else tuple(vm.desktop_entries),
        fast_start=vm.fast_start,
    )


def _by_dest(item: tuple[str, object]) -> bytes:
    return sort_key(item[0])


def _kernel_interface(i: InterfacePlan) -> cmdline.NetInterface:
    return cmdline.NetInterface(
        name=i.name,
        mac=i.mac,
        dhcp=i.dhcp,
        addresses=i.addresses,
        v6_addresses=i.v6_addresses,
        routes=tuple((r.dest, r.via) for r in i.routes),
        v6_routes=tuple((r.dest, r.via) for r in i.v6_routes),
    )


def _shares(config: Config, name: str, vm: VmConfig, runtime_dir: str) -> tuple[SharePlan, ...]:
    entries = [
        (tag, d.path, d.mount_point, d.read_only) for tag, d in vm.shared_directories.items()
    ]
    if vm.shared_home is not False:
        home = (
            vm.shared_home
            if isinstance(vm.shared_home, str)
            else posixpath.join(config.shared_root, name)
        )
        entries.append(("home", home, "/home/user", False))
    entries.sort(key=lambda e: sort_key(e[0]))
    return tuple(
        SharePlan(tag, path, mount, ro, f"{runtime_dir}/{name}-virtiofsd-{tag}.socket")
        for tag, path, mount, ro in entries
    )


def _block(role: str, items: dict[str, KvValue]) -> DiskPlan:
    options = {**DEFAULT_BLOCK_OPTIONS, **items}
    path = str(options.pop("path"))
    block_id = options.get("id")
    return DiskPlan(
        role=role,  # type: ignore[arg-type]
        path=path,
        options=tuple(sorted(options.items())),
        read_only=bool(options.get("ro", False)),
        block_id=str(block_id) if block_id is not None else None,
    )


def _disks(vm: VmConfig, image: ImagePlan, paths: RuntimePaths) -> tuple[DiskPlan, ...]:
    if vm.root_disk is not None:
        root = _block("root", vm.root_disk.crosvm_items())
    else:
        root = _block("root", {"path": f"{image.current}/root.erofs", "ro": vm.root_disk_readonly})
    disks = [root] + [_block("additional", d.crosvm_items()) for d in vm.additional_disks]
    if vm.root_overlay.type == "raw":
        disks.append(
            _block("ephemeral", {"path": paths.ephemeral_disk, "id": EPHEMERAL_ID, "ro": False})
        )
    return tuple(disks)


def _gpu(vm_name: str, vm: VmConfig, user: HostUserPlan) -> GpuPlan | None:
    setting = vm.gpu
    if setting is None:
        default = feature_table(vm.hypervisor).default_gpu
        on = dict(default)
        setting = (
            GpuConfig(
                wayland=on.get("wayland", False),
                opengl=on.get("opengl", False),
                vulkan=on.get("vulkan", False),
            )
            if on
            else False
        )
    if setting is False:
        return None
    table = GpuConfig(wayland=True, opengl=True) if setting is True else setting
    assert isinstance(table, GpuConfig)
    return GpuPlan(
        wayland=table.wayland,
        opengl=table.opengl,
        vulkan=table.vulkan,
        wayland_socket=table.wayland_socket or f"{user.runtime_dir}/wayland-0",
        filter_socket=f"{user.runtime_dir}/vmsilo/{vm_name}-wayland.socket",
        waypipe_socket=f"{user.runtime_dir}/vmsilo/{vm_name}-waypipe.socket",
        control_socket=f"{user.runtime_dir}/vmsilo/{vm_name}-control.socket",
    )


def _sound(vm: VmConfig) -> SoundPlan:
    default = feature_table(vm.hypervisor).default_playback
    capture = vm.sound.capture if vm.sound.capture is not None else False
    playback = vm.sound.playback if vm.sound.playback is not None else default
    explicit = vm.sound.playback is True or vm.sound.capture is True
    return SoundPlan(playback=playback or capture, capture=capture, explicit=explicit)


def _pci(items: dict[str, KvValue]) -> PciDevicePlan:
    path = str(items.pop("path"))
    if is_bdf(path):
        bdf: str | None = normalize_bdf(path)
        sysfs = f"/sys/bus/pci/devices/{bdf}"
    else:
        sysfs = path
        base = posixpath.basename(path)
        bdf = normalize_bdf(base) if is_bdf(base) else None
    return PciDevicePlan(bdf=bdf, sysfs_path=sysfs, options=tuple(sorted(items.items())))
